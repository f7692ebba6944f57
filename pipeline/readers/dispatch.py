"""The three entry points the pipeline calls, dispatching on the source kind."""

from __future__ import annotations

from pipeline.readers import code, hf, jsonl, parquet
from pipeline.readers.base import InputShard, ShardReader
from schemas.config import ConfigError, SourceConfig
from schemas.stage_config import HasSources

_READERS: dict[str, type[ShardReader]] = {
    "jsonl": jsonl.JsonlShardReader,
    "parquet": parquet.ParquetShardReader,
    "hf": hf.HfShardReader,
    "code": code.CodeShardReader,
}


def list_input_shards(cfg: HasSources) -> list[InputShard]:
    """Every source's shards: sources in config order, files sorted by path.

    Checks inputs before any work: raises ConfigError for an empty glob, a Parquet file or hf dataset
    without the text column, a code path that is not a folder, a dataset that cannot be opened.
    """
    shards: list[InputShard] = []
    for src in cfg.sources:
        shards.extend(_list_source(cfg, src))
    return shards


def _list_source(cfg: HasSources, src: SourceConfig) -> list[InputShard]:
    if src.kind == "jsonl":
        return jsonl.list_shards(cfg, src)
    if src.kind == "parquet":
        return parquet.list_shards(cfg, src)
    if src.kind == "hf":
        return hf.list_shards(cfg, src)
    if src.kind == "code":
        return code.list_shards(cfg, src)
    raise ConfigError(f"source {src.name!r}: unknown kind {src.kind!r}")


def read_shard(cfg: HasSources, shard: InputShard, batch_bytes: int = 16 << 20) -> ShardReader:
    """A reader of one shard: iterate it for ReadBatches of about `batch_bytes` of text, then see `.info`."""
    return _READERS[shard.kind](cfg, shard, batch_bytes)


def fetch_document_text(cfg: HasSources, source: str, uri: str, record: int) -> str:
    """One document's text exactly as read_shard produced it, found by streaming to it.

    Raises DocumentNotFound (a LookupError) when (uri, record) is not a document of `source`.
    """
    src = cfg.source(source)
    if src.kind == "jsonl":
        return jsonl.fetch_text(cfg, src, uri, record)
    if src.kind == "parquet":
        return parquet.fetch_text(cfg, src, uri, record)
    if src.kind == "hf":
        return hf.fetch_text(cfg, src, uri, record)
    return code.fetch_text(cfg, src, uri, record)
