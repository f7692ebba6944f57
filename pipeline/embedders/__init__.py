"""Text embedders for semantic selection: the Embedder interface, one registry of every kind
(MiniLM, the distilled static model, static token embeddings), the on-disk vector cache, and how a
prepared shard's documents become vectors (`documents`).
"""
