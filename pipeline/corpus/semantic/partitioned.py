"""Semantic pruning (SemDeDup, D4) in a partitioned select (`run.select_partitions: P` > 1).

With one partition SemDeDup and D4 run inside the single select unit, which gathers every vector of the
corpus (`pipeline.corpus.semantic.prune`). Partitioned, they become units of their own, as NeMo
Curator runs semantic dedup (k-means on a sample, every vector to its centroid, SemDeDup per cluster on
a worker), so that no process holds all vectors. Three stages run between the embed and select
stages (`pipeline.stages.semantic_exact`, `_assign`, `_prune`), only when partitions and pruning are
both configured:

0. **semantic_exact**: the select stage's own hash-partition units (`dedup_partition`), run first
   because SemDeDup works on what exact dedup kept (the single process's order). Their records are
   reused as they are by the select stage's units.
1. **semantic_assign**. Its bind fits the centroids (`fit_centroids`, in the client: a sample of at
   most k x `sample_per_cluster` vectors): the sample is the single process's (`kmeans_sample` on the
   number of exact-dedup survivors, its row numbers mapped to (shard, row) by their canonical rank), so
   the centroids are the single process's too. Each unit (one per prepared shard) reads that shard's
   vectors, assigns each surviving document its nearest and second-nearest centroid and the boundary
   guest flag (`assign_top2`, `boundary_guests`: per row, as in one process), and writes
   (row, cluster, cosine, guest cluster) for the shard.
2. **semantic_prune**. Its bind deals the clusters to P groups of about equal load (members plus
   guests), growing each group along the clusters that share the most boundary guests with it
   (`deal_groups`), so that few guests fall across groups. A unit per group reads the assignment
   files, keeps the rows of its clusters, gathers only their vectors and runs `dedup_clusters`
   (SemDeDup's per cluster search and greedy pass, the single process's code) and then D4 on what it kept
   (`d4_pruned`). It writes its drops (shard, row, step, detail, keeper, audit columns) in canonical
   order. Its merge writes the `pruned` audit files and statistics where the single process does.
3. The select stage's merge (`pipeline.corpus.partition.select_partitioned`, hook `ExtraDrops`) writes
   these drops after the exact duplicates and before the source budgets, and takes them out of the
   budgets' histograms and of the layout, as it does with the partitions' duplicates.

**What can differ from one partition** (README "Partitioned selection"):

- *SemDeDup, boundary guests across groups.* A group unit holds its clusters' members, plus the
  guests of its clusters whose own cluster is in the same group. A guest whose own cluster is in
  another group is not read: SemDeDup's pairs are then exactly the single process's pairs minus those
  not found inside one group, i.e. a pair (x, y) is used iff some cluster c holds both (as members or
  guests) and c, x's cluster and y's cluster are all in one group. The greedy pass runs over each
  group's pairs in the global keep order restricted to the group, which is what one process does on
  those pairs (a group's decisions depend only on its own pairs). With no pair spanning groups the
  drops are identical; else each differing document is explained by the pairs left out (the test
  recomputes both from the vectors). Each group's statistics count the guests not read
  (`boundary_guests_across_groups`). Why not compare them too: a drop decided by a pair across groups
  depends on the partner's fate in its own group (the greedy pass is sequential in keep order), which
  takes a second round; one reducer over all pairs would be exact but hold every pair of the corpus.
- *D4* re-clusters what SemDeDup kept; partitioned, each group fits its own k-means (seed + 1, k from
  its survivors and `d4.kmeans`) on its own survivors instead of one over the corpus, so its clusters,
  cutoffs and drops differ from one partition's; the fraction kept per cluster is the same rule.
- *Order of the `filtered` and `pruned` rows*: SemDeDup's in canonical order as in one process; D4's in
  canonical order (one process writes them cluster by cluster).
- *k = 1* (fewer than 1.5 x `docs_per_cluster` documents): the centroid is the mean of all vectors,
  summed shard by shard in float64 (one process: one float32 mean), so it can differ in its last bits.
- `run.select_partitions` is otherwise execution-only; a selection made with partitioned SemDeDup is
  not reused by a run with another P (`pipeline.stages.select`, `semantic-partitions.json`).

Every dropped document still has exactly one `filtered` row with its reason and one `pruned` row with
its step, partner, similarity and cluster; the manifest's counts reconcile as in one process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.parquet_io import ParquetSink, sha256_file, trim_heap, write_json_atomic
from pipeline.core.results import PrepareResult
from pipeline.core.workdir import WorkDir
from pipeline.corpus.index import DocIndex
from pipeline.corpus.partition import (
    ExtraDrops,
    PartitionResult,
    budget_u,
    docs_path,
    hash_bytes,
    part_dir,
    shard_cursor,
)
from pipeline.corpus.semantic.cluster import assign_top2, kmeans_fit, kmeans_sample, unit_mean
from pipeline.corpus.semantic.prune import (
    D4_REASON,
    D4_STEP,
    SEMDEDUP_REASON,
    SEMDEDUP_STEP,
    Confirm,
    Pruned,
    TokenSketches,
    boundary_guests,
    d4_pruned,
    dedup_clusters,
    lexical_check_on,
    pruned_table,
    semdedup_pruned,
)
from pipeline.corpus.semantic.vectors import CorpusEmbeddings
from pipeline.embedders.registry import default_threshold
from schemas.records import PRUNED_SCHEMA
from schemas.stage_config import SelectConfig

ASSIGN_SCHEMA = pa.schema(
    [("row", pa.int64()), ("label", pa.int32()), ("csim", pa.float32()), ("guest_of", pa.int32())]
)
# a group's drops: what the select merge needs (shard, row, step, detail, keeper, and the budget key
# parts source and u) beside the `pruned` audit row
DROPS_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("row", pa.int64()),
        ("source_index", pa.int32()),
        ("u", pa.float64()),
        ("duplicate_of", pa.string()),
        *PRUNED_SCHEMA,
    ]
)
RULES = (("semdedup", SEMDEDUP_STEP, SEMDEDUP_REASON), ("d4", D4_STEP, D4_REASON))


def wanted(cfg: SelectConfig) -> bool:
    """SemDeDup or D4 is configured (the partitioned semantic stages run only then, and only with P > 1)."""
    d = cfg.diversity
    return bool(d.embedder) and (
        d.semdedup.enabled or (d.d4.keep_fraction is not None and d.d4.keep_fraction < 1.0)
    )


def sem_dir(work: WorkDir, P: int) -> Path:
    return work.select_dir / f"semantic-{P}"


def _no_files(work: WorkDir, prepared: list[PrepareResult], sources: list[str]) -> DocIndex:
    """An index of no documents that knows every shard's documents file (for `CorpusEmbeddings`)."""
    e = np.zeros(0, np.int64)
    return DocIndex(
        e.astype(np.int32), e, e.astype(np.int32), e, np.zeros(0, "S64"), [], sources,
        [str(docs_path(work, r)) for r in prepared],
    )  # fmt: skip


def alive_rows(work: WorkDir, P: int, exact: Sequence[PartitionResult], si: int, n_rows: int) -> np.ndarray:
    """Rows of shard `si` that exact dedup kept (the partitions' duplicates of that shard removed)."""
    alive = np.ones(n_rows, bool)
    folder = part_dir(work, P)
    for u in exact:
        if u.duplicates:
            t = pq.read_table(folder / u.dups_file, columns=["row"], filters=[("shard", "=", si)])
            alive[t.column("row").to_numpy()] = False
    return np.flatnonzero(alive)


def _sizes(work: WorkDir, prepared: list[PrepareResult]) -> list[int]:
    return [pq.ParquetFile(docs_path(work, r)).metadata.num_rows for r in prepared]


def _sources(cfg: SelectConfig) -> list[str]:
    return [s.name for s in cfg.sources]


# ---- 1. centroids and assignment ------------------------------------------------------------------


@dataclass
class Centroids:
    """The fitted centroids (file in the semantic folder) and what they were fitted on."""

    file: str
    sha256: str
    k: int
    documents: int  # exact-dedup survivors
    sample: int
    inputs_key: str


def fit_centroids(
    cfg: SelectConfig,
    work: WorkDir,
    prepared: list[PrepareResult],
    exact: Sequence[PartitionResult],
    key: str,
) -> Centroids:
    """SemDeDup's centroids from the single process's sample, read shard by shard."""
    P = cfg.run.select_partitions
    folder = sem_dir(work, P)
    rec = folder / "centroids.json"
    if rec.exists():
        prev = Centroids(**json.loads(rec.read_text()))
        f = folder / prev.file
        if prev.inputs_key == key and f.exists() and sha256_file(f) == prev.sha256:
            return prev
    d = cfg.diversity
    emb = CorpusEmbeddings(cfg, _no_files(work, prepared, _sources(cfg)), work)
    alive = [alive_rows(work, P, exact, si, n) for si, n in enumerate(_sizes(work, prepared))]
    n = sum(len(a) for a in alive)
    k, pick = kmeans_sample(n, d.semdedup.kmeans, d.seed)
    if n == 0:
        c = np.zeros((1, 1), np.float32)
    elif k == 1:
        total = sum((emb.shard(si)[a].astype(np.float64).sum(0) for si, a in enumerate(alive) if len(a)))
        c = unit_mean(np.asarray(total, np.float64)[None, :] / n).astype(np.float32)
    else:
        parts, start = [], 0
        for si, a in enumerate(alive):
            mine = pick[(pick >= start) & (pick < start + len(a))] - start
            if len(mine):
                parts.append(np.asarray(emb.shard(si)[a[mine]]))
            start += len(a)
        c = kmeans_fit(np.concatenate(parts), k, d.semdedup.kmeans, d.seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "centroids.npy", c)
    out = Centroids("centroids.npy", sha256_file(folder / "centroids.npy"), len(c), n, len(pick), key)
    write_json_atomic(rec, asdict(out))
    return out


@dataclass
class AssignResult:
    """One shard's assignment: its file and the members and guests it adds to each cluster."""

    shard: int
    inputs_key: str
    centroids_sha256: str
    file: str
    sha256: str
    members: list[int] = field(default_factory=list)
    guests: list[int] = field(default_factory=list)
    # guest flow: [own cluster, guest cluster, documents] for each pair of clusters a guest joins
    flow: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    reused: bool = False


def threshold_of(cfg: SelectConfig) -> float:
    sd = cfg.diversity.semdedup
    return float(sd.threshold or default_threshold(cfg.diversity.embedder or ""))


def assign_shard(
    cfg: SelectConfig,
    work: WorkDir,
    prepared: list[PrepareResult],
    exact: Sequence[PartitionResult],
    cent: Centroids,
    si: int,
) -> AssignResult:
    """Nearest and second-nearest centroid of each surviving document of shard `si`, and its guest flag."""
    P = cfg.run.select_partitions
    folder = sem_dir(work, P)
    rec = folder / f"assign-{si:05d}.json"
    if rec.exists():
        prev = AssignResult(**json.loads(rec.read_text()))
        f = folder / prev.file
        if (
            (prev.inputs_key, prev.centroids_sha256) == (cent.inputs_key, cent.sha256)
            and f.exists()
            and sha256_file(f) == prev.sha256
        ):
            prev.reused = True
            return prev
    started = time.perf_counter()
    c = np.load(folder / cent.file)
    k = len(c)
    n_rows = pq.ParquetFile(docs_path(work, prepared[si])).metadata.num_rows
    rows = alive_rows(work, P, exact, si, n_rows)
    if len(rows):
        x = CorpusEmbeddings(cfg, _no_files(work, prepared, _sources(cfg)), work).shard(si)[rows]
        labels, csim, labels2, csim2 = assign_top2(x, c)
        sd = cfg.diversity.semdedup
        guest = boundary_guests(c, labels, csim, labels2, csim2, threshold_of(cfg), sd.boundary_margin)
    else:
        labels, csim = np.zeros(0, np.int32), np.zeros(0, np.float32)
        labels2, guest = np.zeros(0, np.int32), np.zeros(0, bool)
    guest_of = np.where(guest, labels2, -1).astype(np.int32)
    rel = f"assign-{si:05d}.parquet"
    with ParquetSink(folder / rel, ASSIGN_SCHEMA) as sink:
        sink.write(pa.table([rows, labels.astype(np.int32), csim, guest_of], schema=ASSIGN_SCHEMA))
    out = AssignResult(
        shard=si,
        inputs_key=cent.inputs_key,
        centroids_sha256=cent.sha256,
        file=rel,
        sha256=sha256_file(folder / rel),
        members=np.bincount(labels, minlength=k).tolist(),
        guests=np.bincount(guest_of[guest], minlength=k).tolist(),
        flow=_flow(labels[guest], guest_of[guest]),
        seconds=round(time.perf_counter() - started, 3),
    )
    write_json_atomic(rec, asdict(out))
    return out


def _flow(own: np.ndarray, other: np.ndarray) -> list[list[int]]:
    if not len(own):
        return []
    pairs, counts = np.unique(np.stack([own, other]).astype(np.int64), axis=1, return_counts=True)
    return np.vstack([pairs, counts]).T.tolist()


def deal_groups(members: np.ndarray, guests: np.ndarray, flow: list[list[int]], P: int) -> np.ndarray:
    """Group of each cluster: P groups of about equal load (members + guests: the vectors a group unit
    reads), grown so that clusters sharing boundary guests go together (a guest is compared only
    inside its own cluster's group: see the module docstring).

    A group starts from the largest cluster left and then takes, one at a time, the cluster left with
    the most guests exchanged with the clusters it holds (the largest on ties, then the lowest id), until
    the groups so far hold their share of the load (group g closes once (g + 1) / P of it is dealt).
    Lazy heap: O(edges log k), so it suits a million clusters.
    """
    import heapq

    load = (np.asarray(members, np.int64) + np.asarray(guests, np.int64)).tolist()
    k = len(load)
    adj: dict[int, dict[int, int]] = {}
    for a, b, w in flow:
        if a != b:
            adj.setdefault(a, {})[b] = adj.setdefault(a, {}).get(b, 0) + w
            adj.setdefault(b, {})[a] = adj.setdefault(b, {}).get(a, 0) + w
    by_load = sorted(range(k), key=lambda c: (-load[c], c))
    total = sum(load)
    group = np.full(k, -1, np.int64)
    gain: dict[int, int] = {}
    heap: list[tuple[int, int, int]] = []
    g, dealt, seed_at = 0, 0, 0
    for _ in range(k):
        c = -1
        while heap:
            neg, _neg_load, cand = heapq.heappop(heap)
            if group[cand] < 0 and -neg == gain.get(cand):
                c = cand
                break
        if c < 0:  # a new group, or nothing left that shares guests with this one: the largest left
            while group[by_load[seed_at]] >= 0:
                seed_at += 1
            c = by_load[seed_at]
        group[c] = g
        dealt += load[c]
        for n, w in adj.get(c, {}).items():
            if group[n] < 0:
                gain[n] = gain.get(n, 0) + w
                heapq.heappush(heap, (-gain[n], -load[n], n))
        if g < P - 1 and dealt * P >= (g + 1) * total:
            g += 1
            gain, heap = {}, []
    return group


def write_groups(work: WorkDir, P: int, group_of: np.ndarray) -> None:
    """The group of each cluster, for the audit (`semantic-<P>/groups.json`)."""
    folder = sem_dir(work, P)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "groups.json", np.asarray(group_of).tolist())


# ---- 2. a group of clusters ----------------------------------------------------------------------


@dataclass
class GroupResult:
    """One group's drops (a file per rule, sorted by shard and row) and its statistics."""

    group: int
    inputs_key: str
    plan_sha: str
    files: dict[str, str]
    sha256: dict[str, str]
    stats: dict[str, dict]
    documents: int = 0
    peak_rss: int = 0
    reused: bool = False


def plan_sha(cent: Centroids, assigned: Sequence[AssignResult], group_of: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256(cent.sha256.encode())
    for a in assigned:
        h.update(a.sha256.encode())
    h.update(np.asarray(group_of, np.int64).tobytes())
    return h.hexdigest()[:16]


def _local_index(
    work: WorkDir, prepared: list[PrepareResult], sources: list[str], picks: list[tuple[int, np.ndarray]]
) -> DocIndex:
    """A DocIndex of the given (shard, rows) only, in canonical order: the group's documents."""
    shard, row, src, ntok, hashes, ids = [], [], [], [], [], []
    for si, rows in picks:
        res = prepared[si]
        t = pq.read_table(docs_path(work, res), columns=["doc_id", "content_hash", "n_tokens"]).take(
            pa.array(rows)
        )
        shard.append(np.full(len(rows), si, np.int32))
        row.append(rows.astype(np.int64))
        src.append(np.full(len(rows), sources.index(res.source), np.int32))
        ntok.append(t.column("n_tokens").to_numpy().astype(np.int64))
        hashes.append(np.array(t.column("content_hash").to_pylist(), dtype="S64"))
        ids.extend(t.column("doc_id").to_pylist())

    def cat(parts: list[np.ndarray], dt: str) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dt)

    return DocIndex(
        cat(shard, "int32"), cat(row, "int64"), cat(src, "int32"), cat(ntok, "int64"), cat(hashes, "S64"),
        ids, sources, [str(docs_path(work, r)) for r in prepared],
    )  # fmt: skip


def prune_group(
    cfg: SelectConfig,
    work: WorkDir,
    prepared: list[PrepareResult],
    cent: Centroids,
    assigned: Sequence[AssignResult],
    group_of: np.ndarray,
    g: int,
) -> GroupResult:
    """SemDeDup, then D4, on the clusters of group `g` (their members and same-group guests)."""
    P = cfg.run.select_partitions
    folder = sem_dir(work, P)
    rec = folder / f"group-{g:05d}.json"
    psha = plan_sha(cent, assigned, group_of)
    if rec.exists():
        prev = GroupResult(**json.loads(rec.read_text()))
        if (prev.inputs_key, prev.plan_sha) == (cent.inputs_key, psha) and all(
            (folder / f).exists() and sha256_file(folder / f) == prev.sha256[r] for r, f in prev.files.items()
        ):
            prev.reused = True
            return prev
    started = time.perf_counter()
    d = cfg.diversity
    sources = _sources(cfg)
    mine_c = np.flatnonzero(group_of == g)
    picks: list[tuple[int, np.ndarray]] = []
    lab, cs, gof = [], [], []
    across = 0
    for a in assigned:
        t = pq.read_table(folder / a.file)
        label, guest_of = t.column("label").to_numpy(), t.column("guest_of").to_numpy()
        inside = group_of[label] == g
        across += int(((guest_of >= 0) & inside & (group_of[np.maximum(guest_of, 0)] != g)).sum())
        sel = np.flatnonzero(inside)
        if not len(sel):
            continue
        picks.append((a.shard, t.column("row").to_numpy()[sel]))
        lab.append(label[sel])
        cs.append(t.column("csim").to_numpy()[sel])
        go = guest_of[sel]
        # a guest of a cluster in another group is not compared there (see the module docstring)
        gof.append(np.where((go >= 0) & (group_of[np.maximum(go, 0)] == g), go, -1))
    idx = _local_index(work, prepared, sources, picks)
    n = len(idx)
    labels = np.concatenate(lab) if lab else np.zeros(0, np.int32)
    csim = np.concatenate(cs) if cs else np.zeros(0, np.float32)
    labels2 = np.concatenate(gof) if gof else np.zeros(0, np.int32)
    sizes = np.sum([a.members for a in assigned], axis=0) if assigned else np.zeros(cent.k, np.int64)
    x = CorpusEmbeddings(cfg, idx, work).gather(np.arange(n))
    alive = np.arange(n, dtype=np.int64)
    outs: dict[str, Pruned] = {}
    stats: dict[str, dict] = {}
    if d.semdedup.enabled and n >= 2:
        sd, lx = d.semdedup, d.semdedup.lexical
        threshold = threshold_of(cfg)
        check = lexical_check_on(cfg)
        sketches = TokenSketches(idx, lx.shingle_tokens, lx.sketch)
        confirm: Confirm | None = None
        if check:

            def confirm(i: np.ndarray, j: np.ndarray) -> np.ndarray:
                return sketches.jaccard(alive[i], alive[j])

        try:
            r = dedup_clusters(
                x, idx.n_tokens, labels, csim, labels2, labels2 >= 0, sizes, mine_c.tolist(), threshold, sd,
                d.index, d.seed, confirm, lx.min_jaccard,
            )  # fmt: skip
        finally:
            sketches.close()
        outs["semdedup"], stats["semdedup"] = semdedup_pruned(cfg, idx, alive, r, threshold, check)
        stats["semdedup"]["boundary_guests_across_groups"] = across
        alive = np.setdiff1d(alive, alive[r.dropped], assume_unique=True)
    frac = d.d4.keep_fraction
    if frac is not None and frac < 1.0 and len(alive) >= 2:
        out4, k4 = d4_pruned(x[alive], alive, frac, d.d4.kmeans, d.seed + 1)
        outs["d4"] = out4
        stats["d4"] = {"clusters": k4, "documents_in": len(alive)}
    files, shas = {}, {}
    for rule, _step, _reason in RULES:
        rel = f"drops-{rule}-{g:05d}.parquet"
        with ParquetSink(folder / rel, DROPS_SCHEMA) as sink:
            out = outs.get(rule)
            if out is not None and len(out.col("index", "int64")):
                sink.write(_drops_table(cfg, work, prepared, idx, out, rule == "semdedup"))
        files[rule], shas[rule] = rel, sha256_file(folder / rel)
    for rule, st in stats.items():
        st["group"] = g
        st["pruned"] = len(outs[rule].col("index", "int64")) if rule in outs else 0
        st["pruned_tokens"] = int(idx.n_tokens[outs[rule].col("index", "int64")].sum()) if rule in outs else 0
        st["seconds"] = round(time.perf_counter() - started, 3)
    result = GroupResult(
        group=g,
        inputs_key=cent.inputs_key,
        plan_sha=psha,
        files=files,
        sha256=shas,
        stats=stats,
        documents=n,
        peak_rss=_peak_rss(),
    )
    write_json_atomic(rec, asdict(result))
    trim_heap()
    return result


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _drops_table(
    cfg: SelectConfig, work: WorkDir, prepared: list[PrepareResult], idx: DocIndex, out: Pruned, keeper: bool
) -> pa.Table:
    """The group's drops of one rule with their audit rows, sorted by (shard, row)."""
    audit = pruned_table(work, idx, prepared, out)
    pos = out.col("index", "int64")
    near = out.col("nearest", "int64")
    u = np.zeros(len(pos), np.float64)
    for s_i in np.unique(idx.source[pos]):
        w = np.flatnonzero(idx.source[pos] == s_i)
        raw = hash_bytes(pa.array([h.decode() for h in idx.content_hash[pos[w]]]), "semantic drops")
        u[w] = budget_u(cfg, idx.sources[int(s_i)], raw)
    extra = pa.table(
        {
            "shard": pa.array(idx.shard[pos]),
            "row": pa.array(idx.row[pos]),
            "source_index": pa.array(idx.source[pos]),
            "u": pa.array(u),
            "duplicate_of": pa.array(
                [idx.doc_id[q] for q in near] if keeper else [None] * len(pos), pa.string()
            ),
        }
    )
    t = pa.table(extra.columns + audit.columns, schema=DROPS_SCHEMA)
    return t.take(pa.array(np.lexsort((idx.row[pos], idx.shard[pos]))))


# ---- 3. the merge: audit files and statistics where one process writes them; the select hook -------


@dataclass
class SemanticResult:
    """The merged semantic stage: its drops per rule (for the select merge) and its counts."""

    partitions: int
    drops: dict[str, list[str]]  # rule -> the groups' drop files (relative to the semantic folder)
    pruned: dict[str, int]
    groups: list[GroupResult]

    def extra_drops(self, work: WorkDir) -> list[ExtraDrops]:
        folder = sem_dir(work, self.partitions)
        return [
            ExtraDrops(reason, step, [folder / f for f in self.drops[rule]])
            for rule, step, reason in RULES
            if self.pruned.get(rule)
        ]


def merge_groups(
    cfg: SelectConfig,
    work: WorkDir,
    prepared: list[PrepareResult],
    cent: Centroids,
    groups: list[GroupResult],
) -> SemanticResult:
    """Write `pruned-<rule>.parquet` (canonical order) and `diversity-<rule>.json` into the select folder,
    as the single process does, from the groups' files; return the drops for the select merge."""
    P = cfg.run.select_partitions
    folder = sem_dir(work, P)
    groups = sorted(groups, key=lambda r: r.group)
    pruned: dict[str, int] = {}
    for rule, _step, _reason in RULES:
        st = [r.stats[rule] for r in groups if rule in r.stats]
        if not st:
            continue
        paths = [folder / r.files[rule] for r in groups]
        n = 0
        with ParquetSink(work.select_dir / f"pruned-{rule}.parquet", PRUNED_SCHEMA) as sink:
            cursors = [shard_cursor(p, [*PRUNED_SCHEMA.names, "shard", "row"]) for p in paths]
            for si in range(len(prepared)):
                found = [t for c in cursors if (t := c.take(si)) is not None]
                if found:
                    t = pa.concat_tables(found)
                    t = t.take(pa.array(np.argsort(t.column("row").to_numpy(), kind="stable")))
                    sink.write(t.select(PRUNED_SCHEMA.names))
                    n += t.num_rows
        pruned[rule] = n
        write_json_atomic(work.select_dir / f"diversity-{rule}.json", _merged_stats(cfg, rule, st, cent, n))
    return SemanticResult(P, {rule: [r.files[rule] for r in groups] for rule, _, _ in RULES}, pruned, groups)


def _merged_stats(cfg: SelectConfig, rule: str, st: list[dict], cent: Centroids, n: int) -> dict:
    d = cfg.diversity
    P = cfg.run.select_partitions
    tokens = sum(s["pruned_tokens"] for s in st)
    seconds = round(sum(s["seconds"] for s in st), 3)
    if rule == "d4":
        return {
            "step": D4_STEP,
            "keep_fraction": d.d4.keep_fraction,
            "documents_in": sum(s["documents_in"] for s in st),
            "clusters": sum(s["clusters"] for s in st),
            "pruned": n,
            "pruned_tokens": tokens,
            "seed": d.seed + 1,
            "groups": P,
            "clusters_fitted": "per group",
            "seconds": seconds,
        }
    search: dict[str, int] = {}
    for s in st:
        for k, v in s["search"].items():
            search[k] = search.get(k, 0) + v
    jac = [s["min_jaccard_of_pruned"] for s in st if s["min_jaccard_of_pruned"] is not None]
    first = st[0]
    return {
        "step": SEMDEDUP_STEP,
        "threshold": first["threshold"],
        "keep": first["keep"],
        "documents_in": cent.documents,
        "clusters": cent.k,
        "kmeans_sample": cent.sample,
        "kmeans_iterations": first["kmeans_iterations"],
        "largest_cluster": max(s["largest_cluster"] for s in st),
        "boundary_margin": first["boundary_margin"],
        "boundary_guests": sum(s["boundary_guests"] for s in st),
        "pruned_across_clusters": sum(s["pruned_across_clusters"] for s in st),
        "lexical_check": first["lexical_check"],
        "pairs_rejected_by_lexical_check": sum(s["pairs_rejected_by_lexical_check"] for s in st),
        "min_jaccard_of_pruned": min(jac) if jac else None,
        "search": search,
        "pruned": n,
        "pruned_tokens": tokens,
        "seed": d.seed,
        "groups": P,
        "boundary_guests_across_groups": sum(s["boundary_guests_across_groups"] for s in st),
        "seconds": seconds,
    }
