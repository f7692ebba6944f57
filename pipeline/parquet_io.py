"""Parquet and file plumbing shared by every writer: atomic publication, checksums, writer settings."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# Token-id columns compress well with zstd alone; dictionary encoding them costs 3x the write time.
_NO_DICTIONARY = ("input_ids",)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Leaf column paths worth dictionary-encoding: strings (repeated lineage), never token ids."""
    out: list[str] = []

    def walk(prefix: str, t: pa.DataType) -> None:
        if pa.types.is_struct(t):
            for f in t:
                walk(f"{prefix}.{f.name}", f.type)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            walk(f"{prefix}.list.element", t.value_type)
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            out.append(prefix)

    for f in schema:
        if f.name not in _NO_DICTIONARY:
            walk(f.name, f.type)
    return out


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync and rename it into place.

    Readers never see a half-written file: either the old one (or none) or the complete new one.
    A crash leaves only a `.tmp-*` file: readers skip dot-files, and the next run deletes it (WorkDir).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # unique per writer: Dask may run a task twice at once, on machines whose pids collide
    tmp = final.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class ParquetSink:
    """Writes one Parquet file atomically, in row groups as they come; empty files get the schema."""

    def __init__(self, path: str | Path, schema: pa.Schema, compression_level: int = 1) -> None:
        self.path = Path(path)
        self.schema = schema
        self.rows = 0
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(
            self._tmp,
            schema,
            compression="zstd",
            compression_level=compression_level,
            use_dictionary=dictionary_columns(schema),
            write_statistics=False,
        )

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table.cast(self.schema) if table.schema != self.schema else table)
            self.rows += table.num_rows

    def close(self) -> str:
        """Publish the file and return its sha256."""
        self._writer.close()
        self._ctx.__exit__(None, None, None)
        return sha256_file(self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
