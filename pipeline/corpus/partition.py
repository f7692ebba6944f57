"""Partitioned selection: the select stage as P hash-partition units and one streaming layout pass.

`pipeline.stages.select.select_and_layout` loads every document of the corpus into one `DocIndex`
(doc ids as Python strings, hashes as 64-byte hex), so its memory grows with the corpus. This module
makes the same decisions with memory bounded by a partition or by a shard (`run.select_partitions`),
and reads every shard's hashes once in all (not once per partition):

0. **Scatter units** (`scatter_shard`, one per prepared shard, independent; the `scatter` stage,
   `pipeline/stages/scatter.py`). A unit reads its shard's `doc_id`, `content_hash` and `n_tokens`
   columns once and writes one small file per partition: the rows whose hash falls in that
   partition (bytes 8..16 of the sha256, modulo P, so every copy of a text lands in one partition),
   in canonical row order, with the hash as 32 raw bytes. Its record (written last) holds each
   file's sha256, so resume reuses verified files and a killed unit leaves no record.
1. **Partition units** (`dedup_partition`, one per partition, independent: run them on any worker).
   A unit reads only its partition's scatter files (one per shard, never a documents file), and
   decides exact duplicates by the single-process rule: the first copy in canonical order (shard,
   row) is kept. It writes its duplicates (sorted by shard, row, with the keeper's doc id) and, for
   sources with a token budget, its surviving documents' budget keys (source, u, shard, row,
   n_tokens; u is `stable_uniform` of the hash) sorted by that key, plus a histogram of tokens over
   u per budgeted source.
2. **Budget cut** (`budget_cuts`, small): the single-process rule keeps the prefix of a source's
   documents in (u, canonical) order whose token sum stays within the budget. The histograms find the
   bin where the sum crosses the budget; only that bin's rows are read back from every partition and
   sorted, giving the exact last kept key (u, shard, row). A document survives iff its key <= the cut.
3. **Layout pass** (`layout_pass`): the shards in canonical order, each read once (n_tokens and the
   hash), with the partitions' duplicates merged in by shard (one cursor per partition file); routing
   to targets and packing are streams over canonical order (`GreedyPacker`, `BestFitPacker`), whose
   finished rows are spilled to disk as int64 columns; each layout file is then written from the
   spill. Budget drops are written in the rule's (u, canonical) order through an external sort: one
   pass over the source's shards spills them to u-buckets with their lineage, then bucket by bucket.
   No step holds a Python object per document.

What is byte-identical to the single-process run (tests/test_partition.py checks it for P = 1, 3, 8):
the layouts, the `filtered` table (same rows, same order, same row groups), and the SelectResult but
for `seconds`. SemDeDup/D4 run as units of their own before the merge (`pipeline.stages.semantic_*`,
`pipeline.corpus.semantic.partitioned`); their drops enter the merge through the `ExtraDrops` hook,
after the exact duplicates and before the budgets. Not supported partitioned (a clear ConfigError):
`packing.strategy: similarity` and `packing.doc_order: shuffle` (a permutation of all documents).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.faults import crash_point
from pipeline.core.packing import BestFitPacker, GreedyPacker, Packer
from pipeline.core.parquet_io import ParquetSink, sha256_file, trim_heap, write_json_atomic
from pipeline.core.results import PrepareResult, SelectResult, TargetPlan, inputs_key
from pipeline.core.results import load_verified_selection as load_verified  # the single path's reuse rule
from pipeline.core.workdir import WorkDir
from pipeline.corpus.filters import stable_uniform_u64
from pipeline.corpus.index import config_name
from schemas.config import ConfigError
from schemas.records import FILTERED_SCHEMA, LAYOUT_SCHEMA
from schemas.stage_config import SelectConfig

# Rows per row group of the layout and `filtered` files, in both select paths (select.py writes its
# tables in chunks of it too, so the files stay byte-identical). Not pyarrow's default of 1,048,576:
# the merge holds one row group while writing it, and a million `filtered` rows with their lineage
# strings were the part of its memory that grew with the corpus (bench/bench_select_scale.py).
ROW_GROUP = 1 << 16
BINS = 1 << 16  # histogram bins over u for the budget cut
BATCH = 1 << 13  # rows per row group and batch of partition files: the merge holds one per partition
DEDUP_STEP, BUDGET_STEP = "exact_dedup@1", "source_budget@1"
_NIBBLE = np.full(256, 255, np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)

DUPS_SCHEMA = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("keeper", pa.string())])
BUDGET_SCHEMA = pa.schema(
    [
        ("source", pa.int32()),
        ("u", pa.float64()),
        ("shard", pa.int32()),
        ("row", pa.int64()),
        ("n_tokens", pa.int64()),
    ]
)


def check_partitioned(cfg: SelectConfig) -> None:
    """What the partitioned path cannot do yet, as one clear error before any work."""
    P = cfg.run.select_partitions
    why = []
    if cfg.packing.strategy == "similarity":
        why.append("packing.strategy: similarity orders the whole corpus")
    if cfg.packing.doc_order == "shuffle":
        why.append("packing.doc_order: shuffle permutes the whole corpus")
    ld = cfg.long_dependency
    if ld.enabled and (ld.filters_any() or ld.route == "longest_first"):
        why.append("long_dependency filters and routing rank the whole corpus")
    if why:
        raise ConfigError(
            f"run.select_partitions={P}: {'; '.join(why)}. Set run.select_partitions: 1 for this config"
        )


def hash_bytes(col: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
    """(n, 32) uint8 from a column of 64-character hex sha256 strings, vectorized."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    arr = arr.cast(pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros((0, 32), np.uint8)
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset : arr.offset + n + 1]
    bad = np.flatnonzero(np.diff(offsets) != 64)
    if arr.null_count or len(bad):
        row = (
            int(bad[0]) if len(bad) else int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        )
        raise ValueError(
            f"{where}: row {row}: content_hash is not a 64-character hex sha256; rerun the prepare stage"
        )
    chars = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(n, 64)
    nib = _NIBBLE[chars]
    if (nib == 255).any():
        row = int(np.flatnonzero((nib == 255).any(axis=1))[0])
        raise ValueError(f"{where}: row {row}: content_hash has a non-hex character; rerun the prepare stage")
    return ((nib[:, 0::2] << 4) | nib[:, 1::2]).astype(np.uint8)


def _u64(raw: np.ndarray, lo: int) -> np.ndarray:
    """Bytes [lo, lo+8) of each hash as a big-endian uint64."""
    return np.ascontiguousarray(raw[:, lo : lo + 8]).view(">u8").ravel().astype(np.uint64)


def partition_of(raw: np.ndarray, P: int) -> np.ndarray:
    # bytes 8..16: independent of bytes 0..8, which the budget's uniform numbers are made from
    return (_u64(raw, 8) % np.uint64(P)).astype(np.int64)


def budget_u(cfg: SelectConfig, source: str, raw: np.ndarray) -> np.ndarray:
    return stable_uniform_u64(cfg.run.seed, f"source_budget@1/{source}", _u64(raw, 0))


def docs_path(work: WorkDir, res: PrepareResult) -> Path:
    return work.prepare_dir / res.files["documents"]


def part_dir(work: WorkDir, P: int) -> Path:
    return work.select_dir / f"partitions-{P}"


SCATTER_SCHEMA = pa.schema(
    [("hash", pa.binary(32)), ("row", pa.int64()), ("n_tokens", pa.int64()), ("doc_id", pa.string())]
)


def scatter_dir(work: WorkDir, P: int) -> Path:
    return part_dir(work, P) / "scatter"


def scatter_file(work: WorkDir, P: int, p: int, si: int) -> Path:
    # a folder per partition: a partition unit lists one folder; no folder holds P x shards files
    return scatter_dir(work, P) / f"p{p:05d}" / f"s{si:05d}.parquet"


@dataclass
class ScatterResult:
    """What one scatter unit wrote: its shard's rows split by partition; persisted as its record."""

    shard: int
    shard_id: str
    partitions: int
    documents_sha256: str  # the documents file it was made from: the unit's key
    documents: int
    rows: list[int]  # rows per partition
    sha256: list[str]  # per partition file
    seconds: float = 0.0
    peak_rss: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def scatter_shard(cfg: SelectConfig, work: WorkDir, prepared: list[PrepareResult], si: int) -> ScatterResult:
    """One scatter unit: shard `si`'s (doc_id, hash, n_tokens) split into one file per partition."""
    P = cfg.run.select_partitions
    res = prepared[si]
    rec = scatter_dir(work, P) / f"s{si:05d}.json"
    key = res.sha256.get("documents", "")
    prev = _load_scatter(work, rec, si, P, key)
    if prev is not None:
        return prev
    started = time.perf_counter()
    path = docs_path(work, res)
    t = pq.read_table(path, columns=["doc_id", "content_hash", "n_tokens"])
    raw = hash_bytes(t.column("content_hash"), str(path))
    part = partition_of(raw, P)
    order = np.argsort(part, kind="stable")  # by partition; canonical (row) order within one
    bounds = np.searchsorted(part[order], np.arange(P + 1))
    ntok = t.column("n_tokens").to_numpy().astype(np.int64)
    doc_id = t.column("doc_id")
    rows, shas = [], []
    for p in range(P):
        idx = order[bounds[p] : bounds[p + 1]]
        h = raw[idx]
        table = pa.table(
            [
                pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(32), len(idx), [None, pa.py_buffer(h.tobytes())]
                ),
                pa.array(idx.astype(np.int64)),
                pa.array(ntok[idx]),
                doc_id.take(pa.array(idx)),
            ],
            schema=SCATTER_SCHEMA,
        )
        # not durable: the record's checksums are verified before a file is reused
        with ParquetSink(scatter_file(work, P, p, si), SCATTER_SCHEMA, durable=False) as sink:
            sink.write(table)
        rows.append(len(idx))
        shas.append(sink.sha256 or "")
    out = ScatterResult(
        shard=si,
        shard_id=res.shard_id,
        partitions=P,
        documents_sha256=key,
        documents=t.num_rows,
        rows=rows,
        sha256=shas,
        seconds=round(time.perf_counter() - started, 3),
        peak_rss=_peak_rss(),
    )
    crash_point("scatter")
    write_json_atomic(rec, out.to_json())
    trim_heap()
    return out


def _load_scatter(work: WorkDir, rec: Path, si: int, P: int, key: str) -> ScatterResult | None:
    if not rec.exists():
        return None
    try:
        r = ScatterResult(**json.loads(rec.read_text()))
    except (ValueError, TypeError):
        return None
    if (r.shard, r.partitions, r.documents_sha256) != (si, P, key) or len(r.sha256) != P:
        return None
    for p, want in enumerate(r.sha256):
        f = scatter_file(work, P, p, si)
        if not f.exists() or sha256_file(f) != want:
            return None
    return r


def read_scattered(work: WorkDir, P: int, p: int, scattered: list[ScatterResult]) -> pa.Table:
    """Partition `p`'s rows of every shard, in canonical order, with a `shard` column; each file is
    checked against its scatter record (a worker reads what the scatter unit wrote, or fails)."""
    parts = []
    for r in scattered:
        f = scatter_file(work, P, p, r.shard)
        data = f.read_bytes()
        if hashlib.sha256(data).hexdigest() != r.sha256[p]:
            raise RuntimeError(
                f"{f}: does not match its scatter record (shard {r.shard_id}); delete "
                f"{scatter_dir(work, P) / f's{r.shard:05d}.json'} and rerun the build"
            )
        t = pq.read_table(pa.BufferReader(data))
        parts.append(t.append_column("shard", pa.array(np.full(t.num_rows, r.shard, np.int32))))
    if not parts:
        return SCATTER_SCHEMA.empty_table().append_column("shard", pa.array([], pa.int32()))
    return pa.concat_tables(parts)


def _raw_of(col: pa.ChunkedArray) -> np.ndarray:
    """(n, 32) uint8 from a fixed_size_binary(32) column."""
    arr = col.combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, 32), np.uint8)
    buf = np.frombuffer(arr.buffers()[1], np.uint8)
    return buf[arr.offset * 32 : (arr.offset + len(arr)) * 32].reshape(len(arr), 32)


@dataclass
class PartitionResult:
    """What one partition unit decided; persisted as its record."""

    partition: int
    partitions: int
    inputs_key: str
    documents: int
    duplicates: int
    dups_file: str
    budget_file: str
    hist_file: str
    seconds: float = 0.0
    peak_rss: int = 0
    sha256: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _budgeted(cfg: SelectConfig, sources: list[str]) -> dict[int, int]:
    out = {}
    for i, s in enumerate(sources):
        b = cfg.source(s).token_budget
        if b is not None:
            out[i] = int(b)
    return out


def dedup_partition(
    cfg: SelectConfig,
    work: WorkDir,
    prepared: list[PrepareResult],
    p: int,
    inputs_key: str,
    scattered: list[ScatterResult],
) -> PartitionResult:
    """One partition unit: exact duplicates among the documents whose hash falls in partition `p`,
    read from the scatter units' files of that partition (no documents file is opened)."""
    P = cfg.run.select_partitions
    folder = part_dir(work, P)
    rec = folder / f"part-{p:05d}.json"
    prev = _load_unit(folder, rec, inputs_key)
    if prev is not None:
        return prev
    started = time.perf_counter()
    sources = [s.name for s in cfg.sources]
    budgeted = _budgeted(cfg, sources)
    scattered = sorted(scattered, key=lambda r: r.shard)
    if [r.shard for r in scattered] != list(range(len(prepared))) or any(
        r.partitions != P for r in scattered
    ):
        raise RuntimeError(
            f"select partition {p}: expected the scatter results of shards 0..{len(prepared) - 1}"
        )
    mine = read_scattered(work, P, p, scattered)
    shard = mine.column("shard").to_numpy().astype(np.int32)
    row = mine.column("row").to_numpy().astype(np.int64)
    raw = _raw_of(mine.column("hash"))
    ntok = mine.column("n_tokens").to_numpy().astype(np.int64)
    doc_ids = mine.column("doc_id")
    n = len(shard)
    alive = np.ones(n, bool)
    dup_pos = np.zeros(0, np.int64)
    keeper_pos = np.zeros(0, np.int64)
    if cfg.filters.exact_dedup and n:
        # canonical order within equal hashes: lexsort is stable and the rows are in canonical order
        keys = [_u64(raw, lo) for lo in (24, 16, 8, 0)]
        order = np.lexsort(keys)
        ks = [k[order] for k in keys]
        new = np.ones(n, bool)
        new[1:] = np.logical_or.reduce([k[1:] != k[:-1] for k in ks])
        first = np.maximum.accumulate(np.where(new, np.arange(n), 0))
        is_dup = ~new
        dup_pos = order[is_dup]
        keeper_pos = order[first[is_dup]]
        back = np.argsort(dup_pos, kind="stable")  # canonical order of the duplicates
        dup_pos, keeper_pos = dup_pos[back], keeper_pos[back]
        alive[dup_pos] = False
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "dups": f"dups-{p:05d}.parquet",
        "budget": f"budget-{p:05d}.parquet",
        "hist": f"hist-{p:05d}.npy",
    }
    keeper_ids = doc_ids.take(pa.array(keeper_pos)).combine_chunks()
    _write(
        folder / files["dups"],
        pa.table(
            {"shard": pa.array(shard[dup_pos]), "row": pa.array(row[dup_pos]), "keeper": keeper_ids},
            schema=DUPS_SCHEMA,
        ),
    )
    # budget keys of the survivors of budgeted sources, sorted by (source, u, shard, row)
    src_of_shard = np.array([sources.index(r.source) for r in prepared], np.int32)
    src = src_of_shard[shard] if n else np.zeros(0, np.int32)
    hist = np.zeros((len(sources), BINS), np.int64)
    b_src, b_u, b_shard, b_row, b_tok = [], [], [], [], []
    for s_i in budgeted:
        sel = np.flatnonzero(alive & (src == s_i))
        u = budget_u(cfg, sources[s_i], raw[sel])
        np.add.at(hist[s_i], np.minimum((u * BINS).astype(np.int64), BINS - 1), ntok[sel])
        o = np.lexsort((row[sel], shard[sel], u))
        b_src.append(np.full(len(sel), s_i, np.int32))
        b_u.append(u[o])
        b_shard.append(shard[sel][o])
        b_row.append(row[sel][o])
        b_tok.append(ntok[sel][o])

    def cat(xs: list[np.ndarray], dt: str) -> np.ndarray:
        return np.concatenate(xs) if xs else np.zeros(0, dt)

    _write(
        folder / files["budget"],
        pa.table(
            [
                cat(b_src, "int32"),
                cat(b_u, "float64"),
                cat(b_shard, "int32"),
                cat(b_row, "int64"),
                cat(b_tok, "int64"),
            ],
            schema=BUDGET_SCHEMA,
        ),
    )
    np.save(folder / files["hist"], hist)
    out = PartitionResult(
        partition=p,
        partitions=P,
        inputs_key=inputs_key,
        documents=n,
        duplicates=len(dup_pos),
        dups_file=files["dups"],
        budget_file=files["budget"],
        hist_file=files["hist"],
        seconds=round(time.perf_counter() - started, 3),
        peak_rss=_peak_rss(),
        sha256={k: sha256_file(folder / v) for k, v in files.items()},
    )
    write_json_atomic(rec, out.to_json())
    trim_heap()
    return out


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _write(path: Path, table: pa.Table) -> None:
    """A partition file: written atomically by ParquetSink, in row groups small enough to stream."""
    with ParquetSink(path, table.schema) as sink:
        for b in table.to_batches(max_chunksize=BATCH):
            sink.write(pa.Table.from_batches([b]))


def _load_unit(folder: Path, rec: Path, key: str) -> PartitionResult | None:
    if not rec.exists():
        return None
    try:
        r = PartitionResult(**json.loads(rec.read_text()))
    except (ValueError, TypeError):
        return None
    if r.inputs_key != key:
        return None
    for kind, rel in (("dups", r.dups_file), ("budget", r.budget_file), ("hist", r.hist_file)):
        f = folder / rel
        if not f.exists() or sha256_file(f) != r.sha256.get(kind):
            return None
    return r


# ---- budget cut ------------------------------------------------------------------------------------


def budget_cuts(
    cfg: SelectConfig,
    work: WorkDir,
    prepared: list[PrepareResult],
    units: list[PartitionResult],
    extra: Sequence[ExtraDrops] = (),
) -> dict[int, tuple[float, int, int]]:
    """Per budgeted source: the last kept key (u, shard, row); (-1, -1, -1) keeps nothing."""
    sources = [s.name for s in cfg.sources]
    budgeted = _budgeted(cfg, sources)
    if not budgeted:
        return {}
    folder = part_dir(work, cfg.run.select_partitions)
    hist = np.zeros((len(sources), BINS), np.int64)
    for u in units:
        hist += np.load(folder / u.hist_file)
    _extra_out_of_hist(extra, hist, budgeted)
    cuts: dict[int, tuple[float, int, int]] = {}
    for s_i, budget in budgeted.items():
        cum = np.cumsum(hist[s_i])
        if cum[-1] <= budget:
            cuts[s_i] = (2.0, 0, 0)  # everything fits
            continue
        b = int(np.searchsorted(cum, budget, side="right"))  # first bin whose end crosses the budget
        base = int(cum[b - 1]) if b else 0
        lo, hi = b / BINS, (b + 1) / BINS
        parts = []
        for u in units:
            t = pq.read_table(
                folder / u.budget_file,
                filters=[("source", "=", s_i), ("u", ">=", lo), ("u", "<", hi)]
                if b < BINS - 1
                else [("source", "=", s_i), ("u", ">=", lo)],
            )
            parts.append(t)
        t = pa.concat_tables(parts)
        uu, sh, rw, tk = (t.column(c).to_numpy() for c in ("u", "shard", "row", "n_tokens"))
        # the bin's rows are exactly those with min(int(u * BINS), BINS - 1) == b
        inbin = np.minimum((uu * BINS).astype(np.int64), BINS - 1) == b
        inbin &= ~_extra_in_bin(extra, s_i, b, sh, rw)
        uu, sh, rw, tk = uu[inbin], sh[inbin], rw[inbin], tk[inbin]
        o = np.lexsort((rw, sh, uu))
        within = base + np.cumsum(tk[o]) <= budget
        k = int(within.sum())  # a prefix: the sum only grows
        if k:
            j = o[k - 1]
            cuts[s_i] = (float(uu[j]), int(sh[j]), int(rw[j]))
        elif b:
            cuts[s_i] = (float(np.nextafter(lo, -1.0)), 1 << 30, 0)  # every row of lower bins, none of this
        else:
            cuts[s_i] = (-1.0, -1, -1)
    return cuts


def _kept_by_cut(u: np.ndarray, shard: int, rows: np.ndarray, cut: tuple[float, int, int]) -> np.ndarray:
    cu, cs, cr = cut
    return (u < cu) | ((u == cu) & ((shard < cs) | ((shard == cs) & (rows <= cr))))


# ---- streaming helpers -----------------------------------------------------------------------------


class _ShardCursor:
    """Rows of a partition file sorted by shard, handed out shard by shard (one batch in memory)."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self._it = pq.ParquetFile(path).iter_batches(batch_size=BATCH, columns=columns)
        self._buf: pa.Table | None = None
        self._done = False

    def take(self, shard: int) -> pa.Table | None:
        out: list[pa.Table] = []
        while True:
            if self._buf is None or self._buf.num_rows == 0:
                if self._done:
                    break
                try:
                    self._buf = pa.Table.from_batches([next(self._it)])
                except StopIteration:
                    self._done = True
                    break
            sh = self._buf.column("shard").to_numpy()
            k = int(np.searchsorted(sh, shard, side="right"))
            lo = int(np.searchsorted(sh, shard, side="left"))
            if k > lo:
                out.append(self._buf.slice(lo, k - lo))
            self._buf = self._buf.slice(k)
            if self._buf.num_rows:
                break
        return pa.concat_tables(out) if out else None


class _DropWriter:
    """The `filtered` table, one drop kind after another, in row groups at the single-process bounds."""

    def __init__(self, path: Path, work: WorkDir, prepared: list[PrepareResult], sources: list[str]) -> None:
        self.sink = ParquetSink(path, FILTERED_SCHEMA)
        self.work, self.prepared, self.sources = work, prepared, sources
        self.by_reason: dict[str, dict[str, int]] = {s: {} for s in sources}
        self.by_tokens: dict[str, dict[str, int]] = {s: {} for s in sources}
        self._pending: list[pa.Table] = []
        self._rows = 0
        self._count = np.zeros(len(sources), np.int64)
        self._tokens = np.zeros(len(sources), np.int64)
        self._reason = ""

    def start(self, reason: str) -> None:
        self._reason = reason
        self._count[:] = 0
        self._tokens[:] = 0

    def add(
        self,
        shard: np.ndarray,
        row: np.ndarray,
        step: str,
        detail: list[str] | str,
        duplicate_of: pa.Array | None = None,
    ) -> None:
        """Drop rows (shard, row), in the order given; lineage columns are read per shard."""
        n = len(shard)
        if n == 0:
            return
        pos = np.zeros(n, np.int64)
        got: list[pa.Table] = []
        # rows of one shard at a time, then back to the given order
        order = np.argsort(shard, kind="stable")
        sh_sorted = shard[order]
        bounds = np.flatnonzero(np.r_[True, sh_sorted[1:] != sh_sorted[:-1], True])
        for a, b in itertools.pairwise(bounds):
            s = int(sh_sorted[a])
            res = self.prepared[s]
            t = pq.read_table(
                docs_path(self.work, res), columns=["uri", "record", "doc_id", "content_hash", "n_tokens"]
            ).take(pa.array(row[order[a:b]]))
            got.append(t.append_column("source", pa.array([res.source] * (b - a), pa.string())))
        whole = pa.concat_tables(got)
        pos[order] = np.arange(n)
        self.add_lineage(shard, whole.take(pa.array(pos)), step, detail, duplicate_of)

    def add_lineage(
        self,
        shard: np.ndarray,
        whole: pa.Table,
        step: str,
        detail: list[str] | str,
        duplicate_of: pa.Array | None = None,
    ) -> None:
        """Drop rows whose lineage columns (uri, record, doc_id, content_hash, n_tokens) are at hand."""
        n = len(shard)
        if n == 0:
            return
        src_of_shard = np.array([self.sources.index(r.source) for r in self.prepared], np.int64)
        src_idx = src_of_shard[np.asarray(shard, np.int64)]
        if "source" not in whole.column_names:
            whole = whole.append_column(
                "source", pa.array(np.array(self.sources, dtype=object)[src_idx], pa.string())
            )
        ntok = whole.column("n_tokens").to_numpy()
        np.add.at(self._count, src_idx, 1)
        np.add.at(self._tokens, src_idx, ntok)
        details = [detail] * n if isinstance(detail, str) else detail
        table = pa.table(
            {
                "source": whole.column("source"),
                "uri": whole.column("uri"),
                "record": whole.column("record"),
                "doc_id": whole.column("doc_id"),
                "content_hash": whole.column("content_hash"),
                "n_tokens": whole.column("n_tokens"),
                "step": pa.array([step] * n, pa.string()),
                "reason": pa.array([self._reason] * n, pa.string()),
                "detail": pa.array(details, pa.string()),
                "duplicate_of": duplicate_of if duplicate_of is not None else pa.nulls(n, pa.string()),
            },
            schema=FILTERED_SCHEMA,
        )
        self._pending.append(table)
        self._rows += n
        while self._rows >= ROW_GROUP:
            self._flush(ROW_GROUP)

    def _flush(self, n: int) -> None:
        t = pa.concat_tables(self._pending)
        self.sink.write(t.slice(0, n).combine_chunks())
        rest = t.slice(n)
        self._pending = [rest] if rest.num_rows else []
        self._rows = rest.num_rows

    def end(self) -> None:
        """One drop kind is complete: its last partial row group, and its counts (in source order)."""
        if self._rows:
            self._flush(self._rows)
        for i in np.flatnonzero(self._count):
            name = self.sources[int(i)]
            self.by_reason[name][self._reason] = self.by_reason[name].get(self._reason, 0) + int(
                self._count[i]
            )
            self.by_tokens[name][self._reason] = self.by_tokens[name].get(self._reason, 0) + int(
                self._tokens[i]
            )

    def close(self) -> str:
        return self.sink.close()


class _Buckets:
    """Rows spilled to K files by a monotone key, read back bucket by bucket (an external sort by u)."""

    def __init__(self, folder: Path, k: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = [folder / f"b{i:04d}.arrow" for i in range(k)]
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}

    def add(self, key: np.ndarray, table: pa.Table) -> None:
        order = np.argsort(key, kind="stable")
        ks = key[order]
        table = table.take(pa.array(order))
        bounds = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1], True])
        for a, b in itertools.pairwise(bounds):
            k = int(ks[a])
            if k not in self.writers:
                self.writers[k] = pa.ipc.new_stream(str(self.paths[k]), table.schema)
            self.writers[k].write_table(table.slice(int(a), int(b - a)))

    def drain(self) -> Iterator[pa.Table]:
        for w in self.writers.values():
            w.close()
        for k, p in enumerate(self.paths):
            if k in self.writers:
                with pa.ipc.open_stream(str(p)) as r:
                    t = r.read_all()
                p.unlink()
                yield t
        self.writers.clear()


class _Spill:
    """A target's finished layout segments as raw int64 columns on disk (bounded memory)."""

    COLS = ("item", "start", "end", "row", "row_start", "fp")

    def __init__(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = {c: folder / f"{name}.{c}.i64" for c in self.COLS}
        self.files = {c: open(p, "wb") for c, p in self.paths.items()}  # noqa: SIM115
        self.n = 0

    def append(self, cols: tuple[np.ndarray, ...]) -> None:
        for c, a in zip(self.COLS, cols, strict=True):
            np.asarray(a, np.int64).tofile(self.files[c])
        self.n += len(cols[0])

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def read(self, a: int, b: int) -> dict[str, np.ndarray]:
        return {c: np.fromfile(p, np.int64, count=b - a, offset=8 * a) for c, p in self.paths.items()}

    def remove(self) -> None:
        for p in self.paths.values():
            p.unlink(missing_ok=True)


# ---- the merge: budgets, drops, routing and packing in one streaming pass --------------------------


def _packer(cfg: SelectConfig, L: int) -> Packer:
    p = cfg.packing
    if p.strategy == "best_fit":
        return BestFitPacker(L, p.open_bins, p.lookahead_docs, min_piece=p.min_piece_tokens)
    return GreedyPacker(L, p.min_piece_tokens)


def select_partitioned(
    cfg: SelectConfig,
    work: WorkDir,
    prepared: list[PrepareResult],
    units: list[PartitionResult],
    extra: Sequence[ExtraDrops] = (),
) -> SelectResult:
    """The select stage's result from its partition units (the stage's merge); see the module docstring.
    `extra`: drops of the partitioned semantic stages (`ExtraDrops`), applied before the budgets."""
    record = work.select_dir / "select.json"
    key = inputs_key(prepared)
    previous = load_verified(work, record, key)
    if previous is not None:
        return previous
    check_partitioned(cfg)
    started = time.perf_counter()
    P = cfg.run.select_partitions
    folder = part_dir(work, P)
    units = sorted(units, key=lambda u: u.partition)
    if [u.partition for u in units] != list(range(P)) or any(u.inputs_key != key for u in units):
        raise RuntimeError(f"select: expected the results of partitions 0..{P - 1} of these inputs")
    sources = [s.name for s in cfg.sources]
    budgeted = _budgeted(cfg, sources)
    cuts = budget_cuts(cfg, work, prepared, units, extra)
    sizes = np.array([pq.ParquetFile(docs_path(work, r)).metadata.num_rows for r in prepared], np.int64)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    steps: list[str] = []
    rel = "filtered-select.parquet"
    dw = _DropWriter(work.select_dir / rel, work, prepared, sources)

    # exact duplicates, in canonical order (the partitions' files merged shard by shard)
    if cfg.filters.exact_dedup and any(u.duplicates for u in units):
        steps.append(DEDUP_STEP)
        dw.start("exact_duplicate")
        cursors = [_ShardCursor(folder / u.dups_file, ["shard", "row", "keeper"]) for u in units]
        for si in range(len(prepared)):
            found = [t for c in cursors if (t := c.take(si)) is not None]
            if not found:
                continue
            t = pa.concat_tables(found)
            t = t.take(pc.sort_indices(t, [("row", "ascending")]))
            keeper = t.column("keeper").combine_chunks()
            dw.add(
                np.full(t.num_rows, si, np.int64),
                t.column("row").to_numpy(),
                DEDUP_STEP,
                [f"same sha256 as {k}" for k in keeper.to_pylist()],
                duplicate_of=keeper,
            )
            trim_heap()
        dw.end()
    _write_extra_drops(dw, extra, len(prepared), steps)  # hook: SemDeDup/D4 drops, before the budgets

    # source budgets: each source's documents over its cut, in (u, canonical) order as the rule ranks
    # them. One pass over the source's shards buckets the dropped rows by u (with their lineage), so the
    # documents files are read once; each bucket is then sorted and written in turn.
    dw.start("source_budget")
    for s_i, budget in budgeted.items():
        detail = f"source {sources[s_i]!r} reached sources[].token_budget={budget}"
        n_src = int(sum(sizes[si] for si, r in enumerate(prepared) if r.source == sources[s_i]))
        K = int(min(512, max(1, -(-n_src // (1 << 18)))))
        buckets = _Buckets(folder / "budget-drops", K)
        cursors_b = [_ShardCursor(folder / u.dups_file, ["shard", "row"]) for u in units]
        cursors_b += _extra_cursors(extra)
        for si, res in enumerate(prepared):
            if res.source != sources[s_i]:
                for c in cursors_b:
                    c.take(si)
                continue
            t = pq.read_table(
                docs_path(work, res), columns=["uri", "record", "doc_id", "content_hash", "n_tokens"]
            )
            alive = np.ones(t.num_rows, bool)
            for c in cursors_b:
                d = c.take(si)
                if d is not None:
                    alive[d.column("row").to_numpy()] = False
            u = budget_u(cfg, res.source, hash_bytes(t.column("content_hash"), str(docs_path(work, res))))
            rows = np.arange(t.num_rows, dtype=np.int64)
            over = np.flatnonzero(alive & ~_kept_by_cut(u, si, rows, cuts[s_i]))
            if len(over):
                picked = t.take(pa.array(over))
                picked = picked.append_column("u", pa.array(u[over]))
                picked = picked.append_column("shard", pa.array(np.full(len(over), si, np.int64)))
                picked = picked.append_column("row", pa.array(over))
                buckets.add(np.minimum((u[over] * K).astype(np.int64), K - 1), picked)
            del t
            trim_heap()
        for part in buckets.drain():
            part = part.take(
                pc.sort_indices(part, [("u", "ascending"), ("shard", "ascending"), ("row", "ascending")])
            )
            dw.add_lineage(part.column("shard").to_numpy(), part, BUDGET_STEP, detail)
            del part
            trim_heap()  # each shard and bucket is large and short-lived: give its pages back
    if dw._count.any():
        steps.append(BUDGET_STEP)
    dw.end()

    # routing and packing: one pass over the shards in canonical order
    targets = cfg.packing.targets
    simple = len(targets) == 1 and targets[0].token_budget is None
    packers = [_packer(cfg, t.length) for t in targets]
    spill_dir = folder / "spill"
    spills = [_Spill(spill_dir, config_name(t.length)) for t in targets]
    pieces: list[list[np.ndarray]] = [[] for _ in targets]  # (item, start, fp, segment index) of cut items
    assigned = [0.0] * len(targets)
    weights = [float(t.weight) for t in targets]
    caps = [float(t.token_budget) if t.token_budget is not None else np.inf for t in targets]
    closed = False
    unrouted: list[np.ndarray] = []
    cursors = [_ShardCursor(folder / u.dups_file, ["shard", "row"]) for u in units]
    cursors += _extra_cursors(extra)

    def spill(ti: int, segs: tuple[np.ndarray, ...]) -> None:
        item, start, end, _row, _rs, fp = segs
        cut = np.flatnonzero((start != 0) | (end != fp))
        if len(cut):
            pieces[ti].append(np.stack([item[cut], start[cut], fp[cut], cut + spills[ti].n]))
        spills[ti].append(segs)

    for si, res in enumerate(prepared):
        s_i = sources.index(res.source)
        cols = ["n_tokens", "content_hash"] if s_i in budgeted else ["n_tokens"]
        t = pq.read_table(docs_path(work, res), columns=cols)
        alive = np.ones(t.num_rows, bool)
        for c in cursors:
            d = c.take(si)
            if d is not None:
                alive[d.column("row").to_numpy()] = False
        if s_i in budgeted:
            raw = hash_bytes(t.column("content_hash"), str(docs_path(work, res)))
            rows = np.arange(t.num_rows, dtype=np.int64)
            alive &= _kept_by_cut(budget_u(cfg, res.source, raw), si, rows, cuts[s_i])
            del raw
        idx = np.flatnonzero(alive)
        ntok = t.column("n_tokens").to_numpy()[idx].astype(np.int64)
        g = offsets[si] + idx
        del t
        if simple:
            packers[0].feed(ntok + 1, g)
        else:
            choice = np.full(len(idx), -1, np.int64)
            if not closed:
                for j, n in enumerate(ntok.tolist()):
                    # the open target furthest below its share gets the next document (first one on ties)
                    best, best_score = -1, np.inf
                    for ti in range(len(targets)):
                        if assigned[ti] < caps[ti]:
                            score = assigned[ti] / weights[ti]
                            if score < best_score:
                                best, best_score = ti, score
                    if best < 0:
                        closed = True
                        break
                    choice[j] = best
                    assigned[best] += n
            for ti in range(len(targets)):
                sel = choice == ti
                if sel.any():
                    packers[ti].feed(ntok[sel] + 1, g[sel])
            if (choice < 0).any():
                unrouted.append(g[choice < 0])
        for ti, pk in enumerate(packers):
            spill(ti, pk.seg.take(pk.done_rows() - 1))
        trim_heap()

    if unrouted:
        dw.start("target_budgets_full")
        for gs in unrouted:
            g_sh = np.searchsorted(offsets, gs, side="right") - 1
            dw.add(g_sh, gs - offsets[g_sh], "route@1", "every target's token_budget was reached")
        dw.end()

    plans: list[TargetPlan] = []
    packed = np.zeros(len(sources), np.int64)
    tail = np.zeros(len(sources), np.int64)
    src_of_shard = np.array([sources.index(r.source) for r in prepared], np.int64)
    for ti, (t_cfg, pk) in enumerate(zip(targets, packers, strict=True)):
        L = t_cfg.length
        pk.finish()
        last = pk.seg.take()
        item, start, end, row, _row_start, fp = last
        dropped = np.zeros(len(item), bool)
        if len(item):
            final = row == row[-1]
            if cfg.packing.last_row == "drop" and int((end - start)[final].sum()) < L:
                dropped = final
        spill(ti, tuple(a[~dropped] for a in last))
        spills[ti].close()
        d_item, d_start, d_end, d_fp = item[dropped], start[dropped], end[dropped], fp[dropped]
        cut = np.concatenate(pieces[ti], axis=1) if pieces[ti] else np.zeros((4, 0), np.int64)
        # part: rank of a piece among its document's pieces by position in the document
        o = np.lexsort((cut[1], cut[0]))
        part_of = np.zeros(cut.shape[1], np.int32)
        if len(o):
            it_sorted = cut[0][o]
            first = np.r_[True, it_sorted[1:] != it_sorted[:-1]]
            group_start = np.maximum.accumulate(np.where(first, np.arange(len(o)), 0))
            part_of[o] = (np.arange(len(o)) - group_start).astype(np.int32)
        cut_items, cut_counts = np.unique(cut[0], return_counts=True)
        partly = np.isin(d_item, cut_items)
        split = np.union1d(cut_items[cut_counts > 1], np.unique(d_item[partly]))
        fp_of_cut = dict(zip(cut[0].tolist(), cut[2].tolist(), strict=False))
        gone = np.setdiff1d(np.unique(d_item), cut_items)
        if len(gone):
            g_sh = np.searchsorted(offsets, gone, side="right") - 1
            dw.start("last_row_dropped")
            dw.add(
                g_sh,
                gone - offsets[g_sh],
                "last_row@1",
                f"in the final partial row of length {L}; packing.last_row=drop",
            )
            dw.end()
        d_ntok = d_fp - 1
        d_tok = np.minimum(d_end, d_ntok) - np.minimum(d_start, d_ntok)
        if partly.any():
            d_sh = np.searchsorted(offsets, d_item[partly], side="right") - 1
            np.add.at(tail, src_of_shard[d_sh], d_tok[partly])
        plan, content = _write_layout_from_spill(
            cfg, work, spills[ti], cut[3], part_of, offsets, src_of_shard, packed, L, pk.strategy
        )
        whole = plan.pop("whole")
        plans.append(
            TargetPlan(
                **plan,
                documents=int(whole) + len(cut_items),
                split_documents=len(split),
                needless_splits=int(sum(1 for s in split.tolist() if fp_of_cut.get(s, L + 1) <= L)),
                content_tokens=content,
                dropped_tail_tokens=int(d_tok.sum()),
            )
        )
        steps.append(pk.strategy)
        spills[ti].remove()
        crash_point("layout")

    filtered_sha = dw.close()
    result = SelectResult(
        targets=plans,
        filtered=dw.by_reason,
        filtered_tokens=dw.by_tokens,
        packed_tokens={s: int(packed[i]) for i, s in enumerate(sources)},
        dropped_tail_tokens={s: int(tail[i]) for i, s in enumerate(sources)},
        filtered_file=rel,
        filtered_sha256=filtered_sha,
        steps=steps,
        seconds=round(time.perf_counter() - started, 3),
        inputs_key=key,
    )
    write_json_atomic(record, result.to_json())
    trim_heap()
    return result


def _write_layout_from_spill(
    cfg: SelectConfig,
    work: WorkDir,
    sp: _Spill,
    cut_index: np.ndarray,
    part_of: np.ndarray,
    offsets: np.ndarray,
    src_of_shard: np.ndarray,
    packed: np.ndarray,
    L: int,
    strategy: str,
) -> tuple[dict, int]:
    """Write one target's layout file from its spill in the single-process row groups; returns the
    TargetPlan fields it knows (and `whole`: documents placed in one piece) and its content tokens."""
    name = config_name(L)
    rel = f"layout-{name}.parquet"
    order = np.argsort(cut_index)
    cut_index, part_of = cut_index[order], part_of[order]
    content = whole = 0
    last_row = -1
    last_fill = 0
    with ParquetSink(work.select_dir / rel, LAYOUT_SCHEMA) as sink:
        for a in range(0, sp.n, ROW_GROUP):
            b = min(sp.n, a + ROW_GROUP)
            c = sp.read(a, b)
            item, start, end, fp = c["item"], c["start"], c["end"], c["fp"]
            shard = np.searchsorted(offsets, item, side="right") - 1
            part = np.zeros(b - a, np.int32)
            lo, hi = np.searchsorted(cut_index, [a, b])
            part[cut_index[lo:hi] - a] = part_of[lo:hi]
            ntok = fp - 1
            c_tok = np.minimum(end, ntok) - np.minimum(start, ntok)
            content += int(c_tok.sum())
            np.add.at(packed, src_of_shard[shard], c_tok)
            whole += int(((start == 0) & (end == fp)).sum())
            rows = c["row"]
            if rows[-1] != last_row:
                last_row, last_fill = int(rows[-1]), 0
            last_fill += int((end - start)[rows == last_row].sum())
            neighbor = np.full(b - a, np.nan, np.float32)
            sink.write(
                pa.table(
                    {
                        "shard": pa.array(shard.astype(np.int32)),
                        "doc_row": pa.array(item - offsets[shard]),
                        "start": pa.array(start),
                        "end": pa.array(end),
                        "row": pa.array(rows),
                        "row_start": pa.array(c["row_start"]),
                        "part": pa.array(part),
                        "neighbor_similarity": pa.array(neighbor, pa.float32(), mask=np.isnan(neighbor)),
                    },
                    schema=LAYOUT_SCHEMA,
                )
            )
    n_rows = last_row + 1
    rps = max(1, cfg.output.shard_tokens // L)
    plan = {
        "target_length": L,
        "config_name": name,
        "strategy": strategy,
        "n_rows": n_rows,
        "rows_per_shard": rps,
        "n_shards": -(-n_rows // rps),
        "last_row_pad": L - last_fill if n_rows else 0,
        "layout_file": rel,
        "layout_sha256": sha256_file(work.select_dir / rel),
        "whole": whole,
    }
    return plan, content


# ---- hook: drops decided by other units (partitioned SemDeDup/D4) ---------------------------------


@dataclass(frozen=True)
class ExtraDrops:
    """Drops decided outside the hash partitions (`pipeline.corpus.semantic.partitioned`), merged in
    after the exact duplicates and before the source budgets, the order one process runs its selectors
    in. `files`: Parquet files sorted by (shard, row) with columns shard, row, source_index, u (the
    budget's uniform number), n_tokens, step, detail and duplicate_of."""

    reason: str
    step: str
    files: list[Path]


def shard_cursor(path: Path, columns: list[str]) -> _ShardCursor:
    """Rows of a file sorted by shard, handed out shard by shard (for the semantic package's merge)."""
    return _ShardCursor(path, columns)


def _extra_cursors(extra: Sequence[ExtraDrops]) -> list[_ShardCursor]:
    return [_ShardCursor(f, ["shard", "row"]) for e in extra for f in e.files]


def _extra_out_of_hist(extra: Sequence[ExtraDrops], hist: np.ndarray, budgeted: dict[int, int]) -> None:
    """The budget histograms count exact-dedup survivors: take the extra drops' tokens out."""
    for e in extra:
        for f in e.files:
            t = pq.read_table(f, columns=["source_index", "u", "n_tokens"])
            src, u, tok = (t.column(c).to_numpy() for c in ("source_index", "u", "n_tokens"))
            sel = np.isin(src, list(budgeted))
            bins = np.minimum((u[sel] * BINS).astype(np.int64), BINS - 1)
            np.subtract.at(hist, (src[sel].astype(np.int64), bins), tok[sel].astype(np.int64))


def _extra_in_bin(
    extra: Sequence[ExtraDrops], s_i: int, b: int, sh: np.ndarray, rw: np.ndarray
) -> np.ndarray:
    """Which of a budget bin's rows (shard, row) an extra step dropped."""
    keys = [np.zeros(0, np.int64)]
    for e in extra:
        for f in e.files:
            t = pq.read_table(f, columns=["u", "shard", "row"], filters=[("source_index", "=", s_i)])
            u = t.column("u").to_numpy()
            inbin = np.minimum((u * BINS).astype(np.int64), BINS - 1) == b
            keys.append(
                (t.column("shard").to_numpy()[inbin].astype(np.int64) << 40)
                | t.column("row").to_numpy()[inbin]
            )
    return np.isin((sh.astype(np.int64) << 40) | rw.astype(np.int64), np.concatenate(keys))


def _write_extra_drops(dw: _DropWriter, extra: Sequence[ExtraDrops], n_shards: int, steps: list[str]) -> None:
    """Each extra step's `filtered` rows, shard by shard in canonical order, after the exact duplicates."""
    for e in extra:
        steps.append(e.step)
        dw.start(e.reason)
        cursors = [_ShardCursor(f, ["shard", "row", "step", "detail", "duplicate_of"]) for f in e.files]
        for si in range(n_shards):
            found = [t for c in cursors if (t := c.take(si)) is not None]
            if not found:
                continue
            t = pa.concat_tables(found)
            t = t.take(pc.sort_indices(t, [("row", "ascending")]))
            dw.add(
                np.full(t.num_rows, si, np.int64),
                t.column("row").to_numpy(),
                e.step,
                t.column("detail").to_pylist(),
                duplicate_of=t.column("duplicate_of").combine_chunks(),
            )
        dw.end()
