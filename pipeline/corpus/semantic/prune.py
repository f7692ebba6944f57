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
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.parquet_io import ParquetSink, write_json_atomic
from pipeline.core.workdir import WorkDir
from pipeline.corpus.index import DocIndex, Drop
from pipeline.corpus.semantic.cluster import as_f32, assign, group_bounds, kmeans, near_pairs
from pipeline.corpus.semantic.vectors import CorpusEmbeddings
from pipeline.embedders.registry import default_threshold
from pipeline.stages.prepare import PrepareResult
from schemas.config import BuildConfig
from schemas.diversity import IndexConfig, SemDedupConfig
from schemas.records import PRUNED_SCHEMA

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
    a, b, ss = np.r_[i, j], np.r_[j, i], np.r_[s, s]
    ok = dropped[a] & ~dropped[b]
    a, b, ss = a[ok], b[ok], ss[ok]
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
    nearest: np.ndarray  # for each dropped row: its most similar kept row of the cluster
    similarity: np.ndarray
    cluster: np.ndarray  # per dropped row
    cluster_size: np.ndarray
    centroid_similarity: np.ndarray
    clusters: int
    largest_cluster: int
    search: dict[str, int]


def semdedup_arrays(
    x: np.ndarray, n_tokens: np.ndarray, threshold: float, sd: SemDedupConfig, index: IndexConfig, seed: int
) -> DedupResult:
    """SemDeDup on unit vectors `x` (any float dtype, memmaps welcome): cluster, then prune per cluster."""
    centroids = kmeans(x, sd.kmeans, seed)
    labels, csim = assign(x, centroids)
    order = np.lexsort((np.arange(len(x)), _priority(sd.keep, n_tokens, csim), labels))
    methods: Counter[str] = Counter()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("who", "near", "sim", "c", "size")}
    largest = 0
    for a, b in group_bounds(labels[order]):
        m = order[a:b]  # this cluster's members, in keep order
        largest = max(largest, b - a)
        i, j, s, method = near_pairs(x[np.sort(m)][np.argsort(np.argsort(m))], threshold, index, seed)
        methods[method] += 1
        dropped = greedy_drop(len(m), i, j)
        if not dropped.any():
            continue
        who, near, sim = nearest_kept(i, j, s, dropped)
        assert len(who) == int(dropped.sum()), "every dropped document has a kept partner above threshold"
        parts["who"].append(m[who])
        parts["near"].append(m[near])
        parts["sim"].append(sim)
        parts["c"].append(np.full(len(who), labels[m[0]], np.int32))
        parts["size"].append(np.full(len(who), b - a, np.int32))

    def cat(k: str, dtype: str) -> np.ndarray:
        return np.concatenate(parts[k]).astype(dtype) if parts[k] else np.zeros(0, dtype)

    dropped_rows = cat("who", "int64")
    return DedupResult(
        dropped=dropped_rows,
        nearest=cat("near", "int64"),
        similarity=cat("sim", "float32"),
        cluster=cat("c", "int32"),
        cluster_size=cat("size", "int32"),
        centroid_similarity=csim[dropped_rows],
        clusters=len(centroids),
        largest_cluster=largest,
        search=dict(methods),
    )


def semdedup(
    cfg: BuildConfig, work: WorkDir, idx: DocIndex, alive: np.ndarray, prepared: list[PrepareResult]
) -> Drop | None:
    d = cfg.diversity
    if not d.embedder or not d.semdedup.enabled or len(alive) < 2:
        return None
    started = time.perf_counter()
    sd = d.semdedup
    threshold = sd.threshold or default_threshold(d.embedder)
    x = CorpusEmbeddings(cfg, idx, work).gather(alive)
    r = semdedup_arrays(x, idx.n_tokens[alive], threshold, sd, d.index, d.seed)
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
        f"(keep={sd.keep}; cluster {c} of {size}; n_tokens {idx.n_tokens[p]} vs {idx.n_tokens[q]})"
        for p, q, sv, c, size in zip(pos, near, r.similarity, r.cluster, r.cluster_size, strict=True)
    ]
    stats = {
        "step": SEMDEDUP_STEP,
        "threshold": threshold,
        "keep": sd.keep,
        "documents_in": len(alive),
        "clusters": r.clusters,
        "kmeans_sample": min(len(alive), r.clusters * sd.kmeans.sample_per_cluster),
        "kmeans_iterations": sd.kmeans.iterations,
        "largest_cluster": r.largest_cluster,
        "search": r.search,
        "pruned": len(pos),
        "pruned_tokens": int(idx.n_tokens[pos].sum()),
        "seed": d.seed,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return _finish(work, idx, prepared, out, stats, "semdedup")


def d4(
    cfg: BuildConfig, work: WorkDir, idx: DocIndex, alive: np.ndarray, prepared: list[PrepareResult]
) -> Drop | None:
    d = cfg.diversity
    frac = d.d4.keep_fraction
    if not d.embedder or frac is None or frac >= 1.0 or len(alive) < 2:
        return None
    started = time.perf_counter()
    x = CorpusEmbeddings(cfg, idx, work).gather(alive)
    centroids = kmeans(x, d.d4.kmeans, d.seed + 1)
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
    dropped_pos = out.col("index", "int64")
    stats = {
        "step": D4_STEP,
        "keep_fraction": frac,
        "documents_in": len(alive),
        "clusters": len(centroids),
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
