"""Streaming input readers: JSONL (plain/.gz/.zst), Parquet, Hugging Face datasets and code repositories.

`list_input_shards(cfg)` checks every input and lists the work; `read_shard(cfg, shard)` streams one
shard as ReadBatches (documents in RAW_DOC_SCHEMA, rejected input in QUARANTINE_SCHEMA, nothing
dropped silently); `fetch_document_text` re-reads one document for lineage checks.
"""

from pipeline.readers.base import DocumentNotFound, InputInfo, InputShard, ReadBatch, ShardReader
from pipeline.readers.dispatch import fetch_document_text, list_input_shards, read_shard

__all__ = [
    "DocumentNotFound",
    "InputInfo",
    "InputShard",
    "ReadBatch",
    "ShardReader",
    "fetch_document_text",
    "list_input_shards",
    "read_shard",
]
