"""Text embedders for semantic selection: the Embedder interface, one registry of every kind
(MiniLM, the distilled static model, static token embeddings) and the on-disk vector cache.
"""
