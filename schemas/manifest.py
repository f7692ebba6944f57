"""The run manifest (manifest.json) and the per-unit records it is assembled from.

The manifest is the single account of a run: every shard with its checksum, every count that must
reconcile, the tokenizer and config identity. Cards, resume and publishing read it; nothing else
keeps its own tally.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FORMAT = "longloom-manifest@1"


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizerInfo(Model):
    name: str
    vocab_hash: str
    n_vocab: int
    separator: str
    separator_id: int
    pad_token: str
    pad_id: int


class FileEntry(Model):
    """One file the run wrote, relative to the output folder."""

    path: str
    sha256: str
    bytes: int
    rows: int


class ShardEntry(FileEntry):
    tokens: int  # rows * target_length
    content_tokens: int  # document tokens (no separators, no padding)
    separator_tokens: int
    pad_tokens: int
    documents: int  # distinct documents with at least one token in this shard
    split_segments: int  # segments that hold part of a document


class InputEntry(Model):
    source: str
    shard_id: str
    uri: str
    revision: str | None
    bytes: int
    records: int


class SourceCounts(Model):
    """Per-source accounting. Identities: records_read == records_in_documents + quarantined (summed);
    documents == kept + filtered (summed); kept_tokens == packed_tokens + dropped_tail_tokens."""

    records_read: int = 0
    records_in_documents: int = 0  # for code: files that went into repository documents
    quarantined: dict[str, int] = Field(default_factory=dict)
    documents: int = 0
    tokens_read: int = 0  # tokens of every document, before filtering
    filtered: dict[str, int] = Field(default_factory=dict)
    filtered_tokens: dict[str, int] = Field(default_factory=dict)
    kept: int = 0
    kept_tokens: int = 0
    packed_tokens: int = 0  # tokens of kept documents that are in the rows
    dropped_tail_tokens: int = 0  # tokens of kept documents lost with a dropped final partial row


class TargetSummary(Model):
    target_length: int
    config_name: str
    strategy: str
    rows: int
    tokens: int
    content_tokens: int
    pad_tokens: int
    documents: int
    split_documents: int  # documents cut across rows (including those longer than a row)
    needless_splits: int  # documents no longer than a row that were still cut
    dropped_tail_tokens: int
    shards: list[ShardEntry]


class Check(Model):
    name: str
    ok: bool
    detail: str


class StageReport(Model):
    # None in the manifest, which must be byte-identical across runs of one config; timings live in report.json
    seconds: float | None = None
    items_in: int | None = None
    items_out: int | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    notes: dict[str, Any] = Field(default_factory=dict)


class Manifest(Model):
    format: str = MANIFEST_FORMAT
    longloom_version: str
    config_hash: str
    # the hash each kind of row carries in lineage.config_hash ("pretraining", "procedural", "rewriter"):
    # of the config sections those rows depend on (schemas.config.ROW_SECTIONS)
    row_config_hashes: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any]
    seed: int
    command: str
    tokenizer: TokenizerInfo
    inputs: list[InputEntry]
    sources: dict[str, SourceCounts]
    targets: list[TargetSummary]
    audit: dict[str, list[FileEntry]]  # "filtered", "quarantine", and tables later stages add ("pruned", ...)
    extra_configs: dict[str, list[FileEntry]] = Field(
        default_factory=dict
    )  # synthesized sets, by config name
    stages: dict[str, StageReport]
    checks: list[Check]
    extra: dict[str, Any] = Field(default_factory=dict)  # statistics of optional stages, by stage name

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)
