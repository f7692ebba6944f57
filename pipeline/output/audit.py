"""The audit tables of a run: per-shard filtered/quarantine/pruned files merged into `audit/<name>/`.

Public so that every stage with something to account for (finalize, the semantic report, the
rewriter) merges and recounts audit rows the same way.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.parquet_io import ParquetSink
from schemas.manifest import FileEntry

AUDIT_ROWS_PER_FILE = 1_000_000


def merge_audit(out: Path, name: str, schema: pa.Schema, inputs: list[Path], level: int) -> list[FileEntry]:
    """Concatenate per-shard audit files into `audit/<name>/` (a few large files, not thousands)."""
    out / "audit" / name
    total = 0
    for p in inputs:
        f = pq.ParquetFile(p)
        total += f.metadata.num_rows
    n_files = max(1, -(-total // AUDIT_ROWS_PER_FILE))
    entries: list[FileEntry] = []
    written = 0
    k = 0

    def open_next() -> ParquetSink:
        rel = f"audit/{name}/{name}-{k:05d}-of-{n_files:05d}.parquet"
        return ParquetSink(out / rel, schema, level)

    def close(s: ParquetSink) -> None:
        sha = s.close()
        rel = str(s.path.relative_to(out))
        entries.append(FileEntry(path=rel, sha256=sha, bytes=s.path.stat().st_size, rows=s.rows))

    sink = open_next()
    for p in inputs:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=65_536):
            while batch.num_rows:
                room = AUDIT_ROWS_PER_FILE - sink.rows
                part, batch = batch.slice(0, room), batch.slice(room)
                sink.write(pa.Table.from_batches([part]))
                written += part.num_rows
                if sink.rows >= AUDIT_ROWS_PER_FILE and written < total:
                    close(sink)
                    k += 1
                    sink = open_next()
    close(sink)
    return entries


def audit_counts(out: Path, entries: list[FileEntry]) -> Counter[tuple[str, str]]:
    """(source, reason) -> rows, recounted from the audit files themselves."""
    c: Counter[tuple[str, str]] = Counter()
    for e in entries:
        t = pq.read_table(out / e.path, columns=["source", "reason"])
        for s, r in zip(t.column("source").to_pylist(), t.column("reason").to_pylist(), strict=True):
            c[(s, r)] += 1
    return c
