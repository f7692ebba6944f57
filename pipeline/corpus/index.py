"""The document index of the whole corpus: small per-document columns, drops with reasons, selectors.

Selection and the semantic package both work on positions into one `DocIndex` (documents in canonical
order: shard by shard, row by row); a `Drop` is what one corpus-level step removed and why, and a
`Selector` is such a step. Built from the prepare stage's documents files, never from the tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from pipeline.core.results import PrepareResult
from pipeline.core.workdir import WorkDir
from schemas.stage_config import SelectConfig


def config_name(target_length: int) -> str:
    return f"pretrain_{target_length}"


@dataclass
class DocIndex:
    """Small per-document columns of the whole corpus, in canonical order."""

    shard: np.ndarray  # int32
    row: np.ndarray  # int64
    source: np.ndarray  # int32, index into `sources`
    n_tokens: np.ndarray  # int64
    content_hash: np.ndarray  # S64
    doc_id: list[str]
    sources: list[str]
    files: list[str] = field(default_factory=list)  # documents file of each shard (embeddings live beside)

    def __len__(self) -> int:
        return len(self.shard)


def load_doc_index(work: WorkDir, prepared: list[PrepareResult], sources: list[str]) -> DocIndex:
    shard_parts, row_parts, src_parts, tok_parts, hash_parts = [], [], [], [], []
    doc_ids: list[str] = []
    for si, res in enumerate(prepared):
        t = pq.read_table(
            work.prepare_dir / res.files["documents"], columns=["doc_id", "content_hash", "n_tokens"]
        )
        n = t.num_rows
        shard_parts.append(np.full(n, si, np.int32))
        row_parts.append(np.arange(n, dtype=np.int64))
        src_parts.append(np.full(n, sources.index(res.source), np.int32))
        tok_parts.append(t.column("n_tokens").to_numpy().astype(np.int64))
        hash_parts.append(np.array(t.column("content_hash").to_pylist(), dtype="S64"))
        doc_ids.extend(t.column("doc_id").to_pylist())

    def cat(parts: list[np.ndarray], dtype: str) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    return DocIndex(
        cat(shard_parts, "int32"),
        cat(row_parts, "int64"),
        cat(src_parts, "int32"),
        cat(tok_parts, "int64"),
        cat(hash_parts, "S64"),
        doc_ids,
        sources,
        [str(work.prepare_dir / r.files["documents"]) for r in prepared],
    )


@dataclass
class Drop:
    """Documents a corpus-level step removed: positions in the DocIndex and why."""

    step: str
    reason: str
    index: np.ndarray
    detail: list[str]
    duplicate_of: list[str | None] | None = None


# A selector sees the surviving documents (positions into the index) and returns what it drops.
Selector = Callable[[SelectConfig, WorkDir, DocIndex, np.ndarray, list[PrepareResult]], Drop | None]
