"""Parquet reader: only the text (and id) columns, in record batches; `record` is the 0-based row."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.readers.base import (
    RAW_PREFIX_BYTES,
    BatchBuilder,
    DocumentNotFound,
    InputShard,
    ReadBatch,
    ShardReader,
    input_uri,
    matched_files,
    shard_id,
)
from pipeline.readers.columns import add_text_column, is_text_type
from schemas.config import ConfigError, SourceConfig
from schemas.stage_config import HasSources

STEP = "parquet_reader@1"
log = logging.getLogger("longloom")
_HASH_CHUNK = 8 << 20


class FileHasher:
    """sha256 of a file on a helper thread (hashlib releases the GIL), while its columns are decoded.

    Parquet is read by column chunk, not front to back, so the hash cannot ride along the reads.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"hash:{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            sha = hashlib.sha256()
            with open(self.path, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    sha.update(chunk)
            self._digest = sha.hexdigest()
        except BaseException as err:
            self._error = err

    def revision(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return "sha256:" + self._digest[:16]


def _columns(pf: pq.ParquetFile, src: SourceConfig) -> list[str]:
    cols = [src.text_field]
    if src.id_field is not None and src.id_field != src.text_field:
        cols.append(src.id_field)
    return cols


def _rows_per_batch(pf: pq.ParquetFile, text_field: str, batch_bytes: int) -> int:
    """Rows that hold about `batch_bytes` of text, from the column-chunk sizes in the footer."""
    md = pf.metadata
    if md.num_rows == 0:
        return 1024
    total = 0
    for rg in range(md.num_row_groups):
        group = md.row_group(rg)
        for c in range(group.num_columns):
            if group.column(c).path_in_schema == text_field:
                total += group.column(c).total_uncompressed_size
    per_row = max(1, total // md.num_rows)
    return max(16, min(1 << 20, batch_bytes // per_row))


class ParquetShardReader(ShardReader):
    def _read(self) -> Iterator[ReadBatch]:
        path = storage.input_path(self.cfg, self.shard.uri)
        hasher = FileHasher(path)
        src = self.source
        problem = file_problem(path, self.uri, src)
        if problem is not None:
            if src.on_bad_file == "fail":
                raise ConfigError(problem[1])
            yield from self._quarantine_file(path, *problem)
            self._revision = hasher.revision()
            self._bytes = path.stat().st_size
            return
        pf = pq.ParquetFile(path)
        cols = _columns(pf, src)
        b = self.new_builder()
        offset = 0
        for rb in pf.iter_batches(
            batch_size=_rows_per_batch(pf, src.text_field, self.batch_bytes), columns=cols
        ):
            self._add(b, rb, offset)
            offset += rb.num_rows
            if b.full:
                yield b.flush()
        self._revision = hasher.revision()
        self._bytes = path.stat().st_size
        if not b.empty:
            yield b.flush()

    def _add(self, b: BatchBuilder, rb: pa.RecordBatch, offset: int) -> None:
        add_batch(b, rb, offset, self.source, self.uri)

    def _quarantine_file(self, path: Path, reason: str, detail: str) -> Iterator[ReadBatch]:
        """Every row of a file that cannot be read as configured, quarantined with the file's reason.

        A row count from the footer keeps `records read = documents + quarantined` true per file; a
        file without a readable footer (or without rows) counts as one record, so it still shows in the
        quarantine table.
        """
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowInvalid, OSError):
            rows = None
        b = self.new_builder()
        if not rows:  # no footer, or no rows: the file itself is the one record, so it still shows
            with open(path, "rb") as f:
                head = f.read(RAW_PREFIX_BYTES)
            b.quarantine(None, reason, detail, head)
            b.records_read += 1
            yield b.flush()
            return
        for r in range(rows):
            b.quarantine(r, reason, detail)
            b.records_read += 1
            if b.full:
                yield b.flush()
        if not b.empty:
            yield b.flush()


def add_batch(b: BatchBuilder, rb: pa.RecordBatch, offset: int, src: SourceConfig, uri: str) -> None:
    ids = rb.column(src.id_field) if src.id_field is not None else None
    add_text_column(b, rb.column(src.text_field), ids, offset, src.text_field, lambda r: f"row {r} of {uri}")


def file_problem(path: Path | BinaryIO, uri: str, src: SourceConfig) -> tuple[str, str] | None:
    """(quarantine reason, one-line message) when `path` is not a Parquet file with the configured text
    (and id) columns; None when it is."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        return "unreadable_file", f"source {src.name!r}: {uri} is not a readable Parquet file ({err})"
    names = schema.names
    if src.text_field not in names:
        return "missing_text_column", (
            f"source {src.name!r}: {uri} has no column {src.text_field!r} (columns: {', '.join(names)}); "
            f"set sources[].text_field to the column that holds the text"
        )
    t = schema.field(src.text_field).type
    if not is_text_type(t):
        return "text_column_not_string", (
            f"source {src.name!r}: column {src.text_field!r} of {uri} has type {t}, not string; "
            f"set sources[].text_field to a string column (columns: {', '.join(names)})"
        )
    if src.id_field is not None and src.id_field not in names:
        return "missing_id_column", (
            f"source {src.name!r}: {uri} has no column {src.id_field!r} (columns: {', '.join(names)}); "
            f"set sources[].id_field to an existing column or remove it"
        )
    return None


def check_file(path: Path, uri: str, src: SourceConfig) -> None:
    """ConfigError unless `path` is a Parquet file with the configured text (and id) columns."""
    problem = file_problem(path, uri, src)
    if problem is not None:
        raise ConfigError(problem[1])


def list_shards(cfg: HasSources, src: SourceConfig) -> list[InputShard]:
    """One shard per matched file. A file without the configured columns fails the run only with
    `on_bad_file: fail`; by default it stays a shard whose reader quarantines it, so one bad file never
    blocks the good ones. When every file is bad the configuration is what is wrong: that fails."""
    shards = []
    problems: list[str] = []
    for i, path in enumerate(matched_files(cfg, src)):
        uri = input_uri(cfg, path)
        if isinstance(path, str):  # a URL: read its footer from the store, not the whole file
            with storage.open_input(path) as f:
                problem = file_problem(f, uri, src)
        else:
            problem = file_problem(path, uri, src)
        if problem is not None:
            if src.on_bad_file == "fail":
                raise ConfigError(problem[1] + " (or set on_bad_file: quarantine to skip such files)")
            log.warning("%s; the file will be quarantined (on_bad_file: quarantine)", problem[1])
            problems.append(problem[1])
        shards.append(
            InputShard(source=src.name, kind="parquet", uri=uri, shard_id=shard_id(src.name, i), index=i)
        )
    if shards and len(problems) == len(shards):
        raise ConfigError(f"every file of source {src.name!r} is unusable; the first: {problems[0]}")
    return shards


def fetch_text(cfg: HasSources, src: SourceConfig, uri: str, record: int) -> str:
    pf = pq.ParquetFile(storage.input_path(cfg, uri))
    md = pf.metadata
    if not 0 <= record < md.num_rows:
        raise DocumentNotFound(f"{uri}: row {record} is out of range (the file has {md.num_rows} rows)")
    start = 0
    for rg in range(md.num_row_groups):
        rows = md.row_group(rg).num_rows
        if record < start + rows:
            break
        start += rows
    # stream the row group in small batches up to the row, never the whole file
    for rb in pf.iter_batches(batch_size=256, row_groups=[rg], columns=_columns(pf, src)):
        if record < start + rb.num_rows:
            b = BatchBuilder(src.name, uri, 1 << 30)
            add_batch(b, rb.slice(record - start, 1), record, src, uri)
            batch = b.flush()
            if batch.docs.num_rows != 1:
                q = batch.quarantine.to_pylist()[0]
                raise DocumentNotFound(f"{q['detail']} (quarantined as {q['reason']})")
            return str(batch.docs.column("text")[0].as_py())
        start += rb.num_rows
    raise DocumentNotFound(f"{uri}: row {record} not found")
