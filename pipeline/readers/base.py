"""What every reader shares: the shard/batch/info records, the batch builder and the reader base class."""

from __future__ import annotations

import glob
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.core import storage
from schemas.config import ConfigError, SourceConfig
from schemas.records import QUARANTINE_SCHEMA, RAW_DOC_SCHEMA
from schemas.redact import redact_url
from schemas.stage_config import HasSources

RAW_PREFIX_BYTES = 1024  # how much of an offending input a quarantine row keeps


@dataclass(frozen=True)
class InputShard:
    """One unit of reading work: a file, a repository, or one shard of an hf dataset."""

    source: str
    kind: str  # "jsonl" | "parquet" | "hf" | "code"
    uri: str  # posix path relative to cfg.base_dir when inside it (else absolute), or the hf dataset
    shard_id: str  # f"{source}-{index:05d}": stable and filesystem-safe
    index: int  # position among this source's shards
    hf_num_shards: int | None = None  # hf only: this is shard `index` of this many


@dataclass
class ReadBatch:
    docs: pa.Table  # RAW_DOC_SCHEMA
    quarantine: pa.Table  # QUARANTINE_SCHEMA
    records_read: int  # input records consumed for this batch (documents + quarantined; code: files)


@dataclass
class InputInfo:
    """Known once a shard is fully read. `uri` equals the `uri` column of the shard's rows."""

    uri: str
    revision: str | None  # "sha256:<16 hex>" of the file, a git commit, or the hf revision
    bytes: int  # raw bytes read, 0 if unknown
    records: int  # total records_read


class DocumentNotFound(LookupError):
    """fetch_document_text: no document at this (uri, record): quarantined, blank or out of range."""


class ShardReader(ABC):
    """Iterable over one shard's ReadBatches; `.info` is valid once an iteration has ended.

    Every iteration reads the shard again from the start.
    """

    def __init__(self, cfg: HasSources, shard: InputShard, batch_bytes: int) -> None:
        if batch_bytes <= 0:
            raise ValueError(f"batch_bytes must be positive, got {batch_bytes}")
        self.cfg = cfg
        self.shard = shard
        self.source: SourceConfig = cfg.source(shard.source)
        self.batch_bytes = batch_bytes
        self.uri = shard.uri  # readers whose rows carry another uri (hf) override this
        self._revision: str | None = None
        self._bytes = 0
        self._info: InputInfo | None = None

    @property
    def info(self) -> InputInfo:
        if self._info is None:
            raise RuntimeError(
                f"{self.shard.shard_id}: InputInfo is known only after the shard was fully read"
            )
        return self._info

    def __iter__(self) -> Iterator[ReadBatch]:
        self._info = None
        records = 0
        for batch in self._read():
            records += batch.records_read
            yield batch
        self._info = InputInfo(uri=self.uri, revision=self._revision, bytes=self._bytes, records=records)

    def new_builder(self) -> BatchBuilder:
        return BatchBuilder(self.source.name, self.uri, self.batch_bytes)

    @abstractmethod
    def _read(self) -> Iterator[ReadBatch]:
        """Yield the shard's batches; set self._revision and self._bytes before returning."""


class BatchBuilder:
    """Collects one shard's documents and quarantine rows and cuts them into ReadBatches."""

    def __init__(self, source: str, uri: str, batch_bytes: int) -> None:
        self.source = source
        self.uri = uri
        self.batch_bytes = batch_bytes
        self._reset()

    def _reset(self) -> None:
        self.records: list[int] = []
        self.doc_ids: list[str] = []
        self.texts: list[str] = []
        self.tables: list[pa.Table] = []  # documents added as Arrow columns
        self.q_rows: list[tuple[int | None, str | None, str, str, bytes | None]] = []
        self.text_bytes = 0
        self.records_read = 0

    @property
    def full(self) -> bool:
        return self.text_bytes >= self.batch_bytes

    @property
    def empty(self) -> bool:
        return self.records_read == 0 and not self.q_rows and not self.records and not self.tables

    def add_doc(self, record: int, doc_id: str, text: str, nbytes: int) -> None:
        self.records.append(record)
        self.doc_ids.append(doc_id)
        self.texts.append(text)
        self.text_bytes += nbytes

    def add_doc_columns(self, records: pa.Array, doc_ids: pa.Array, texts: pa.Array) -> None:
        """Documents already in Arrow columns (Parquet, hf): no Python object per document."""
        n = len(texts)
        if n == 0:
            return
        self.tables.append(
            pa.Table.from_arrays(
                [
                    pa.array([self.source] * n, pa.string()),
                    pa.array([self.uri] * n, pa.string()),
                    records.cast(pa.int64()),
                    doc_ids.cast(pa.string()),
                    texts.cast(pa.large_string()),
                ],
                schema=RAW_DOC_SCHEMA,
            )
        )
        self.text_bytes += texts.nbytes

    def quarantine(
        self,
        record: int | None,
        reason: str,
        detail: str,
        raw: bytes | None = None,
        member: str | None = None,
    ) -> None:
        kept = None if raw is None else raw[:RAW_PREFIX_BYTES]
        self.q_rows.append((record, member, reason, detail, kept))
        # quarantine rows count toward the batch size too, so a file of bad lines stays bounded
        self.text_bytes += len(detail) + (len(kept) if kept else 0)

    def flush(self) -> ReadBatch:
        docs = self._docs_table()
        q = self.q_rows
        n = len(q)
        quarantine = pa.Table.from_arrays(
            [
                pa.array([self.source] * n, pa.string()),
                pa.array([self.uri] * n, pa.string()),
                pa.array([r[0] for r in q], pa.int64()),
                pa.array([r[1] for r in q], pa.string()),
                pa.array([r[2] for r in q], pa.string()),
                pa.array([r[3] for r in q], pa.string()),
                pa.array([r[4] for r in q], pa.binary()),
            ],
            schema=QUARANTINE_SCHEMA,
        )
        batch = ReadBatch(docs=docs, quarantine=quarantine, records_read=self.records_read)
        self._reset()
        return batch

    def _docs_table(self) -> pa.Table:
        n = len(self.texts)
        tables = list(self.tables)
        if n or not tables:
            tables.append(
                pa.Table.from_arrays(
                    [
                        pa.array([self.source] * n, pa.string()),
                        pa.array([self.uri] * n, pa.string()),
                        pa.array(self.records, pa.int64()),
                        pa.array(self.doc_ids, pa.string()),
                        pa.array(self.texts, pa.large_string()),
                    ],
                    schema=RAW_DOC_SCHEMA,
                )
            )
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables).combine_chunks()


# --- paths --------------------------------------------------------------------------------------------


def input_uri(cfg: HasSources, path: str | Path) -> str:
    """A posix path relative to cfg.base_dir when the input lies inside it, else absolute; a URL stays
    a URL, without credentials (it is recorded in lineage and manifests)."""
    if isinstance(path, str) and storage.is_remote(path):
        return redact_url(path)
    p = Path(os.path.abspath(path))
    bases = [Path(os.path.abspath(cfg.base_dir))]
    real = Path(cfg.base_dir).resolve()
    if real not in bases:
        bases.append(real)
    for candidate in (p, p.resolve()):
        for base in bases:
            try:
                return candidate.relative_to(base).as_posix()
            except ValueError:
                continue
    return p.as_posix()


def expand_glob(cfg: HasSources, pattern: str) -> list[Path]:
    """Matches of one configured pattern; the base folder itself is never read as a pattern."""
    if Path(pattern).is_absolute():
        full = pattern
    else:
        full = os.path.join(glob.escape(os.path.abspath(cfg.base_dir)), pattern)
    return [Path(m) for m in glob.glob(full, recursive=True)]


def matched_files(cfg: HasSources, src: SourceConfig) -> list[Path | str]:
    """Files matched by a source's globs, deduplicated and sorted by uri; ConfigError when a glob is empty.

    A URL pattern (`s3://bucket/data/*.jsonl.gz`) is expanded in its store (`fs.glob`): its matches
    are URLs (str), read through `storage.input_path`."""
    by_uri: dict[str, Path | str] = {}
    for pattern in src.paths:
        files: list[Path | str]
        if storage.is_remote(pattern):
            try:
                files = list(storage.glob(pattern))
            except Exception as err:  # any backend error: one line naming the URL
                raise ConfigError(
                    f"source {src.name!r}: {redact_url(pattern)}: {storage.explain(err)}"
                ) from None
            matches: list[Path | str] = list(files)
        else:
            local = expand_glob(cfg, str(storage.local_path(pattern)))
            files, matches = [m for m in local if m.is_file()], [*local]
        if not files:
            what = "only directories" if matches else "nothing"
            raise ConfigError(
                f"source {src.name!r}: path pattern {redact_url(pattern)!r} matches {what} "
                f"(patterns are relative to {cfg.base_dir}); fix sources[].paths, e.g. 'data/*.{src.kind}'"
            )
        for f in files:
            by_uri.setdefault(input_uri(cfg, f), f)
    return [by_uri[u] for u in sorted(by_uri)]


def shard_id(source: str, index: int) -> str:
    return f"{source}-{index:05d}"
