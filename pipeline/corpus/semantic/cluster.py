"""Clustering and neighbour search on unit vectors, with memory bounded by cluster size.

- `kmeans`: spherical k-means (faiss), fitted on a seeded sample of at most clusters x sample_per_cluster
  (`kmeans_sample` draws it, `kmeans_fit` fits it: a partitioned run calls them apart).
- `assign`: nearest centroid of every vector, in blocks (a flat index over the k centroids);
  `assign_top2` also gives the second-nearest (SemDeDup's boundary guests).
- `near_pairs`: all pairs above a cosine threshold inside one cluster: exact blocked products when the
  cluster has at most `flat_max` members, otherwise the `neighbors` nearest by an HNSW or IVF index.
- `knn`: the nearest neighbours of every member of one cluster, exact or approximate by the same rule.
"""

from __future__ import annotations

import math

import numpy as np

from schemas.diversity import IndexConfig, KMeansConfig

BLOCK = 2048  # rows per block of exact products: BLOCK x cluster floats at a time


def as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def n_clusters(n: int, km: KMeansConfig) -> int:
    k = km.clusters if km.clusters is not None else round(n / km.docs_per_cluster)
    return int(max(1, min(k, n)))


def kmeans_sample(n: int, km: KMeansConfig, seed: int) -> tuple[int, np.ndarray]:
    """(k, sorted row numbers of the seeded k-means sample) for `n` rows: what `kmeans` fits on. A
    partitioned run draws the same rows by their canonical rank without holding the corpus."""
    k = n_clusters(n, km)
    size = min(n, k * km.sample_per_cluster)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size, replace=False)) if size < n else np.arange(n)
    return k, pick


def kmeans_fit(sample: np.ndarray, k: int, km: KMeansConfig, seed: int) -> np.ndarray:
    """Unit-norm centroids (k >= 2) of spherical k-means on the sample rows (float32)."""
    import faiss

    model = faiss.Kmeans(
        sample.shape[1],
        k,
        niter=km.iterations,
        seed=seed,
        spherical=True,
        max_points_per_centroid=km.sample_per_cluster,
        min_points_per_centroid=1,
        verbose=False,
    )
    model.train(as_f32(sample))
    c = np.asarray(model.centroids, np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def unit_mean(total: np.ndarray) -> np.ndarray:
    """The one centroid of k = 1: the normalised mean (given as the sum of the rows, shape (1, d))."""
    return total / max(float(np.linalg.norm(total)), 1e-12)


def kmeans(x: np.ndarray, km: KMeansConfig, seed: int) -> np.ndarray:
    """Unit-norm centroids (k, d) of spherical k-means on a seeded sample of the rows of `x`."""
    n, d = x.shape
    k, pick = kmeans_sample(n, km, seed)
    if k == 1:
        return unit_mean(as_f32(x).mean(0, keepdims=True) if n else np.zeros((1, d), np.float32))
    return kmeans_fit(as_f32(x[pick]), k, km, seed)


def assign(x: np.ndarray, centroids: np.ndarray, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(cluster label int32, cosine to that centroid float32) of every row, in blocks."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(as_f32(centroids))
    labels = np.zeros(len(x), np.int32)
    sims = np.zeros(len(x), np.float32)
    for a in range(0, len(x), block):
        s, i = index.search(as_f32(x[a : a + block]), 1)
        labels[a : a + block] = i[:, 0]
        sims[a : a + block] = s[:, 0]
    return labels, sims


def assign_top2(
    x: np.ndarray, centroids: np.ndarray, block: int = 65536
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(nearest label, its cosine, second-nearest label or -1, its cosine) of every row, in blocks."""
    import faiss

    k = min(2, len(centroids))
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(as_f32(centroids))
    n = len(x)
    labels, sims = np.zeros(n, np.int32), np.zeros(n, np.float32)
    labels2, sims2 = np.full(n, -1, np.int32), np.full(n, -np.inf, np.float32)
    for a in range(0, n, block):
        s, i = index.search(as_f32(x[a : a + block]), k)
        labels[a : a + block], sims[a : a + block] = i[:, 0], s[:, 0]
        if k == 2:
            labels2[a : a + block], sims2[a : a + block] = i[:, 1], s[:, 1]
    return labels, sims, labels2, sims2


def group_bounds(sorted_labels: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal labels in a sorted label array."""
    if not len(sorted_labels):
        return []
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], len(sorted_labels)]
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def ann_index(x: np.ndarray, cfg: IndexConfig, seed: int = 0) -> object:
    """An approximate inner-product index over `x` (float32, unit rows): HNSW or IVF."""
    import faiss

    n, d = x.shape
    if cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(cfg.ef_search, cfg.neighbors + 1)
        index.add(x)
        return index
    nlist = cfg.ivf_lists or max(1, int(4 * math.sqrt(n)))
    nlist = min(nlist, max(1, n // 39))
    quantizer = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = x[np.sort(rng.choice(n, min(n, nlist * 256), replace=False))]
    ivf.train(train)
    ivf.add(x)
    ivf.nprobe = min(cfg.nprobe, nlist)
    return ivf


def near_pairs(
    x: np.ndarray, threshold: float, cfg: IndexConfig, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Pairs (i < j) of rows of `x` with cosine > threshold, their similarity, and the method used."""
    n = len(x)
    if n < 2:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0, np.float32), "flat"
    x = as_f32(x)
    if n <= cfg.flat_max:
        ii, jj, ss = [], [], []
        for a in range(0, n, BLOCK):
            s = x[a : a + BLOCK] @ x[a:].T  # only columns >= a: pairs are counted once
            r, c = np.nonzero(s > threshold)
            keep = c + a > r + a
            r, c = r[keep], c[keep]
            ii.append(r + a)
            jj.append(c + a)
            ss.append(s[r, c])
        return np.concatenate(ii), np.concatenate(jj), np.concatenate(ss).astype(np.float32), "flat"
    nbr, sim = knn(x, cfg.neighbors, cfg, seed)
    rows = np.repeat(np.arange(n), nbr.shape[1])
    cols, s = nbr.ravel(), sim.ravel()
    ok = (cols >= 0) & (cols != rows) & (s > threshold)
    a, b, s = rows[ok], cols[ok], s[ok]
    i, j = np.minimum(a, b), np.maximum(a, b)
    key = i.astype(np.int64) * n + j
    _, first = np.unique(key, return_index=True)
    return i[first], j[first], s[first].astype(np.float32), cfg.kind


def knn(x: np.ndarray, k: int, cfg: IndexConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of every row (indices, -1 where fewer exist) and their cosines."""
    n = len(x)
    k = max(0, min(k, n - 1))
    if k == 0:
        return np.full((n, 0), -1, np.int64), np.zeros((n, 0), np.float32)
    x = as_f32(x)
    if n <= cfg.flat_max:
        nbr = np.empty((n, k), np.int64)
        sim = np.empty((n, k), np.float32)
        for a in range(0, n, BLOCK):
            s = x[a : a + BLOCK] @ x.T
            s[np.arange(len(s)), np.arange(a, a + len(s))] = -np.inf  # not its own neighbour
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            ps = np.take_along_axis(s, part, 1)
            o = np.argsort(-ps, axis=1, kind="stable")
            nbr[a : a + len(s)] = np.take_along_axis(part, o, 1)
            sim[a : a + len(s)] = np.take_along_axis(ps, o, 1)
        return nbr, sim
    index = ann_index(x, cfg, seed)
    s, i = index.search(x, k + 1)  # type: ignore[attr-defined]
    # drop each row's own hit (usually first); keep k others
    own = i == np.arange(n)[:, None]
    s = np.where(own, -np.inf, s)
    o = np.argsort(-s, axis=1, kind="stable")[:, :k]
    nbr = np.take_along_axis(i, o, 1).astype(np.int64)
    sim = np.take_along_axis(s, o, 1).astype(np.float32)
    nbr[~np.isfinite(sim)] = -1
    return nbr, sim
