"""What each stage hands the next: the plain result records of prepare, embed, select and write.

They sit below the stages (and below the corpus, synthesis and output packages that read them), so
nothing outside `pipeline/stages/` and the executors imports a stage module. Each record is also its
unit's completion record on disk (`to_json` / `from_json`). The path helpers here name files these
records point at.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.parquet_io import sha256_file
from schemas.manifest import ShardEntry

if TYPE_CHECKING:
    from pipeline.core.workdir import WorkDir


@dataclass
class PrepareResult:
    """What one input shard produced; persisted as the shard's completion record."""

    shard_id: str
    source: str
    uri: str
    revision: str | None
    input_bytes: int
    records_read: int
    quarantined: dict[str, int]
    documents: int
    tokens_read: int
    filtered: dict[str, int]
    filtered_tokens: dict[str, int]
    kept: int
    kept_tokens: int
    files: dict[str, str] = field(default_factory=dict)  # kind -> path relative to the stage folder
    sha256: dict[str, str] = field(default_factory=dict)  # kind -> checksum
    seconds: float = 0.0
    steps: list[str] = field(default_factory=list)
    input_stamp: str = ""  # what the input looked like when read (see `input_stamp`)
    format: str = ""  # PREPARE_STEP of the code that wrote it
    reused: bool = False  # set when loaded from an earlier run's record, never stored as True

    @property
    def records_in_documents(self) -> int:
        return self.records_read - sum(self.quarantined.values())

    def to_json(self) -> dict:
        return {**asdict(self), "reused": False}

    @classmethod
    def from_json(cls, d: dict) -> PrepareResult:
        return cls(**d)


def tokens_file_of(documents_file: Path) -> Path:
    """The raw token file written beside a prepared shard's documents table."""
    return documents_file.parent.parent / "tokens" / f"{documents_file.stem}.int32"


@dataclass
class EmbedResult:
    """What embedding one shard did; persisted as its completion record."""

    shard_id: str
    documents: int
    dim: int
    dtype: str
    file: str  # relative to the embed folder
    sha256: str
    # of the documents table the vectors are aligned with; it pins the token ids too: it holds each
    # document's content hash, and the tokenizer is part of the prepare folder's key
    documents_sha256: str
    embedder: str  # the embedder's identity (weights fingerprint)
    cache_key: str
    chunk_tokens: int
    max_chunks: int
    cache_hits: int
    cache_misses: int
    model_calls: int
    chunks: int
    partial_documents: int  # longer than max_chunks x chunk_tokens: embedded from spread-out chunks
    min_coverage: float  # smallest fraction of a document's tokens that was embedded
    seconds: float
    reused: bool = False

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TargetPlan:
    target_length: int
    config_name: str
    strategy: str
    n_rows: int
    rows_per_shard: int
    n_shards: int
    last_row_pad: int
    layout_file: str
    layout_sha256: str
    documents: int
    split_documents: int
    needless_splits: int
    content_tokens: int
    dropped_tail_tokens: int


@dataclass
class SelectResult:
    targets: list[TargetPlan]
    filtered: dict[str, dict[str, int]]  # source -> reason -> documents dropped at this stage
    filtered_tokens: dict[str, dict[str, int]]
    packed_tokens: dict[str, int]
    dropped_tail_tokens: dict[str, int]
    filtered_file: str
    filtered_sha256: str
    steps: list[str]
    seconds: float
    extra: dict = field(default_factory=dict)
    inputs_key: str = ""  # `inputs_key(prepared)` of the documents this selection was made from
    reused: bool = False  # set when loaded from an earlier run's record, never stored as True

    def to_json(self) -> dict:
        return {**asdict(self), "reused": False}

    @classmethod
    def from_json(cls, d: dict) -> SelectResult:
        d = dict(d)
        d["targets"] = [TargetPlan(**t) for t in d["targets"]]
        return cls(**d)


def shard_path(plan: TargetPlan, k: int) -> str:
    """Output path of shard k, relative to the output folder (Hugging Face `train-` naming)."""
    return f"data/{plan.config_name}/train-{k:05d}-of-{plan.n_shards:05d}.parquet"


@dataclass
class WrittenShard:
    """One output shard's manifest entry, and whether an earlier run's verified shard was kept."""

    entry: ShardEntry
    reused: bool


def output_units(selected: SelectResult) -> list[tuple[int, int]]:
    """(target index, shard index) of every output shard, in order."""
    return [(ti, k) for ti, plan in enumerate(selected.targets) for k in range(plan.n_shards)]


def group_by_target(selected: SelectResult, entries: list[ShardEntry]) -> list[list[ShardEntry]]:
    out: list[list[ShardEntry]] = [[] for _ in selected.targets]
    for (ti, _), e in zip(output_units(selected), entries, strict=True):
        out[ti].append(e)
    return out


def inputs_key(prepared: list[PrepareResult]) -> str:
    """Identity of the tokenized documents a selection is made from: shard ids and file checksums.

    The select folder is keyed by the config; this key ties its record to the inputs too, so a
    rerun after the corpus changed lays out rows again instead of reusing a stale layout.
    """
    h = hashlib.sha256()
    for r in prepared:
        sums = "|".join(str(r.sha256.get(kind)) for kind in ("documents", "tokens", "filtered"))
        h.update(f"{r.shard_id}|{sums}\n".encode())
    return h.hexdigest()[:32]


def load_verified_selection(work: WorkDir, rec: Path, key: str) -> SelectResult | None:
    """The earlier selection, if it was made from the same documents and its files match their checksums."""
    if not rec.exists():
        return None
    try:
        res = SelectResult.from_json(json.loads(rec.read_text()))
    except (ValueError, TypeError, KeyError):
        return None
    if res.inputs_key != key:
        return None
    checks = [(res.filtered_file, res.filtered_sha256)] + [
        (t.layout_file, t.layout_sha256) for t in res.targets
    ]
    for rel, sha in checks:
        p = work.select_dir / rel
        if not p.exists() or sha256_file(p) != sha:
            return None
    res.reused = True
    return res
