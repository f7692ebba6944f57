"""Hugging Face datasets reader, streaming: a hub id, a local dataset folder, or a `save_to_disk` folder.

A source has one InputShard per shard of the iterable dataset (`n_shards`). The rows of shard `i` of
`n` carry uri f"{dataset}#shard={i:05d}-of-{n:05d}" and `record` = the 0-based row within that shard,
so (uri, record) names one row for lineage and `fetch_document_text`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.readers.base import (
    BatchBuilder,
    DocumentNotFound,
    InputShard,
    ReadBatch,
    ShardReader,
    input_uri,
    shard_id,
)
from pipeline.readers.columns import add_text_column
from schemas.config import ConfigError, SourceConfig
from schemas.stage_config import HasSources

STEP = "hf_reader@1"
ROWS_PER_STEP = 1024  # rows pulled from the iterable dataset at a time
_SHARD_SUFFIX = re.compile(r"^(?P<dataset>.*)#shard=(?P<index>\d+)-of-(?P<n>\d+)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def shard_uri(dataset_uri: str, index: int, n: int) -> str:
    return f"{dataset_uri}#shard={index:05d}-of-{n:05d}"


@dataclass
class OpenedDataset:
    ds: Any  # datasets.IterableDataset
    n_shards: int
    columns: list[str] | None  # None when the loader does not know the features up front
    revision: str | None
    uri: str  # the dataset as InputShard.uri: a relative/absolute posix path or the hub id


def _local_dir(cfg: HasSources, dataset: str) -> Path | None:
    if "://" in dataset:  # a hub or store URL is never a local folder
        return None
    p = cfg.resolve(dataset)
    return p if p.is_dir() else None


def _is_saved_to_disk(p: Path) -> bool:
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def open_dataset(cfg: HasSources, src: SourceConfig) -> OpenedDataset:
    """The source's dataset as a streaming IterableDataset; ConfigError when it cannot be opened."""
    assert src.dataset is not None  # the config validator guarantees it for kind 'hf'
    local = _local_dir(cfg, src.dataset)
    uri = input_uri(cfg, local) if local is not None else src.dataset
    what = f"source {src.name!r}: hf dataset {src.dataset!r} (subset={src.subset!r}, split={src.split!r})"
    try:
        import datasets

        if local is not None and _is_saved_to_disk(local):
            ds, revision = _open_saved(datasets, local, src, what)
        else:
            # what load_dataset(..., streaming=True) does, keeping the builder to learn the resolved commit
            builder = datasets.load_dataset_builder(
                str(local) if local is not None else src.dataset, src.subset, revision=src.revision
            )
            ds = builder.as_streaming_dataset(split=src.split)
            commit = getattr(builder, "hash", None)
            hub_commit = (
                commit if local is None and isinstance(commit, str) and _COMMIT.match(commit) else None
            )
            revision = src.revision or hub_commit
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(
            f"{what} cannot be opened: {type(err).__name__}: {err}. Check `dataset` (a local folder, relative "
            f"to the config, or a hub id; the hub needs network access), `subset` and `split`"
        ) from None
    features = getattr(ds, "features", None)
    columns = list(features) if features else None
    return OpenedDataset(
        ds=ds, n_shards=max(1, int(ds.num_shards)), columns=columns, revision=revision, uri=uri
    )


def _open_saved(datasets: Any, local: Path, src: SourceConfig, what: str) -> tuple[Any, str | None]:
    if src.subset is not None:
        raise ConfigError(f"{what}: a save_to_disk folder has no subsets; remove `subset`")
    obj = datasets.load_from_disk(str(local))
    if isinstance(obj, datasets.DatasetDict):
        if src.split not in obj:
            raise ConfigError(
                f"{what}: no split {src.split!r} (splits: {', '.join(obj)}); set sources[].split"
            )
        obj = obj[src.split]
    # one shard per Arrow file, as load_dataset would give for a folder of files
    n = max(1, min(len(obj.cache_files) or 1, len(obj) or 1))
    return obj.to_iterable_dataset(num_shards=n), src.revision


def _check_columns(opened: OpenedDataset, src: SourceConfig) -> None:
    cols = opened.columns
    if cols is None:
        return
    if src.text_field not in cols:
        raise ConfigError(
            f"source {src.name!r}: hf dataset {src.dataset!r} has no column {src.text_field!r} "
            f"(columns: {', '.join(cols)}); set sources[].text_field to the column that holds the text"
        )
    feature = opened.ds.features[src.text_field]
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string", "string_view"):
        raise ConfigError(
            f"source {src.name!r}: column {src.text_field!r} of hf dataset {src.dataset!r} is {feature}, not a "
            f"string; set sources[].text_field to a string column (columns: {', '.join(cols)})"
        )
    if src.id_field is not None and src.id_field not in cols:
        raise ConfigError(
            f"source {src.name!r}: hf dataset {src.dataset!r} has no column {src.id_field!r} "
            f"(columns: {', '.join(cols)}); set sources[].id_field to an existing column or remove it"
        )


def list_shards(cfg: HasSources, src: SourceConfig) -> list[InputShard]:
    opened = open_dataset(cfg, src)
    _check_columns(opened, src)
    n = opened.n_shards
    return [
        InputShard(
            source=src.name,
            kind="hf",
            uri=opened.uri,
            shard_id=shard_id(src.name, i),
            index=i,
            hf_num_shards=n,
        )
        for i in range(n)
    ]


def _iter_tables(opened: OpenedDataset, src: SourceConfig, n: int, index: int) -> Iterator[pa.Table]:
    ds = opened.ds.shard(num_shards=n, index=index, contiguous=True)
    if opened.columns is not None:
        ds = ds.select_columns(
            [c for c in (src.text_field, src.id_field) if c is not None and c in opened.columns]
        )
    yield from ds.with_format("arrow").iter(batch_size=ROWS_PER_STEP)


def _add_table(b: BatchBuilder, table: pa.Table, offset: int, src: SourceConfig, where_prefix: str) -> None:
    n = table.num_rows
    if src.text_field in table.column_names:
        texts = table.column(src.text_field).combine_chunks()
    else:
        texts = pa.nulls(n, pa.large_string())
    ids = None
    if src.id_field is not None and src.id_field in table.column_names:
        ids = table.column(src.id_field).combine_chunks()
    add_text_column(b, texts, ids, offset, src.text_field, lambda r: f"row {r} of {where_prefix}")


class HfShardReader(ShardReader):
    def _read(self) -> Iterator[ReadBatch]:
        opened = open_dataset(self.cfg, self.source)
        n = self.shard.hf_num_shards or opened.n_shards
        if n != opened.n_shards:
            raise ConfigError(
                f"source {self.source.name!r}: hf dataset {self.source.dataset!r} now has {opened.n_shards} "
                f"shards, not the {n} it had when the shards were listed; list the shards again"
            )
        self.uri = shard_uri(self.shard.uri, self.shard.index, n)
        b = self.new_builder()
        offset = 0
        for table in _iter_tables(opened, self.source, n, self.shard.index):
            _add_table(b, table, offset, self.source, self.uri)
            offset += table.num_rows
            if b.full:
                yield b.flush()
        self._revision = opened.revision
        self._bytes = 0
        if not b.empty:
            yield b.flush()


def fetch_text(cfg: HasSources, src: SourceConfig, uri: str, record: int) -> str:
    m = _SHARD_SUFFIX.match(uri)
    if m is None:
        raise DocumentNotFound(f"{uri}: not an hf shard uri (expected '<dataset>#shard=<i>-of-<n>')")
    index, n = int(m["index"]), int(m["n"])
    opened = open_dataset(cfg, src)
    if n != opened.n_shards or not 0 <= index < n:
        raise DocumentNotFound(f"{uri}: the dataset now has {opened.n_shards} shards, not {n}")
    offset = 0
    for table in _iter_tables(opened, src, n, index):
        if record < offset + table.num_rows:
            b = BatchBuilder(src.name, uri, 1 << 30)
            _add_table(b, table.slice(record - offset, 1), record, src, uri)
            batch = b.flush()
            if batch.docs.num_rows != 1:
                q = batch.quarantine.to_pylist()[0]
                raise DocumentNotFound(f"{q['detail']} (quarantined as {q['reason']})")
            return str(batch.docs.column("text")[0].as_py())
        offset += table.num_rows
    raise DocumentNotFound(f"{uri}: row {record} is past the end of the shard ({offset} rows)")
