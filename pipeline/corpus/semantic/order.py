"""Similarity packing order: related documents side by side, clusters interleaved in proportion.

After In-Context Pretraining (Shi et al. 2024): documents are clustered (spherical k-means), and inside
each cluster a path visits every document once, always stepping to the most similar unvisited document
(among its `grouping.neighbors` nearest; when all of those are visited, the nearest unvisited one by an
exact search in clusters up to `index.flat_max`, else the unvisited one farthest from the centroid).
Each cluster's path is cut into runs of about `rows_per_run` rows of tokens, and the runs of all
clusters are interleaved by stride scheduling (run r of a cluster with R runs sits at (r + 0.5) / R), so
a row holds one cluster's related documents while any stretch of rows covers clusters in proportion.

The greedy packer then fills rows in this order; `neighbor_similarity` is the cosine of each document to
the one before it in the order.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.core.parquet_io import write_json_atomic
from pipeline.core.workdir import WorkDir
from pipeline.corpus.index import DocIndex
from pipeline.corpus.semantic.cluster import as_f32, assign, group_bounds, kmeans, knn
from pipeline.corpus.semantic.vectors import CorpusEmbeddings
from schemas.diversity import IndexConfig
from schemas.stage_config import SelectConfig

ORDER_STEP = "similarity@2"


def nn_path(
    x: np.ndarray, start_key: np.ndarray, neighbors: int, index: IndexConfig, seed: int
) -> np.ndarray:
    """A nearest-neighbour path through all rows of `x` (unit vectors), each row visited once."""
    n = len(x)
    if n <= 2:
        return np.argsort(start_key, kind="stable")
    nbr, _ = knn(x, neighbors, index, seed)
    nbr_lists = nbr.tolist()
    exact = n <= index.flat_max
    xf = as_f32(x) if exact else x
    visited = np.zeros(n, bool)
    by_start = np.argsort(start_key, kind="stable").tolist()  # where to (re)start a path
    next_start = 0
    path = np.empty(n, np.int64)
    cur = by_start[0]
    for step in range(n):
        path[step] = cur
        visited[cur] = True
        if step == n - 1:
            break
        nxt = -1
        for j in nbr_lists[cur]:
            if j >= 0 and not visited[j]:
                nxt = j
                break
        if nxt < 0 and exact:
            s = xf @ xf[cur]
            s[visited] = -np.inf
            nxt = int(s.argmax())
        if nxt < 0:
            while visited[by_start[next_start]]:
                next_start += 1
            nxt = by_start[next_start]
        cur = nxt
    return path


def interleave_runs(paths: list[np.ndarray], footprints: list[np.ndarray], run_tokens: float) -> np.ndarray:
    """Cut each path into runs of ~run_tokens and merge the runs of all paths by stride scheduling."""
    keys, runs = [], []
    for c, (p, f) in enumerate(zip(paths, footprints, strict=True)):
        run_of = (np.cumsum(f) - f) // max(run_tokens, 1.0)  # run index of each document, by its start
        _, starts = np.unique(run_of, return_index=True)
        bounds = np.r_[starts, len(p)]
        n_runs = len(starts)
        for r in range(n_runs):
            runs.append(p[bounds[r] : bounds[r + 1]])
            keys.append(((r + 0.5) / n_runs, c))
    order = sorted(range(len(runs)), key=lambda k: keys[k])
    return np.concatenate([runs[k] for k in order]) if runs else np.zeros(0, np.int64)


def similarity_order(
    cfg: SelectConfig,
    idx: DocIndex,
    members: np.ndarray,
    target_length: int | None = None,
    *,
    work: WorkDir,
) -> tuple[np.ndarray, np.ndarray]:
    """(order, neighbor_sims): a permutation of `members` positions and each document's cosine to the
    previous one in that order (NaN for the first)."""
    started = time.perf_counter()
    d = cfg.diversity
    g = d.grouping
    n = len(members)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    length = target_length or min(t.length for t in cfg.packing.targets)
    x = CorpusEmbeddings(cfg, idx, work).gather(members)
    centroids = kmeans(x, g.kmeans, d.seed + 2)
    labels, csim = assign(x, centroids)
    ntok = idx.n_tokens[members]
    by_cluster = np.lexsort((np.arange(n), labels))
    paths, feet = [], []
    for a, b in group_bounds(labels[by_cluster]):
        m = by_cluster[a:b]
        # start at the edge of the cluster: the path then sweeps across it rather than out from the middle
        p = m[nn_path(x[m], csim[m], g.neighbors, d.index, d.seed)]
        paths.append(p)
        feet.append(ntok[p] + 1)
    order = interleave_runs(paths, feet, g.rows_per_run * length)
    assert len(order) == n and len(np.unique(order)) == n, "every document placed exactly once"
    sims = np.full(n, np.nan, np.float32)
    for a in range(1, n, 65536):
        cur = as_f32(x[order[a : a + 65536]])
        prev = as_f32(x[order[a - 1 : a - 1 + len(cur)]])
        sims[a : a + len(cur)] = (cur * prev).sum(1)
    stats = {
        "step": ORDER_STEP,
        "target_length": length,
        "documents": n,
        "clusters": len(centroids),
        "neighbors": g.neighbors,
        "rows_per_run": g.rows_per_run,
        "mean_neighbor_similarity": float(np.nanmean(sims)) if n > 1 else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(work.select_dir / f"diversity-order-{length}.json", stats)
    return order, sims
