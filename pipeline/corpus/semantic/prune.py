"""Corpus-level pruning selectors on document embeddings: SemDeDup, then optional D4-style diversification.

- `semdedup` (Abbas et al. 2023): spherical k-means; inside each cluster, documents are visited in the
  order of `semdedup.keep` (longest first, by default) and a document is dropped when its cosine to an
  already kept document exceeds `semdedup.threshold`. Each drop names its most similar kept document.
- `d4` (Tirumala et al. 2023): re-cluster what SemDeDup kept and keep, per cluster, the `keep_fraction`
  of documents farthest from the centroid; the most prototypical rest is dropped.

Both return a `Drop` for the select stage (which writes the `filtered` rows) and write their own
`pruned` rows and statistics into the select folder for `pipeline.output.semantic_report` to publish.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.parquet_io import ParquetSink, read_tokens_into, write_json_atomic
from pipeline.core.results import PrepareResult, tokens_file_of
from pipeline.core.workdir import WorkDir
from pipeline.corpus.index import DocIndex, Drop
from pipeline.corpus.semantic.cluster import as_f32, assign, assign_top2, group_bounds, kmeans, near_pairs
from pipeline.corpus.semantic.lexical import jaccard, sketch
from pipeline.corpus.semantic.vectors import CorpusEmbeddings
from pipeline.embedders.registry import STATIC_MINILM, STATIC_TOKENS, default_threshold
from schemas.diversity import IndexConfig, KMeansConfig, SemDedupConfig
from schemas.records import PRUNED_SCHEMA
from schemas.stage_config import SelectConfig

SEMDEDUP_STEP = "semdedup@1"
D4_STEP = "d4@1"
SEMDEDUP_REASON = "semantic_duplicate"
D4_REASON = "prototypical"


@dataclass
class Pruned:
    """What one rule dropped, in DocIndex positions, with the numbers that explain each drop."""

    step: str
    reason: str
    keep_rule: str
    index: list[np.ndarray] = field(default_factory=list)
    nearest: list[np.ndarray] = field(default_factory=list)
    similarity: list[np.ndarray] = field(default_factory=list)
    threshold: list[np.ndarray] = field(default_factory=list)
    cluster: list[np.ndarray] = field(default_factory=list)
    cluster_size: list[np.ndarray] = field(default_factory=list)
    centroid_similarity: list[np.ndarray] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)

    def add(self, **cols: np.ndarray) -> None:
        for k, v in cols.items():
            getattr(self, k).append(np.asarray(v))

    def col(self, name: str, dtype: str) -> np.ndarray:
        parts = getattr(self, name)
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def greedy_drop(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Visit 0..n-1 in order; keep a member unless a kept earlier member is paired with it (i < j)."""
    dropped = np.zeros(n, bool)
    if not len(i):
        return dropped
    o = np.lexsort((j, i))
    i, j = i[o], j[o]
    for a, b in group_bounds(i):
        if not dropped[i[a]]:
            dropped[j[a:b]] = True
    return dropped


def nearest_kept(
    i: np.ndarray, j: np.ndarray, s: np.ndarray, dropped: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each dropped member: its most similar kept partner and their cosine."""
    first_dropped, second_dropped = dropped[i] & ~dropped[j], dropped[j] & ~dropped[i]
    a, b = np.r_[i[first_dropped], j[second_dropped]], np.r_[j[first_dropped], i[second_dropped]]
    ss = np.r_[s[first_dropped], s[second_dropped]]
    o = np.lexsort((-ss, a))
    a, b, ss = a[o], b[o], ss[o]
    first = np.r_[True, a[1:] != a[:-1]] if len(a) else np.zeros(0, bool)
    return a[first], b[first], ss[first]


def _priority(keep: str, n_tokens: np.ndarray, csim: np.ndarray) -> np.ndarray:
    """Sort key of the keep rule (smaller = kept first); ties go to the earlier document."""
    if keep == "longest":
        return -n_tokens.astype(np.float64)
    if keep == "shortest":
        return n_tokens.astype(np.float64)
    if keep == "farthest_from_centroid":  # the SemDeDup paper's choice
        return csim.astype(np.float64)
    if keep == "nearest_to_centroid":
        return -csim.astype(np.float64)
    return np.zeros(len(n_tokens))  # "first": canonical order


@dataclass
class DedupResult:
    """SemDeDup decisions on an array of vectors (local row numbers)."""

    dropped: np.ndarray  # rows dropped
    nearest: np.ndarray  # for each dropped row: its most similar kept row (same cluster, or a guest's)
    similarity: np.ndarray
    cluster: np.ndarray  # per dropped row: its own cluster
    cluster_size: np.ndarray
    centroid_similarity: np.ndarray
    across: np.ndarray  # per dropped row: its kept partner belongs to another cluster
    lexical: np.ndarray  # per dropped row: shingle Jaccard with its kept partner (NaN: not checked)
    unconfirmed: int  # pairs above the cosine threshold that the lexical check rejected
    clusters: int
    largest_cluster: int
    guests: int  # boundary documents also compared in their second-nearest cluster
    search: dict[str, int]


def confirmed_greedy(
    n: int,
    lo: np.ndarray,
    hi: np.ndarray,
    sim: np.ndarray,
    check: Callable[[int, int], float],
    min_ok: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """`greedy_drop` and `nearest_kept` over the pairs (lo < hi, keep ranks) that pass `check`, asking it
    only where the answer matters: a pair whose member is already dropped decides nothing (a group of k
    near-identical documents costs k - 1 checks, not k(k - 1) / 2). Returns (dropped mask, dropped,
    partner, cosine, check value, pairs rejected)."""
    o = np.lexsort((hi, lo))
    lo, hi, sim = lo[o], hi[o], sim[o]
    value = np.full(len(lo), np.nan)
    dropped = np.zeros(n, bool)
    rejected = 0
    # in slices: Python lists of all pairs at once (12M pairs at 1M documents) would take ~0.9 GB
    step = 1 << 16
    for start in range(0, len(lo), step):
        part = zip(lo[start : start + step].tolist(), hi[start : start + step].tolist(), strict=True)
        for k, (u, v) in enumerate(part, start):
            # u is final when its pairs come up: every pair ending at u came first
            if dropped[u] or dropped[v]:
                continue
            value[k] = check(u, v)
            if value[k] >= min_ok:
                dropped[v] = True
            else:
                rejected += 1
    # each dropped document's most similar kept partner whose pair passes (its dropping pair does),
    # from the pairs joining a dropped and a kept document only
    fwd, back = np.flatnonzero(dropped[lo] & ~dropped[hi]), np.flatnonzero(dropped[hi] & ~dropped[lo])
    kk = np.r_[fwd, back]
    a, b = np.r_[lo[fwd], hi[back]], np.r_[hi[fwd], lo[back]]
    ss, vv = sim[kk], value[kk]
    o = np.lexsort((-ss, a))
    who, near, cos, lex = [], [], [], []
    for start, end in group_bounds(a[o]):
        for t in o[start:end].tolist():
            if np.isnan(vv[t]):
                vv[t] = value[kk[t]] = check(int(a[t]), int(b[t]))
            if vv[t] >= min_ok:
                who.append(int(a[t]))
                near.append(int(b[t]))
                cos.append(float(ss[t]))
                lex.append(float(vv[t]))
                break
    return (
        dropped,
        np.array(who, np.int64),
        np.array(near, np.int64),
        np.array(cos, np.float32),
        np.array(lex, np.float32),
        rejected,
    )


def cluster_pairs(
    x: np.ndarray, rows: np.ndarray, threshold: float, index: IndexConfig, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Pairs above `threshold` among `rows` of `x` (one cluster's members and guests), as rows of x.

    A unit of work that needs only these vectors: a worker can run it for one cluster on its own.
    """
    rows = np.sort(rows)  # ascending reads from a memmap
    i, j, s, method = near_pairs(x[rows], threshold, index, seed)
    return rows[i], rows[j], s, method


def boundary_guests(
    centroids: np.ndarray,
    labels: np.ndarray,
    csim: np.ndarray,
    labels2: np.ndarray,
    csim2: np.ndarray,
    threshold: float,
    margin: str | float | None,
) -> np.ndarray:
    """Rows also compared in their second-nearest cluster.

    Why 'auto' suffices: for unit x in cluster p and y in cluster q with cos(x, y) > t, the two gaps
    (x.c_p - x.c_q) + (y.c_q - y.c_p) = (x - y).(c_p - c_q) <= |x - y| |c_p - c_q|, and |x - y| <
    sqrt(2 - 2t); so one of the two is within half of sqrt(2 - 2t) |c_p - c_q| of its partner's centroid.
    When that centroid is its second-nearest, the pair meets in that cluster.
    """
    has2 = labels2 >= 0
    gap = csim - csim2
    if margin is None:
        return np.zeros(len(labels), bool)
    if margin == "auto":
        # |c_p - c_q| from the k x k Gram matrix of the centroids, looked up per row: gathering each
        # row's two centroids instead (c[labels] - c[labels2]) made three n x d float64 arrays, 6 GB
        # at 1M documents of 256 dimensions, and was the whole of a 1M run's peak memory
        c = np.asarray(centroids, np.float64)
        sq = np.einsum("ij,ij->i", c, c)
        gram = c @ c.T
        l2 = np.where(has2, labels2, labels)
        dist = np.sqrt(np.maximum(sq[labels] + sq[l2] - 2.0 * gram[labels, l2], 0.0))
        bound = 0.5 * np.sqrt(max(0.0, 2.0 - 2.0 * threshold)) * dist
        return has2 & (gap <= bound + 1e-6)
    return has2 & (gap <= float(margin))


Confirm = Callable[[np.ndarray, np.ndarray], np.ndarray]  # rows i, j -> lexical similarity of each pair


def semdedup_arrays(
    x: np.ndarray,
    n_tokens: np.ndarray,
    threshold: float,
    sd: SemDedupConfig,
    index: IndexConfig,
    seed: int,
    confirm: Confirm | None = None,
    min_confirm: float = 0.0,
) -> DedupResult:
    """SemDeDup on unit vectors `x` (any float dtype, memmaps welcome).

    1. Cluster (spherical k-means) and assign every row its nearest and second-nearest centroid.
    2. Per cluster, independently: the pairs above the threshold among its members and its guests
       (rows whose second-nearest centroid is within `boundary_margin` of their nearest:
       `boundary_guests`), so near-duplicates that k-means split across two clusters still meet.
    3. One greedy pass over the pairs (their number follows the duplicates, not the corpus): rows are
       visited in `keep` order, and a row is dropped when a kept earlier row is paired with it. Without
       guests every pair lies inside one cluster, and this is SemDeDup's per-cluster rule exactly.

    Steps 2 and 3 are `dedup_clusters`, which a partitioned run calls per group of clusters
    (`pipeline.corpus.semantic.partitioned`).
    """
    centroids = kmeans(x, sd.kmeans, seed)
    labels, csim, labels2, csim2 = assign_top2(x, centroids)
    guest = boundary_guests(centroids, labels, csim, labels2, csim2, threshold, sd.boundary_margin)
    sizes = np.bincount(labels, minlength=len(centroids))
    return dedup_clusters(
        x, n_tokens, labels, csim, labels2, guest, sizes, range(len(centroids)), threshold, sd, index, seed,
        confirm, min_confirm,
    )  # fmt: skip


def dedup_clusters(
    x: np.ndarray,
    n_tokens: np.ndarray,
    labels: np.ndarray,
    csim: np.ndarray,
    labels2: np.ndarray,
    guest: np.ndarray,
    sizes: np.ndarray,
    clusters: Iterable[int],
    threshold: float,
    sd: SemDedupConfig,
    index: IndexConfig,
    seed: int,
    confirm: Confirm | None = None,
    min_confirm: float = 0.0,
) -> DedupResult:
    """SemDeDup's steps 2 and 3 (see `semdedup_arrays`) on rows already assigned to centroids.

    The rows are in canonical order; `sizes` holds every cluster's member count (the corpus's, for the
    audit), `clusters` the clusters whose pairs are searched: all of them in one process, one group's in
    a partitioned run (whose rows are then that group's members and guests only).
    """
    n = len(x)
    order = np.lexsort((np.arange(n), _priority(sd.keep, n_tokens, csim)))  # keep order
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    k = len(sizes)
    by_label = np.argsort(labels, kind="stable")
    guests = np.flatnonzero(guest)
    guests = guests[np.argsort(labels2[guests], kind="stable")]
    guest_bounds = np.searchsorted(labels2[guests], np.arange(k + 1))
    member_bounds = np.searchsorted(labels[by_label], np.arange(k + 1))
    methods: Counter[str] = Counter()
    ai, aj, as_ = [], [], []
    largest = 0
    for c in clusters:
        m = by_label[member_bounds[c] : member_bounds[c + 1]]
        g = guests[guest_bounds[c] : guest_bounds[c + 1]]
        if len(m) + len(g) < 2 or not len(m):
            continue
        largest = max(largest, len(m) + len(g))
        i, j, sim, method = cluster_pairs(x, np.r_[m, g], threshold, index, seed)
        methods[method] += 1
        ai.append(i)
        aj.append(j)
        as_.append(sim)
    i = np.concatenate(ai) if ai else np.zeros(0, np.int64)
    j = np.concatenate(aj) if aj else np.zeros(0, np.int64)
    sim = np.concatenate(as_).astype(np.float32) if as_ else np.zeros(0, np.float32)
    # a pair found in two clusters (both rows guests of each other's cluster) counts once
    lo, hi = np.minimum(rank[i], rank[j]), np.maximum(rank[i], rank[j])
    _, first = np.unique(lo * n + hi, return_index=True)
    lo, hi, sim = lo[first], hi[first], sim[first]
    unconfirmed = 0
    if confirm is None or not len(lo):
        dropped_rank = greedy_drop(n, lo, hi)
        who_r, near_r, sim_kept = nearest_kept(lo, hi, sim, dropped_rank)
        lex_kept = np.full(len(who_r), np.nan, np.float32)
    else:

        def check(a: int, b: int) -> float:
            return float(confirm(order[[a]], order[[b]])[0])

        dropped_rank, who_r, near_r, sim_kept, lex_kept, unconfirmed = confirmed_greedy(
            n, lo, hi, sim, check, min_confirm
        )
    assert len(who_r) == int(dropped_rank.sum()), "every dropped document has a kept partner above threshold"
    who, near = order[who_r], order[near_r]
    o = np.argsort(who, kind="stable")
    who, near, sim_kept, lex_kept = who[o], near[o], sim_kept[o], lex_kept[o]
    return DedupResult(
        dropped=who,
        nearest=near,
        similarity=sim_kept.astype(np.float32),
        cluster=labels[who].astype(np.int32),
        cluster_size=sizes[labels[who]].astype(np.int32),
        centroid_similarity=csim[who],
        across=labels[who] != labels[near],
        lexical=lex_kept,
        unconfirmed=unconfirmed,
        clusters=k,
        largest_cluster=largest,
        guests=int(guest.sum()),
        search=dict(methods),
    )


def lexical_check_on(cfg: SelectConfig) -> bool:
    """The lexical confirmation is on by default for static embedders, whose averaged word vectors bring
    distinct documents of one vocabulary above the threshold (README "Calibration")."""
    lx = cfg.diversity.semdedup.lexical
    if lx.enabled is not None:
        return lx.enabled
    spec = cfg.diversity.embedder or ""
    return spec in (STATIC_MINILM, STATIC_TOKENS) or spec.startswith("model2vec:")


class TokenSketches:
    """Bottom-k shingle sketches of documents (DocIndex positions), read from their stored token ids.

    Recent sketches are kept for documents paired more than once (a group of k copies is checked k - 1
    times against its keeper), but at most `memo_bytes` of them: an unbounded memo held every checked
    document's sketch and took a 1M-document run from 2 GB to 5.6 GB. A sketch missing from the memo is
    recomputed from the memory-mapped ids, which costs tens of microseconds.
    """

    def __init__(self, idx: DocIndex, shingle_tokens: int, size: int, memo_bytes: int = 256 * 2**20) -> None:
        self.idx = idx
        self.k, self.size = shingle_tokens, size
        self._starts: dict[int, np.ndarray] = {}
        self._fds: dict[int, int] = {}
        self._memo: OrderedDict[int, np.ndarray] = OrderedDict()
        self._memo_bytes, self._memo_cap = 0, memo_bytes

    def ids(self, pos: int) -> np.ndarray:
        """A document's token ids, by a positioned read of its span. Not a memory map: every page a
        map touches stays in the process's resident memory, and the check reads documents all over a
        corpus (at 1M documents, the whole 0.9 GB of token files)."""
        s = int(self.idx.shard[pos])
        if s not in self._starts:
            docs = self.idx.files[s]
            self._starts[s] = pq.read_table(docs, columns=["token_start"]).column("token_start").to_numpy()
            path = tokens_file_of(Path(docs))
            self._fds[s] = os.open(path, os.O_RDONLY) if path.exists() else -1  # -1: no tokens stored
        out = np.empty(int(self.idx.n_tokens[pos]), np.int32)
        if len(out):
            read_tokens_into(self._fds[s], out, int(self._starts[s][self.idx.row[pos]]))
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            if fd >= 0:
                os.close(fd)
        self._fds.clear()
        self._starts.clear()

    def of(self, pos: int) -> np.ndarray:
        got = self._memo.get(pos)
        if got is not None:
            self._memo.move_to_end(pos)
            return got
        got = sketch(self.ids(pos), self.k, self.size)
        self._memo[pos] = got
        self._memo_bytes += got.nbytes
        while self._memo_bytes > self._memo_cap and len(self._memo) > 1:
            _, old = self._memo.popitem(last=False)  # least recently used
            self._memo_bytes -= old.nbytes
        return got

    @property
    def memo_bytes(self) -> int:
        """Bytes of sketches held now (bounded by the constructor's `memo_bytes`)."""
        return self._memo_bytes

    def jaccard(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.array(
            [jaccard(self.of(p), self.of(q), self.size) for p, q in zip(a.tolist(), b.tolist(), strict=True)],
            np.float32,
        )


def semdedup_pruned(
    cfg: SelectConfig, idx: DocIndex, alive: np.ndarray, r: DedupResult, threshold: float, check: bool
) -> tuple[Pruned, dict]:
    """SemDeDup's drops as `Pruned` rows (positions of `idx`: `alive[row of r]`) and its statistics."""
    d = cfg.diversity
    sd, lx = d.semdedup, d.semdedup.lexical
    out = Pruned(SEMDEDUP_STEP, SEMDEDUP_REASON, sd.keep)
    pos, near = alive[r.dropped], alive[r.nearest]
    out.add(
        index=pos,
        nearest=near,
        similarity=r.similarity,
        threshold=np.full(len(pos), threshold),
        cluster=r.cluster,
        cluster_size=r.cluster_size,
        centroid_similarity=r.centroid_similarity,
    )
    out.detail = [
        f"cosine {sv:.4f} > {threshold} to kept {idx.doc_id[q]} "
        f"(keep={sd.keep}; cluster {c} of {size}"
        + ("; partner from a neighbouring cluster, compared as a boundary guest" if x_ else "")
        + (f"; {lx.shingle_tokens}-token shingle Jaccard {jv:.3f} >= {lx.min_jaccard}" if check else "")
        + f"; n_tokens {idx.n_tokens[p]} vs {idx.n_tokens[q]})"
        for p, q, sv, c, size, x_, jv in zip(
            pos, near, r.similarity, r.cluster, r.cluster_size, r.across, r.lexical, strict=True
        )
    ]
    stats = {
        "step": SEMDEDUP_STEP,
        "threshold": threshold,
        "keep": sd.keep,
        "documents_in": len(alive),
        "clusters": r.clusters,
        "kmeans_sample": None,
        "kmeans_iterations": sd.kmeans.iterations,
        "largest_cluster": r.largest_cluster,
        "boundary_margin": sd.boundary_margin,
        "boundary_guests": r.guests,
        "pruned_across_clusters": int(r.across.sum()),
        "lexical_check": lx.model_dump(mode="json") | {"enabled": check},
        "pairs_rejected_by_lexical_check": r.unconfirmed,
        "min_jaccard_of_pruned": float(np.nanmin(r.lexical)) if check and len(r.lexical) else None,
        "search": r.search,
        "pruned": len(pos),
        "pruned_tokens": int(idx.n_tokens[pos].sum()),
        "seed": d.seed,
        "seconds": None,
    }
    return out, stats


def semdedup(
    cfg: SelectConfig, work: WorkDir, idx: DocIndex, alive: np.ndarray, prepared: list[PrepareResult]
) -> Drop | None:
    d = cfg.diversity
    if not d.embedder or not d.semdedup.enabled or len(alive) < 2:
        return None
    started = time.perf_counter()
    sd = d.semdedup
    threshold = sd.threshold or default_threshold(d.embedder)
    x = CorpusEmbeddings(cfg, idx, work).gather(alive)
    lx = sd.lexical
    check = lexical_check_on(cfg)
    confirm: Confirm | None = None
    sketches = TokenSketches(idx, lx.shingle_tokens, lx.sketch)
    if check:

        def confirm(i: np.ndarray, j: np.ndarray) -> np.ndarray:
            return sketches.jaccard(alive[i], alive[j])

    try:
        r = semdedup_arrays(x, idx.n_tokens[alive], threshold, sd, d.index, d.seed, confirm, lx.min_jaccard)
    finally:
        sketches.close()
    out, stats = semdedup_pruned(cfg, idx, alive, r, threshold, check)
    stats["kmeans_sample"] = min(len(alive), r.clusters * sd.kmeans.sample_per_cluster)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return _finish(work, idx, prepared, out, stats, "semdedup")


def d4_pruned(
    x: np.ndarray, alive: np.ndarray, frac: float, km: KMeansConfig, seed: int
) -> tuple[Pruned, int]:
    """D4 on the vectors `x` of the documents `alive` (positions): re-cluster them, keep per cluster
    the `frac` farthest from its centroid. Returns the drops (as positions) and the number of clusters."""
    centroids = kmeans(x, km, seed)
    labels, csim = assign(x, centroids)
    order = np.lexsort((np.arange(len(alive)), csim, labels))  # per cluster: farthest from centroid first
    out = Pruned(D4_STEP, D4_REASON, f"farthest_from_centroid keep_fraction={frac}")
    for a, b in group_bounds(labels[order]):
        size = b - a
        n_keep = max(1, math.ceil(frac * size))
        if n_keep >= size:
            continue
        kept, gone = order[a : a + n_keep], order[a + n_keep : b]
        cutoff = float(csim[kept[-1]])
        near, sim = _nearest_among(x, gone, kept)
        c = int(labels[kept[0]])
        out.add(
            index=alive[gone],
            nearest=alive[near],
            similarity=sim,
            threshold=np.full(len(gone), cutoff),
            cluster=np.full(len(gone), c),
            cluster_size=np.full(len(gone), size),
            centroid_similarity=csim[gone],
        )
        out.detail += [
            f"cosine to centroid {csim[g]:.4f} >= cutoff {cutoff:.4f}: among the {size - n_keep} most "
            f"prototypical of cluster {c} ({size} documents, keep_fraction={frac})"
            for g in gone
        ]
    return out, len(centroids)


def d4(
    cfg: SelectConfig, work: WorkDir, idx: DocIndex, alive: np.ndarray, prepared: list[PrepareResult]
) -> Drop | None:
    d = cfg.diversity
    frac = d.d4.keep_fraction
    if not d.embedder or frac is None or frac >= 1.0 or len(alive) < 2:
        return None
    started = time.perf_counter()
    x = CorpusEmbeddings(cfg, idx, work).gather(alive)
    out, n_centroids = d4_pruned(x, alive, frac, d.d4.kmeans, d.seed + 1)
    dropped_pos = out.col("index", "int64")
    stats = {
        "step": D4_STEP,
        "keep_fraction": frac,
        "documents_in": len(alive),
        "clusters": n_centroids,
        "pruned": len(dropped_pos),
        "pruned_tokens": int(idx.n_tokens[dropped_pos].sum()),
        "seed": d.seed + 1,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return _finish(work, idx, prepared, out, stats, "d4")


def _nearest_among(x: np.ndarray, rows: np.ndarray, among: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of `rows`: the most similar of `among` (as a row of x) and the cosine, in blocks."""
    pool = as_f32(x[among])
    near = np.empty(len(rows), np.int64)
    sim = np.empty(len(rows), np.float32)
    for a in range(0, len(rows), 2048):
        s = as_f32(x[rows[a : a + 2048]]) @ pool.T
        k = s.argmax(1)
        near[a : a + len(k)] = among[k]
        sim[a : a + len(k)] = s[np.arange(len(k)), k]
    return near, sim


def _finish(
    work: WorkDir, idx: DocIndex, prepared: list[PrepareResult], out: Pruned, stats: dict, name: str
) -> Drop | None:
    """Write the rule's pruned rows and statistics into the select folder; return its Drop."""
    pos = out.col("index", "int64")
    write_json_atomic(work.select_dir / f"diversity-{name}.json", stats)
    with ParquetSink(work.select_dir / f"pruned-{name}.parquet", PRUNED_SCHEMA) as sink:
        if len(pos):
            sink.write(pruned_table(work, idx, prepared, out))
    if not len(pos):
        return None
    nearest = out.col("nearest", "int64")
    return Drop(
        out.step,
        out.reason,
        pos,
        out.detail,
        duplicate_of=[idx.doc_id[q] for q in nearest] if out.step == SEMDEDUP_STEP else None,
    )


def _uri_record(
    work: WorkDir, idx: DocIndex, prepared: list[PrepareResult], pos: np.ndarray
) -> tuple[list[str], np.ndarray]:
    uris: list[str] = [""] * len(pos)
    records = np.zeros(len(pos), np.int64)
    shards = idx.shard[pos]
    for s in np.unique(shards):
        where = np.flatnonzero(shards == s)
        path = work.prepare_dir / prepared[int(s)].files["documents"]
        t = pq.read_table(path, columns=["uri", "record"]).take(pa.array(idx.row[pos[where]]))
        for j, u, r in zip(where, t.column("uri").to_pylist(), t.column("record").to_pylist(), strict=True):
            uris[j], records[j] = u, r
    return uris, records


def pruned_table(work: WorkDir, idx: DocIndex, prepared: list[PrepareResult], out: Pruned) -> pa.Table:
    pos = out.col("index", "int64")
    near = out.col("nearest", "int64")
    uris, records = _uri_record(work, idx, prepared, pos)
    n = len(pos)
    return pa.table(
        {
            "source": pa.array([idx.sources[int(s)] for s in idx.source[pos]], pa.string()),
            "uri": pa.array(uris, pa.string()),
            "record": pa.array(records),
            "doc_id": pa.array([idx.doc_id[p] for p in pos], pa.string()),
            "content_hash": pa.array([h.decode() for h in idx.content_hash[pos]], pa.string()),
            "n_tokens": pa.array(idx.n_tokens[pos]),
            "step": pa.array([out.step] * n, pa.string()),
            "reason": pa.array([out.reason] * n, pa.string()),
            "similarity": pa.array(out.col("similarity", "float32")),
            "nearest_kept": pa.array([idx.doc_id[q] for q in near], pa.string()),
            "nearest_kept_hash": pa.array([h.decode() for h in idx.content_hash[near]], pa.string()),
            "threshold": pa.array(out.col("threshold", "float32")),
            "cluster": pa.array(out.col("cluster", "int32")),
            "cluster_size": pa.array(out.col("cluster_size", "int32")),
            "centroid_similarity": pa.array(out.col("centroid_similarity", "float32")),
            "keep_rule": pa.array([out.keep_rule] * n, pa.string()),
            "detail": pa.array(out.detail, pa.string()),
        },
        schema=PRUNED_SCHEMA,
    )


def read_stats(work: WorkDir, name: str) -> dict | None:
    p = work.select_dir / f"diversity-{name}.json"
    return json.loads(p.read_text()) if p.exists() else None
