"""Stage 3, one output shard at a time: fill rows from the layout and write them with lineage.

Token ids are gathered with numpy index arithmetic from the tokenized documents (no Python object
per token); lineage is built as Arrow struct columns. Each shard is written through a temporary name
and renamed into place, then recorded with its checksum, so a rerun skips it after verifying it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.core.faults import crash_point
from pipeline.core.lineage import lineage_steps, run_lineage
from pipeline.core.parquet_io import (
    Background,
    ParquetSink,
    read_tokens_into,
    sha256_file,
    trim_heap,
    write_json_atomic,
)
from pipeline.core.progress import UnitProgress
from pipeline.core.results import (
    PrepareResult,
    SelectResult,
    TargetPlan,
    WrittenShard,
    output_units,
    shard_path,
)
from pipeline.core.tokenizer import Tokenizer, separator_and_pad, tokenizer_for
from pipeline.core.workdir import WorkDir
from pipeline.output.report import write_counts
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from schemas.manifest import ShardEntry, StageReport
from schemas.records import LINEAGE_TYPE, SEGMENT_TYPE, row_schema
from schemas.stage_config import WriteConfig


class DocumentStore:
    """Random access to tokenized documents by (shard, row): small per-document columns from the
    documents tables, token spans by positioned reads from the raw tokens files.

    Only the tokens a row uses are read, so the work of a write task is proportional to its rows
    whatever the corpus size, and nothing per token is held beyond the rows being built.
    """

    COLUMNS = (
        "source",
        "uri",
        "record",
        "doc_id",
        "content_hash",
        "n_chars",
        "n_bytes",
        "n_tokens",
        "token_start",
    )
    # Row groups of the documents tables (one per prepare batch, ~1-10K documents) and open files
    # are kept, least recently used dropped first. A row group of output rows touches a median of 8
    # input shards (up to all of them at the end, where leftovers from long-open rows close); the cap
    # in documents (~50 MB of lineage columns) bounds a write task's memory whatever the size of an
    # input shard or of the corpus.
    MAX_OPEN_SHARDS = 64
    MAX_CACHED_DOCS = 262_144
    CHECKPOINT = 4096  # tokens between cached byte/char prefix sums of a split document
    MAX_CHECKPOINTED = 1024  # split documents whose prefix sums are cached

    def __init__(self, work: WorkDir, prepared: list[PrepareResult]) -> None:
        self._doc_paths = [work.prepare_dir / r.files["documents"] for r in prepared]
        self._token_paths = [work.prepare_dir / r.files["tokens"] for r in prepared]
        self._revisions = [r.revision for r in prepared]
        self._group_starts: dict[int, np.ndarray] = {}  # shard -> first row of each row group
        self._meta: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._cached_docs = 0
        self._tables: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._prefix: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._codes: np.ndarray | None = None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for pf in self._tables.values():
            pf.close()
        self._tables.clear()

    def __enter__(self) -> DocumentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _table(self, shard: int) -> pq.ParquetFile:
        if shard in self._tables:
            self._tables.move_to_end(shard)
            return self._tables[shard]
        pf = pq.ParquetFile(self._doc_paths[shard])
        self._tables[shard] = pf
        if shard not in self._group_starts:
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self._group_starts[shard] = np.r_[0, np.cumsum(sizes, dtype=np.int64)]
        if len(self._tables) > self.MAX_OPEN_SHARDS:
            self._tables.popitem(last=False)[1].close()
        return pf

    def _group_meta(self, shard: int, group: int) -> pa.Table:
        key = (shard, group)
        if key in self._meta:
            self._meta.move_to_end(key)
            return self._meta[key]
        table = self._table(shard).read_row_group(group, columns=list(self.COLUMNS)).combine_chunks()
        self._meta[key] = table
        self._cached_docs += table.num_rows
        while len(self._meta) > 1 and self._cached_docs > self.MAX_CACHED_DOCS:
            self._cached_docs -= self._meta.popitem(last=False)[1].num_rows
        return table

    def _shard_meta(self, shard: int, rows: np.ndarray) -> tuple[list[pa.Table], list[np.ndarray]]:
        """The rows' per-document columns, in parts by row group, and the positions in `rows` of each part."""
        if shard not in self._group_starts:
            self._table(shard)
        starts = self._group_starts[shard]
        group = np.searchsorted(starts, rows, side="right") - 1
        parts, where = [], []
        for g in np.unique(group).tolist():
            mine = np.flatnonzero(group == g)
            parts.append(self._group_meta(shard, g).take(pa.array(rows[mine] - starts[g])))
            where.append(mine)
        return parts, where

    def _fd(self, shard: int) -> int:
        if shard in self._fds:
            self._fds.move_to_end(shard)
            return self._fds[shard]
        fd = os.open(self._token_paths[shard], os.O_RDONLY)
        self._fds[shard] = fd
        if len(self._fds) > self.MAX_OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def meta(self, shard: np.ndarray, row: np.ndarray) -> tuple[pa.Table, list[str | None]]:
        """Per-document columns and input revisions for the given (shard, row) pairs, in that order."""
        parts: list[pa.Table] = []
        order: list[np.ndarray] = []
        revision: list[str | None] = [None] * len(shard)
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            group_parts, group_where = self._shard_meta(int(s), row[where])
            parts.extend(group_parts)
            order.extend(where[w] for w in group_where)
            rev = self._revisions[int(s)]
            for j in where.tolist():
                revision[j] = rev
        if not parts:
            return pa.table({c: pa.array([], pa.int64()) for c in self.COLUMNS}), revision
        meta = pa.concat_tables(parts)
        inv = np.empty(len(shard), np.int64)
        inv[np.concatenate(order)] = np.arange(len(shard))
        return meta.take(pa.array(inv)).combine_chunks(), revision

    def read(self, shard: int, token_offset: int, n: int) -> np.ndarray:
        out = np.empty(n, np.int32)
        if n:
            read_tokens_into(self._fd(shard), out, token_offset)
        return out

    def fill(
        self, out: np.ndarray, dest: np.ndarray, shard: np.ndarray, src: np.ndarray, length: np.ndarray
    ) -> None:
        """out[dest[j] : dest[j] + length[j]] = tokens [src[j], src[j] + length[j]) of shard[j]'s file.

        Spans close together in a file are fetched with one read (packing mostly keeps input order).
        """
        live = np.flatnonzero(length > 0)
        for s in np.unique(shard[live]):
            mine = live[shard[live] == s]
            mine = mine[np.argsort(src[mine], kind="stable")]
            a, n = src[mine], length[mine]
            # a new read starts where the next span begins more than _GAP tokens past the current end
            run_end = np.maximum.accumulate(a + n)
            new_run = np.r_[True, a[1:] > run_end[:-1] + _GAP]
            starts = np.flatnonzero(new_run)
            stops = np.r_[starts[1:], len(mine)]
            fd = self._fd(int(s))
            for r0, r1 in zip(starts.tolist(), stops.tolist(), strict=True):
                base = int(a[r0])
                buf = np.empty(int(run_end[r1 - 1]) - base, np.int32)
                read_tokens_into(fd, buf, base)
                for j, x, m in zip(mine[r0:r1].tolist(), a[r0:r1].tolist(), n[r0:r1].tolist(), strict=True):
                    o = int(dest[j])
                    out[o : o + m] = buf[x - base : x - base + m]

    def _span_codes(self, tok: Tokenizer) -> np.ndarray:
        """Per token id: UTF-8 bytes in the low 32 bits, characters started in the high 32 bits.

        One gather and one sum then give both span lengths (a 4096-token block sums far below 2**32).
        """
        if self._codes is None:
            self._codes = tok.token_nbytes | (tok.token_nchars << 32)
        return self._codes

    def prefix_sums(self, shard: int, token_start: int, n_tok: int, tok: Tokenizer) -> np.ndarray:
        """Packed (bytes, characters) before every CHECKPOINT-th token of a document (cached)."""
        key = (shard, token_start)
        if key in self._prefix:
            self._prefix.move_to_end(key)
            return self._prefix[key]
        step = self.CHECKPOINT
        codes = self._span_codes(tok)
        ck = np.zeros(n_tok // step + 1, np.int64)
        block = step * 256  # read a long document in bounded blocks
        for b0 in range(0, n_tok, block):
            ids = self.read(shard, token_start + b0, min(block, n_tok - b0))
            full = len(ids) // step
            if full:
                k0 = b0 // step
                ck[k0 + 1 : k0 + 1 + full] = codes[ids[: full * step].reshape(full, step)].sum(axis=1)
        np.cumsum(ck, out=ck)  # bytes and characters each stay far below 2**31 per document
        self._prefix[key] = ck
        if len(self._prefix) > self.MAX_CHECKPOINTED:
            self._prefix.popitem(last=False)
        return ck

    def span_before(
        self, shard: int, token_start: int, n_tok: int, pos: int, tok: Tokenizer
    ) -> tuple[int, int]:
        """(UTF-8 bytes, characters) of a document's first `pos` tokens."""
        if pos == 0:
            return 0, 0
        ck = self.prefix_sums(shard, token_start, n_tok, tok)
        k = pos // self.CHECKPOINT
        rest = self.read(shard, token_start + k * self.CHECKPOINT, pos - k * self.CHECKPOINT)
        packed = int(ck[k]) + int(self._span_codes(tok)[rest].sum())
        return packed & 0xFFFFFFFF, packed >> 32


_GAP = 1024  # tokens: spans closer than this (4 KiB) in a tokens file are read together


@dataclass
class RowStats:
    content: int = 0
    separators: int = 0
    pads: int = 0
    splits: int = 0


def build_rows(
    cfg: WriteConfig,
    plan: TargetPlan,
    layout: pa.Table,
    store: DocumentStore,
    first_row: int,
    n_rows: int,
    n_pad_last: int,
    tok: Tokenizer,
    sep_id: int,
    pad_id: int,
    lineage: dict,
    stats: RowStats,
) -> pa.Table:
    """Rows [first_row, first_row + n_rows) of a target, from their layout segments."""
    L = plan.target_length
    shard = layout.column("shard").to_numpy()
    start = layout.column("start").to_numpy()
    end = layout.column("end").to_numpy()
    row = layout.column("row").to_numpy() - first_row
    row_start = layout.column("row_start").to_numpy()
    meta, revision = store.meta(shard, layout.column("doc_row").to_numpy())
    n_tok = meta.column("n_tokens").to_numpy()
    tok_start = meta.column("token_start").to_numpy()

    # footprint positions -> token ids: position p of a document is its token p, or the separator at p == n
    content_end = np.minimum(end, n_tok)
    content_len = np.maximum(content_end - start, 0)
    sep = end > n_tok
    foot_len = end - start
    # any row may end in padding (packing's cutting rule), so segments go to their row's offset
    seg_out = row * L + row_start
    n_pad = (L - np.bincount(row, weights=foot_len, minlength=n_rows)).astype(np.int32)
    assert np.all(n_pad >= 0) and n_pad_last in (0, int(n_pad[-1])), "layout does not fit its rows"
    flat = np.full(n_rows * L, pad_id, np.int32)
    flat[(seg_out + content_len)[sep]] = sep_id
    store.fill(flat, seg_out, shard, tok_start + start, content_len)
    row_offsets = np.arange(n_rows + 1, dtype=np.int32) * L
    input_ids = pa.ListArray.from_arrays(pa.array(row_offsets), pa.array(flat, pa.int32()))

    # spans in the source document; only split segments need per-token sums
    doc_start = np.minimum(start, n_tok)
    byte_start = np.zeros(len(start), np.int64)
    byte_end = meta.column("n_bytes").to_numpy().copy()
    char_start = np.zeros(len(start), np.int64)
    char_end = meta.column("n_chars").to_numpy().copy()
    partial = np.flatnonzero((doc_start > 0) | (content_end < n_tok))
    for j in partial.tolist():
        s_j, t_j, n_j = int(shard[j]), int(tok_start[j]), int(n_tok[j])
        byte_start[j], char_start[j] = store.span_before(s_j, t_j, n_j, int(doc_start[j]), tok)
        byte_end[j], char_end[j] = store.span_before(s_j, t_j, n_j, int(content_end[j]), tok)
    is_split = (doc_start > 0) | (end < n_tok + 1)

    segments = pa.StructArray.from_arrays(
        [
            meta.column("source").combine_chunks(),
            meta.column("uri").combine_chunks(),
            pa.array(revision, pa.string()),
            meta.column("record").combine_chunks(),
            meta.column("doc_id").combine_chunks(),
            meta.column("content_hash").combine_chunks(),
            pa.array(char_start),
            pa.array(char_end),
            pa.array(byte_start),
            pa.array(byte_end),
            pa.array(doc_start),
            pa.array(content_end),
            pa.array(n_tok),
            pa.array(row_start.astype(np.int32)),
            pa.array((row_start + content_len).astype(np.int32)),
            pa.array(sep),
            pa.array(is_split),
            layout.column("part").combine_chunks(),
            pa.array([plan.strategy] * len(start), pa.string()),
            layout.column("neighbor_similarity").combine_chunks(),
        ],
        fields=list(SEGMENT_TYPE),
    )
    seg_counts = np.bincount(row, minlength=n_rows)
    seg_offsets = np.r_[0, np.cumsum(seg_counts)].astype(np.int32)
    seg_lists = pa.ListArray.from_arrays(pa.array(seg_offsets), segments)

    columns: dict[str, pa.Array] = {
        "row_id": pa.array([f"{plan.config_name}-{first_row + i:09d}" for i in range(n_rows)], pa.string()),
        "input_ids": input_ids,
        "length": pa.array(np.full(n_rows, L, np.int32)),
        "target_length": pa.array(np.full(n_rows, L, np.int32)),
        "n_pad": pa.array(n_pad),
        "n_segments": pa.array(seg_counts.astype(np.int32)),
    }
    columns.update(_boundary_columns(cfg.output.boundary_columns, row, row_start, foot_len, n_rows, L))
    if cfg.output.store_text:
        columns["text"] = pa.array(
            [tok.decode(flat[i * L : (i + 1) * L - (n_pad[i] or 0)]) for i in range(n_rows)],
            pa.large_string(),
        )
    columns["segments"] = seg_lists
    columns["lineage"] = pa.array([lineage] * n_rows, LINEAGE_TYPE)
    stats.content += int(content_len.sum())
    stats.separators += int(sep.sum())
    stats.splits += int(is_split.sum())
    stats.pads += int(n_pad.sum())
    return pa.table(columns, schema=row_schema(cfg.output.store_text, cfg.output.boundary_columns))


def _boundary_columns(
    wanted: Sequence[str], row: np.ndarray, row_start: np.ndarray, foot_len: np.ndarray, n_rows: int, L: int
) -> dict[str, pa.Array]:
    """`cu_seqlens` / `position_ids` of each row from its segments' footprints (a document with its
    separator is one sequence, the padding one more), as `output.boundary_columns` asks."""
    if not wanted:
        return {}
    from pipeline.output.export import boundaries

    cus: list[np.ndarray] = []
    pids: list[np.ndarray] = []
    order = np.lexsort((row_start, row))
    bounds = np.searchsorted(row[order], np.arange(n_rows + 1))
    for r in range(n_rows):
        idx = order[bounds[r] : bounds[r + 1]]
        cu, pid = boundaries(row_start[idx], row_start[idx] + foot_len[idx], L)
        cus.append(cu)
        if "position_ids" in wanted:
            pids.append(pid)

    def as_list(parts: list[np.ndarray]) -> pa.Array:
        offs = np.zeros(len(parts) + 1, np.int32)
        np.cumsum([len(p) for p in parts], out=offs[1:])
        values = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        return pa.ListArray.from_arrays(pa.array(offs), pa.array(values, pa.int32()))

    out: dict[str, pa.Array] = {}
    if "cu_seqlens" in wanted:
        out["cu_seqlens"] = as_list(cus)
    if "position_ids" in wanted:
        out["position_ids"] = as_list(pids)
    return out


def _read_layout_rows(path: Path, first_row: int, last_row: int) -> pa.Table:
    """Layout segments of rows [first_row, last_row), sorted by (row, row_start)."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(path, format="parquet")
    filt = (ds.field("row") >= first_row) & (ds.field("row") < last_row)
    t = dataset.to_table(filter=filt)
    return t.sort_by([("row", "ascending"), ("row_start", "ascending")])


def unit_key(selected: SelectResult, plan: TargetPlan) -> str:
    """What a shard's bytes depend on beyond the config: the documents and the layout they were cut by."""
    blob = f"{selected.inputs_key}|{plan.layout_sha256}|{plan.n_shards}|{plan.rows_per_shard}"
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _verified_entry(record: Path, final: Path, key: str) -> ShardEntry | None:
    """The recorded entry, if it belongs to this layout and the file on disk still has its checksum."""
    if not (record.exists() and final.exists()):
        return None
    try:
        saved = json.loads(record.read_text())
        if saved.get("key") != key:
            return None
        entry = ShardEntry.model_validate(saved["entry"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return entry if sha256_file(final) == entry.sha256 else None


def _write_and_release(sink: ParquetSink, table: pa.Table) -> None:
    sink.write(table)
    pa.default_memory_pool().release_unused()


def write_shard(
    cfg: WriteConfig,
    work: WorkDir,
    selected: SelectResult,
    prepared: list[PrepareResult],
    target_index: int,
    k: int,
    steps: list[str],
    progress: UnitProgress | None = None,
) -> WrittenShard:
    """Write shard k of a target, or keep the one an earlier run wrote if its record and checksum verify.

    `progress`, if given, is called after every row group with the rows written so far.
    """
    plan = selected.targets[target_index]
    rel = shard_path(plan, k)
    record = work.written_record(plan.config_name, k)
    final = work.out / rel
    key = unit_key(selected, plan)
    previous = _verified_entry(record, final, key)
    if previous is not None:
        return WrittenShard(previous, reused=True)
    tok = tokenizer_for(cfg)
    sep_id, pad_id = (
        tok.special_token_id(t) for t in separator_and_pad(tok, cfg.packing.separator, cfg.packing.pad_token)
    )
    L = plan.target_length
    first = k * plan.rows_per_shard
    last = min(plan.n_rows, first + plan.rows_per_shard)
    rows_per_group = max(1, cfg.output.row_group_tokens // L)
    lineage = run_lineage(cfg, work, tok, steps)
    stats = RowStats()
    doc_keys: set[tuple[int, int]] = set()
    layout = _read_layout_rows(work.select_dir / plan.layout_file, first, last)
    seg_row = layout.column("row").to_numpy()
    # Row group k+1 is built while the writer thread compresses and writes row group k.
    with (
        DocumentStore(work, prepared) as store,
        ParquetSink(
            final,
            row_schema(cfg.output.store_text, cfg.output.boundary_columns),
            cfg.output.compression_level,
        ) as sink,
        Background(depth=1, name="longloom-write") as io,
    ):
        for g0 in range(first, last, rows_per_group):
            g1 = min(last, g0 + rows_per_group)
            seg = layout.slice(
                int(np.searchsorted(seg_row, g0)),
                int(np.searchsorted(seg_row, g1) - np.searchsorted(seg_row, g0)),
            )
            pad_here = plan.last_row_pad if g1 == plan.n_rows else 0
            table = build_rows(
                cfg, plan, seg, store, g0, g1 - g0, pad_here, tok, sep_id, pad_id, lineage, stats
            )
            io.submit(_write_and_release, sink, table)
            shard_idx = seg.column("shard").to_numpy()
            doc_row = seg.column("doc_row").to_numpy()
            doc_keys.update(zip(shard_idx.tolist(), doc_row.tolist(), strict=True))
            if progress is not None:
                progress({"rows": g1 - first, "tokens": (g1 - first) * L})
            crash_point("write")
    content, seps, pads, splits = stats.content, stats.separators, stats.pads, stats.splits
    n = last - first
    entry = ShardEntry(
        path=rel,
        sha256=str(sink.sha256),
        bytes=final.stat().st_size,
        rows=n,
        tokens=n * L,
        content_tokens=content,
        separator_tokens=seps,
        pad_tokens=pads,
        documents=len(doc_keys),
        split_segments=splits,
    )
    assert content + seps + pads == n * L, f"{rel}: tokens do not add up"
    write_json_atomic(record, {"key": key, "entry": entry.model_dump()})
    crash_point("written")
    trim_heap()
    return WrittenShard(entry, reused=False)


class WriteStage(Stage):
    """Fill each output shard's rows from the layouts (`pipeline.stages.write`)."""

    name = "write"
    sections = ("tokenizer", "packing", "output")
    inputs = ("prepare", "select")
    config_type = WriteConfig
    task_name = "write-shard"

    def work_dir(self, ctx: RunContext) -> Path:
        return ctx.work.select_dir  # its verified shard records sit with the layouts they fill

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Write(self, ctx, inputs)


class _Write(StageWork[tuple[int, int], WrittenShard]):
    def __init__(self, stage: Stage, ctx: RunContext, inputs: Inputs) -> None:
        super().__init__(stage, ctx, inputs)
        self.steps = lineage_steps(inputs["prepare"], inputs["select"])

    def units(self) -> list[tuple[int, int]]:
        return output_units(self.inputs["select"])

    def run_unit(self, unit: tuple[int, int], progress: UnitProgress | None = None) -> WrittenShard:
        ti, k = unit
        return write_shard(
            self.cfg,
            self.ctx.work,
            self.inputs["select"],
            self.inputs["prepare"],
            ti,
            k,
            self.steps,
            progress,
        )

    def needs(self, unit: tuple[int, int]) -> list[Path]:
        """The shard's layout, the prepared shards its rows draw from (read from the layout), and its
        own file and record (the reuse check): never every prepared shard."""
        ti, k = unit
        selected, work = self.inputs["select"], self.ctx.work
        plan = selected.targets[ti]
        layout = work.select_dir / plan.layout_file
        storage.fetch(self.ctx.cfg.output.dir, [layout])
        first = k * plan.rows_per_shard
        rows = _read_layout_rows(layout, first, min(plan.n_rows, first + plan.rows_per_shard))
        prepared = self.inputs["prepare"]
        drawn = [prepared[int(i)] for i in np.unique(rows.column("shard").to_numpy())]
        files = [work.prepare_dir / r.files[kind] for r in drawn for kind in ("documents", "tokens")]
        return [layout, *files, work.out / shard_path(plan, k), work.written_record(plan.config_name, k)]

    def report(self, merged: list[WrittenShard]) -> StageReport:
        return write_counts(self.inputs["select"], [w.entry for w in merged])

    def label(self, unit: tuple[int, int]) -> str:
        ti, k = unit
        return f"{self.inputs['select'].targets[ti].config_name}/{k}"

    def advance(self, w: WrittenShard) -> tuple[str, dict[str, int]]:
        return w.entry.path, {"rows": w.entry.rows}

    def log_line(self, w: WrittenShard) -> str:
        e = w.entry
        return f"{'kept verified' if w.reused else 'wrote'} {e.path}: {e.rows} rows, {e.tokens} tokens"
