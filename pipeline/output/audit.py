"""The audit tables of a run: per-shard filtered/quarantine/pruned files merged into `audit/<name>/`.

Public so that every stage with something to account for (finalize, the semantic report, the
rewriter) merges and recounts audit rows the same way.

A merged table is cut into files of AUDIT_ROWS_PER_FILE rows. `plan_audit` decides, from the inputs'
Parquet footers alone (row counts), which row slice of which input files lands in each file; then
`write_audit_part` writes one file from its slice only. The parts are independent, so finalize runs one
unit per file (on any worker) and no process reads every audit row; `merge_audit` is the same in one
loop. Rows are copied in the pieces the one-process merge always used (READ_BATCH_ROWS-row batches of
each input, cut where a file ends), so the files are byte-identical however the parts are run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.parquet_io import ParquetSink
from schemas.manifest import FileEntry

AUDIT_ROWS_PER_FILE = 1_000_000
# Rows are copied in batches of this many rows of each input (counted from the input's first row):
# every batch becomes a row group of the merged file, so the figure is part of the published bytes.
READ_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class AuditSlice:
    """Rows [start, stop) of one input file (`path`: relative to the output folder, or absolute)."""

    path: str
    start: int
    stop: int


@dataclass(frozen=True)
class AuditPart:
    """File `index` of the `n_files` of audit table `name`: the input slices it holds, in order."""

    name: str
    index: int
    n_files: int
    slices: tuple[AuditSlice, ...]

    @property
    def path(self) -> str:
        """The file's path relative to the output folder."""
        return f"audit/{self.name}/{self.name}-{self.index:05d}-of-{self.n_files:05d}.parquet"

    @property
    def rows(self) -> int:
        return sum(s.stop - s.start for s in self.slices)


def plan_audit(
    out: Path, name: str, inputs: Sequence[str | Path], rows_per_file: int | None = None
) -> list[AuditPart]:
    """The files of audit table `name` and the input slices each holds: footers only, no row is read.

    File k holds the rows [k * rows_per_file, (k + 1) * rows_per_file) of the inputs concatenated in
    order (default AUDIT_ROWS_PER_FILE, read at call time); an empty table is one empty file (it still
    carries the schema).
    """
    rows_per_file = rows_per_file or AUDIT_ROWS_PER_FILE
    sizes = [pq.ParquetFile(out / p).metadata.num_rows for p in inputs]
    total = sum(sizes)
    n_files = max(1, -(-total // rows_per_file))
    parts: list[list[AuditSlice]] = [[] for _ in range(n_files)]
    offset = 0  # where the current input starts in the concatenation
    for p, n in zip(inputs, sizes, strict=True):
        row = 0
        while row < n:
            k = (offset + row) // rows_per_file
            stop = min(n, (k + 1) * rows_per_file - offset)
            parts[k].append(AuditSlice(str(p), row, stop))
            row = stop
        offset += n
    return [AuditPart(name, k, n_files, tuple(s)) for k, s in enumerate(parts)]


def read_slice(path: Path, start: int, stop: int) -> Iterator[pa.Table]:
    """Rows [start, stop) of the Parquet file at `path`, as one-chunk tables cut where the one-process
    merge cut them (at multiples of READ_BATCH_ROWS counted from the file's first row).

    Only the row groups that overlap the slice are read (the footer says where they are).
    """
    f = pq.ParquetFile(path)
    groups: list[int] = []
    first = None  # file row index of the first row of the first group read
    pos = 0
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if n and pos < stop and pos + n > start:
            groups.append(g)
            first = pos if first is None else first
        pos += n
    if first is None:
        return
    pending: list[pa.RecordBatch] = []
    pos = first
    piece_end = min(stop, (start // READ_BATCH_ROWS + 1) * READ_BATCH_ROWS)
    for batch in f.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups):
        end = pos + batch.num_rows
        lo = max(pos, start)
        while lo < min(end, stop):
            hi = min(end, piece_end)
            pending.append(batch.slice(lo - pos, hi - lo))
            lo = hi
            if hi == piece_end:
                # one chunk, as the one-process merge handed the writer: chunking shapes the pages
                yield pa.Table.from_batches(pending).combine_chunks()
                pending = []
                piece_end = min(stop, piece_end + READ_BATCH_ROWS)
        pos = end
        if pos >= stop:
            break


def write_audit_part(out: Path, part: AuditPart, schema: pa.Schema, level: int) -> FileEntry:
    """Write one file of an audit table (atomically) from its input slices; its manifest entry."""
    with ParquetSink(out / part.path, schema, level) as sink:
        for s in part.slices:
            for table in read_slice(out / s.path, s.start, s.stop):
                sink.write(table)
    final = out / part.path
    return FileEntry(path=part.path, sha256=str(sink.sha256), bytes=final.stat().st_size, rows=sink.rows)


def merge_audit(out: Path, name: str, schema: pa.Schema, inputs: list[Path], level: int) -> list[FileEntry]:
    """Concatenate per-shard audit files into `audit/<name>/` (a few large files, not thousands), in
    this process: `plan_audit` + `write_audit_part` for every file."""
    return [write_audit_part(out, part, schema, level) for part in plan_audit(out, name, inputs)]


def audit_counts(out: Path, entries: list[FileEntry]) -> Counter[tuple[str, str]]:
    """(source, reason) -> rows, recounted from the audit files themselves."""
    c: Counter[tuple[str, str]] = Counter()
    for e in entries:
        t = pq.read_table(out / e.path, columns=["source", "reason"])
        for s, r in zip(t.column("source").to_pylist(), t.column("reason").to_pylist(), strict=True):
            c[(s, r)] += 1
    return c
