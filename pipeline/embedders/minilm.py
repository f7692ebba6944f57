"""sentence-transformers models (MiniLM by default, any `st:` folder, `model2vec:` static models)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.embedders.base import Embedder, EmbedderError


class SentenceTransformerEmbedder(Embedder):
    """Any sentence-transformers model (transformer or static)."""

    def __init__(self, spec: str, identity: str, model: Any) -> None:
        seq = model.max_seq_length
        max_seq = None if seq is None or not np.isfinite(seq) else int(seq)
        dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        super().__init__(spec, identity, int(dim_of()), max_seq)
        self.model = model

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self.model.encode(
            texts,
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )


def load_sentence_transformer(path_or_id: str, device: str) -> Any:
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(path_or_id, device=device)
    except Exception as err:  # the library raises many kinds (OSError, ValueError, HTTP errors)
        raise EmbedderError(
            f"diversity.embedder: cannot load sentence-transformers model {path_or_id!r} ({err}); "
            "give a local model folder, or a hub id on a machine that can reach the hub"
        ) from None


def load_model2vec(path_or_id: str, device: str) -> Any:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    try:
        module = StaticEmbedding.load(path_or_id)
    except Exception as err:
        raise EmbedderError(
            f"diversity.embedder: cannot load model2vec model {path_or_id!r} ({err}); give a folder with "
            "tokenizer.json and model.safetensors, or a hub id on a machine that can reach the hub"
        ) from None
    return SentenceTransformer(modules=[module], device=device)
