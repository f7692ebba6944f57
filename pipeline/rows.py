"""Stage 3, one output shard at a time: fill rows from the layout and write them with lineage.

Token ids are gathered with numpy index arithmetic from the tokenized documents (no Python object
per token); lineage is built as Arrow struct columns. Each shard is written through a temporary name
and renamed into place, then recorded with its checksum, so a rerun skips it after verifying it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.faults import crash_point
from pipeline.parquet_io import ParquetSink, sha256_file, write_json_atomic
from pipeline.prepare import PrepareResult, tokenizer_for
from pipeline.progress import UnitProgress
from pipeline.select import SelectResult, TargetPlan
from pipeline.tokenizer import Tokenizer
from pipeline.workdir import WorkDir
from schemas.config import BuildConfig
from schemas.manifest import ShardEntry
from schemas.records import LINEAGE_TYPE, SEGMENT_TYPE, row_schema


def shard_path(plan: TargetPlan, k: int) -> str:
    """Output path of shard k, relative to the output folder (Hugging Face `train-` naming)."""
    return f"data/{plan.config_name}/train-{k:05d}-of-{plan.n_shards:05d}.parquet"


@dataclass
class _Docs:
    """The documents one chunk of rows draws from, gathered into flat arrays."""

    ids: np.ndarray  # int32, every needed document's tokens back to back
    base: np.ndarray  # int64 per needed document: where its tokens start in `ids`
    meta: pa.Table  # per needed document: lineage columns
    revision: list[str | None]


class DocumentStore:
    """Random access to tokenized documents by (shard, row), reading only the row groups needed."""

    COLUMNS = (
        "source",
        "uri",
        "record",
        "doc_id",
        "content_hash",
        "n_chars",
        "n_bytes",
        "n_tokens",
        "input_ids",
    )

    def __init__(self, work: WorkDir, prepared: list[PrepareResult]) -> None:
        self._paths = [work.prepare_dir / r.files["documents"] for r in prepared]
        self._revisions = [r.revision for r in prepared]
        self._files: dict[int, pq.ParquetFile] = {}

    def _file(self, shard: int) -> pq.ParquetFile:
        if shard not in self._files:
            self._files[shard] = pq.ParquetFile(self._paths[shard])
        return self._files[shard]

    def gather(self, shard: np.ndarray, row: np.ndarray) -> _Docs:
        """Documents for the given (shard, row) pairs, in that order."""
        parts: list[pa.Table] = []
        order: list[np.ndarray] = []
        revision: list[str | None] = [None] * len(shard)
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            f = self._file(int(s))
            rg_ends = np.cumsum([f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)])
            rows = row[where]
            groups = np.unique(np.searchsorted(rg_ends, rows, side="right"))
            table = f.read_row_groups(groups.tolist(), columns=list(self.COLUMNS))
            first_row = np.r_[0, rg_ends][groups]
            # position of each wanted row inside the concatenation of the groups read
            group_len = np.diff(np.r_[0, rg_ends])[groups]
            group_off = np.r_[0, np.cumsum(group_len)[:-1]]
            g_of_row = np.searchsorted(rg_ends[groups], rows, side="right")
            local = group_off[g_of_row] + (rows - first_row[g_of_row])
            parts.append(table.take(pa.array(local)))
            order.append(where)
            for j in where:
                revision[j] = self._revisions[int(s)]
        meta = pa.concat_tables(parts) if parts else pa.table({})
        inv = np.empty(len(shard), np.int64)
        inv[np.concatenate(order)] = np.arange(len(shard))
        meta = meta.take(pa.array(inv))
        ids_col = meta.column("input_ids").combine_chunks()
        flat = ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        offsets = ids_col.offsets.to_numpy().astype(np.int64)
        base = offsets[:-1] - offsets[0]
        return _Docs(flat, base, meta.drop_columns(["input_ids"]), revision)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    out_start = np.cumsum(lengths) - lengths
    return np.repeat(starts - out_start, lengths) + np.arange(total, dtype=np.int64)


def build_rows(
    cfg: BuildConfig,
    plan: TargetPlan,
    layout: pa.Table,
    docs: _Docs,
    first_row: int,
    n_rows: int,
    n_pad_last: int,
    tok: Tokenizer,
    sep_id: int,
    pad_id: int,
    lineage: dict,
) -> pa.Table:
    """Rows [first_row, first_row + n_rows) of a target, from their layout segments."""
    L = plan.target_length
    start = layout.column("start").to_numpy()
    end = layout.column("end").to_numpy()
    row = layout.column("row").to_numpy() - first_row
    row_start = layout.column("row_start").to_numpy()
    doc = np.arange(layout.num_rows)  # layout row j uses gathered document j
    n_tok = docs.meta.column("n_tokens").to_numpy()[doc]

    # footprint positions -> token ids: position p of a document is its token p, or the separator at p == n
    content_end = np.minimum(end, n_tok)
    content_len = np.maximum(content_end - start, 0)
    sep = end > n_tok
    foot_len = end - start
    ids_all = np.concatenate([docs.ids, np.array([sep_id, pad_id], np.int32)])
    SEP, PAD = len(docs.ids), len(docs.ids) + 1
    src = np.full(int(foot_len.sum()), SEP, np.int64)
    seg_out = np.cumsum(foot_len) - foot_len
    content_pos = _ranges(seg_out, content_len)
    src[content_pos] = _ranges(docs.base[doc] + start, content_len)
    flat = ids_all[src]
    if n_pad_last:
        flat = np.concatenate([flat, np.full(n_pad_last, ids_all[PAD], np.int32)])
    assert len(flat) == n_rows * L, "layout does not fill its rows exactly"
    row_offsets = np.arange(n_rows + 1, dtype=np.int32) * L
    input_ids = pa.ListArray.from_arrays(pa.array(row_offsets), pa.array(flat, pa.int32()))

    # spans in the source document; only split segments need per-token sums
    doc_start = np.minimum(start, n_tok)
    nb_tab, nc_tab = tok.token_nbytes, tok.token_nchars
    n_bytes = docs.meta.column("n_bytes").to_numpy()[doc]
    n_chars = docs.meta.column("n_chars").to_numpy()[doc]
    byte_start = np.zeros(len(doc), np.int64)
    byte_end = n_bytes.copy()
    char_start = np.zeros(len(doc), np.int64)
    char_end = n_chars.copy()
    partial = np.flatnonzero((doc_start > 0) | (content_end < n_tok))
    for j in partial:
        ids = docs.ids[docs.base[j] : docs.base[j] + n_tok[j]]
        a, c = int(doc_start[j]), int(content_end[j])
        head, body = ids[:a], ids[a:c]
        byte_start[j] = int(nb_tab[head].sum())
        byte_end[j] = byte_start[j] + int(nb_tab[body].sum())
        char_start[j] = int(nc_tab[head].sum())
        char_end[j] = char_start[j] + int(nc_tab[body].sum())
    is_split = (doc_start > 0) | (end < n_tok + 1)

    m = docs.meta
    segments = pa.StructArray.from_arrays(
        [
            m.column("source").combine_chunks(),
            m.column("uri").combine_chunks(),
            pa.array(docs.revision, pa.string()),
            m.column("record").combine_chunks(),
            m.column("doc_id").combine_chunks(),
            m.column("content_hash").combine_chunks(),
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
            pa.array([plan.strategy] * len(doc), pa.string()),
            layout.column("neighbor_similarity").combine_chunks(),
        ],
        fields=list(SEGMENT_TYPE),
    )
    seg_counts = np.bincount(row, minlength=n_rows)
    seg_offsets = np.r_[0, np.cumsum(seg_counts)].astype(np.int32)
    seg_lists = pa.ListArray.from_arrays(pa.array(seg_offsets), segments)

    n_pad = np.zeros(n_rows, np.int32)
    if n_pad_last:
        n_pad[-1] = n_pad_last
    columns: dict[str, pa.Array] = {
        "row_id": pa.array([f"{plan.config_name}-{first_row + i:09d}" for i in range(n_rows)], pa.string()),
        "input_ids": input_ids,
        "length": pa.array(np.full(n_rows, L, np.int32)),
        "target_length": pa.array(np.full(n_rows, L, np.int32)),
        "n_pad": pa.array(n_pad),
        "n_segments": pa.array(seg_counts.astype(np.int32)),
    }
    if cfg.output.store_text:
        columns["text"] = pa.array(
            [tok.decode(flat[i * L : (i + 1) * L - (n_pad[i] or 0)]) for i in range(n_rows)],
            pa.large_string(),
        )
    columns["segments"] = seg_lists
    columns["lineage"] = pa.array([lineage] * n_rows, LINEAGE_TYPE)
    return pa.table(columns, schema=row_schema(cfg.output.store_text))


def _read_layout_rows(path: Path, first_row: int, last_row: int) -> pa.Table:
    """Layout segments of rows [first_row, last_row), reading only what the filter needs."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(path, format="parquet")
    filt = (ds.field("row") >= first_row) & (ds.field("row") < last_row)
    t = dataset.to_table(filter=filt)
    return t.sort_by([("row", "ascending"), ("row_start", "ascending")])


@dataclass
class WrittenShard:
    """One output shard's manifest entry, and whether an earlier run's verified shard was kept."""

    entry: ShardEntry
    reused: bool


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


def write_output_shard(
    cfg: BuildConfig,
    work: WorkDir,
    selected: SelectResult,
    prepared: list[PrepareResult],
    target_index: int,
    k: int,
    steps: list[str],
    progress: UnitProgress | None = None,
) -> ShardEntry:
    """Write shard k of a target (or return its verified entry from an earlier run)."""
    return write_shard(cfg, work, selected, prepared, target_index, k, steps, progress).entry


def write_shard(
    cfg: BuildConfig,
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
    sep_id = tok.special_token_id(cfg.packing.separator)
    pad_id = tok.special_token_id(cfg.packing.pad_token or cfg.packing.separator)
    L = plan.target_length
    first = k * plan.rows_per_shard
    last = min(plan.n_rows, first + plan.rows_per_shard)
    rows_per_group = max(1, cfg.output.row_group_tokens // L)
    store = DocumentStore(work, prepared)
    layout_path = work.select_dir / plan.layout_file
    lineage = {
        "config_hash": work.config_hash,
        "tokenizer": tok.identity.name,
        "tokenizer_hash": tok.identity.vocab_hash,
        "longloom_version": __version__,
        "seed": cfg.run.seed,
        "steps": steps,
    }
    content = seps = pads = splits = 0
    doc_keys: set[tuple[int, int]] = set()
    with ParquetSink(final, row_schema(cfg.output.store_text), cfg.output.compression_level) as sink:
        for g0 in range(first, last, rows_per_group):
            g1 = min(last, g0 + rows_per_group)
            seg = _read_layout_rows(layout_path, g0, g1)
            shard_idx = seg.column("shard").to_numpy()
            doc_row = seg.column("doc_row").to_numpy()
            docs = store.gather(shard_idx, doc_row)
            pad_here = plan.last_row_pad if g1 == plan.n_rows else 0
            table = build_rows(cfg, plan, seg, docs, g0, g1 - g0, pad_here, tok, sep_id, pad_id, lineage)
            sink.write(table)
            segs = table.column("segments").combine_chunks().flatten()
            rs, re_ = (
                pc.cast(segs.field("row_token_start"), pa.int64()),
                pc.cast(segs.field("row_token_end"), pa.int64()),
            )
            content += int(pc.sum(pc.subtract(re_, rs)).as_py() or 0)
            seps += int(pc.sum(pc.cast(segs.field("separator_after"), pa.int64())).as_py() or 0)
            splits += int(pc.sum(pc.cast(segs.field("is_split"), pa.int64())).as_py() or 0)
            pads += pad_here
            doc_keys.update(zip(shard_idx.tolist(), doc_row.tolist(), strict=True))
            if progress is not None:
                progress({"rows": g1 - first, "tokens": (g1 - first) * L})
            crash_point("write")
    n = last - first
    entry = ShardEntry(
        path=rel,
        sha256=sha256_file(final),
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
    return WrittenShard(entry, reused=False)
