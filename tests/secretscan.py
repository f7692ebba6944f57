"""The one place tests look for leaked secrets: every file a run wrote, read the way a reader would.

A byte grep misses what is compressed, so each file is also opened by kind: Parquet values and schema
metadata (pyarrow), PNG text chunks (tEXt, zTXt, iTXt, decompressed), SQLite databases (every text and
blob cell; Prefect's `PREFECT_HOME/prefect.db` and its WAL), gzip and zstd streams. Texts such as
captured logs are checked as given.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sqlite3
import struct
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq


def _png_texts(data: bytes) -> Iterator[bytes]:
    """The text of every tEXt, zTXt and iTXt chunk of a PNG file."""
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"tEXt":
            yield body
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            yield key + b" " + zlib.decompress(rest[1:])
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed = rest[0]
            _lang, _, rest = rest[2:].partition(b"\0")
            _tkey, _, text = rest.partition(b"\0")
            yield key + b" " + (zlib.decompress(text) if compressed else text)


def _sqlite_cells(path: Path) -> Iterator[bytes]:
    """Every cell of every table of an SQLite database (read from a copy, WAL included)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        shutil.copy(path, copy)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                shutil.copy(side, Path(tmp) / (path.name + suffix))
        con = sqlite3.connect(copy)
        try:
            tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
            for t in tables:
                for row in con.execute(f'select * from "{t}"'):
                    for cell in row:
                        if isinstance(cell, bytes):
                            yield cell
                        elif cell is not None:
                            yield str(cell).encode()
        finally:
            con.close()


def _readings(path: Path) -> Iterator[tuple[str, bytes]]:
    """(how it was read, bytes) for one file: its raw bytes, then its decoded content by kind."""
    data = path.read_bytes()
    yield "bytes", data
    if path.suffix == ".parquet" or data[:4] == b"PAR1":
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
        yield "parquet metadata", b" ".join(k + b"=" + v for k, v in meta.items())
        yield "parquet values", json.dumps(pf.read().to_pylist(), default=str, ensure_ascii=False).encode()
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        yield "png text", b"\n".join(_png_texts(data))
    elif data[:16] == b"SQLite format 3\x00":
        yield "sqlite cells", b"\n".join(_sqlite_cells(path))
    elif data[:2] == b"\x1f\x8b":
        yield "gzip", gzip.decompress(data)
    elif data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        yield "zstd", zstandard.ZstdDecompressor().stream_reader(data).read()


def find_secrets(
    roots: Iterable[Path], secrets: Iterable[str], texts: dict[str, str] | None = None
) -> list[str]:
    """Where any of `secrets` occurs: '<file> (<reading>): <secret>' for files under `roots`, and
    '<name>: <secret>' for the named texts. Empty when nothing leaked."""
    wanted = [s for s in secrets if s]
    assert wanted, "no secrets to look for"
    found: list[str] = []
    n_files = 0
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            n_files += 1
            for how, blob in _readings(path):
                found += [f"{path} ({how}): {s}" for s in wanted if s.encode() in blob]
    for name, text in (texts or {}).items():
        found += [f"{name}: {s}" for s in wanted if s in text]
    return found


def assert_no_secrets(
    roots: Iterable[Path], secrets: Iterable[str], texts: dict[str, str] | None = None
) -> None:
    roots = list(roots)
    assert any(r.exists() for r in roots), f"nothing to scan in {roots}"
    leaks = find_secrets(roots, secrets, texts)
    assert not leaks, "secrets written:\n" + "\n".join(leaks[:20])
