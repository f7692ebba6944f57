"""Per-document filters: each a small step with a versioned name that says why it dropped a document.

A filter looks at a batch (numpy columns, never one Python object per token) and returns a keep mask;
the caller records a `filtered` row with the step, reason and detail for every document dropped.
Filters that need the whole corpus (dedup, budgets) live in `pipeline.stages.select`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from schemas.stage_config import PrepareConfig


@dataclass
class DocColumns:
    """The columns filters may read, for one batch of tokenized documents."""

    source: str
    n_tokens: np.ndarray  # int64
    content_hash: list[str]


def stable_uniform(seed: int, salt: str, hashes: list[str]) -> np.ndarray:
    """A reproducible number in [0, 1) per document, from the run seed and the document's content hash."""
    return stable_uniform_u64(seed, salt, np.array([int(x[:16], 16) for x in hashes], dtype=np.uint64))


def stable_uniform_u64(seed: int, salt: str, keys: np.ndarray) -> np.ndarray:
    """`stable_uniform` from each hash's first 8 bytes read big-endian (its first 16 hex digits) as uint64:
    the same numbers, for callers that hold hashes as bytes (`pipeline.corpus.partition`)."""
    # The content hash is already uniform; mixing in the seed and a per-step salt keeps steps independent.
    mix = np.uint64((seed * 0x9E3779B97F4A7C15 + hash_str(salt)) & 0xFFFFFFFFFFFFFFFF)
    h = np.asarray(keys, dtype=np.uint64) ^ mix
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def hash_str(s: str) -> int:
    """A stable 64-bit integer for a short string (Python's hash() is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


class DocFilter(ABC):
    step: str
    reason: str

    @abstractmethod
    def keep(self, cols: DocColumns) -> np.ndarray:
        """Boolean mask of documents to keep."""

    @abstractmethod
    def detail(self, n_tokens: int) -> str:
        """Why a document of this length was dropped, in words."""


class MinTokens(DocFilter):
    step, reason = "min_tokens@1", "too_short"

    def __init__(self, min_tokens: int) -> None:
        self.min_tokens = min_tokens

    def keep(self, cols: DocColumns) -> np.ndarray:
        return cols.n_tokens >= self.min_tokens

    def detail(self, n_tokens: int) -> str:
        return f"{n_tokens} tokens < filters.min_tokens={self.min_tokens}"


class MaxTokens(DocFilter):
    step, reason = "max_tokens@1", "too_long"

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens

    def keep(self, cols: DocColumns) -> np.ndarray:
        return cols.n_tokens <= self.max_tokens

    def detail(self, n_tokens: int) -> str:
        return f"{n_tokens} tokens > filters.max_tokens={self.max_tokens}"


class ShortDocDownsample(DocFilter):
    """Keep documents under `below` tokens with probability `keep_prob` (Fu et al. 2024, 'Data
    Engineering for Scaling Language Models to 128K Context': upsample long documents by thinning
    short ones within a source, keeping the source mixture otherwise intact)."""

    step, reason = "short_doc_downsample@1", "short_doc_downsampled"

    def __init__(self, below: int, keep_prob: float, seed: int) -> None:
        self.below, self.keep_prob, self.seed = below, keep_prob, seed

    def keep(self, cols: DocColumns) -> np.ndarray:
        short = cols.n_tokens < self.below
        u = stable_uniform(self.seed, self.step, cols.content_hash)
        return ~short | (u < self.keep_prob)

    def detail(self, n_tokens: int) -> str:
        return f"{n_tokens} tokens < {self.below}: kept with probability {self.keep_prob}, not drawn (seeded)"


def filters_for_source(cfg: PrepareConfig, source: str) -> list[DocFilter]:
    """The per-document filters a source's documents go through, in order."""
    out: list[DocFilter] = []
    if cfg.filters.min_tokens > 0:
        out.append(MinTokens(cfg.filters.min_tokens))
    if cfg.filters.max_tokens is not None:
        out.append(MaxTokens(cfg.filters.max_tokens))
    sd = cfg.source(source).short_docs
    if sd is not None:
        out.append(ShortDocDownsample(sd.below_tokens, sd.keep_prob, cfg.run.seed))
    return out
