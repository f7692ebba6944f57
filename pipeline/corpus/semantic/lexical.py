"""Lexical confirmation of semantic near-duplicates: Jaccard similarity of token-id shingles.

A static embedder averages word vectors, so two distinct documents with the same vocabulary (two scenes of
one play, two locale files, two data tables) can score above its threshold. Before SemDeDup drops a
document on such a model's say-so, the pair must also share text: the Jaccard similarity of their sets of
`shingle_tokens`-grams of pipeline token ids (Broder 1997).

Why token ids and not character shingles or `datasketch`: prepared documents are stored as token ids, so
shingling ids needs no decoding, and it is vectorised with numpy; datasketch would need every candidate
decoded and hashed per document in Python. Only documents that appear in a candidate pair are read.

Each document is summarised by a bottom-k sketch: the `sketch` smallest distinct shingle hashes. For two
documents with at most `sketch` distinct shingles each the estimate is the exact Jaccard; for longer ones
it is Broder's bottom-k estimator (standard error about sqrt(J (1 - J) / sketch)).
"""

from __future__ import annotations

import numpy as np

_P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the rolling combination


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the combined ids so the smallest hashes are a uniform sample."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def shingle_hashes(ids: np.ndarray, k: int) -> np.ndarray:
    """Distinct hashes of the k-grams of `ids`, sorted (a document shorter than k is one shingle)."""
    return np.unique(_hashes(ids, k))


def _hashes(ids: np.ndarray, k: int) -> np.ndarray:
    """Hashes of the k-grams of `ids`, in document order, repeats included."""
    t = np.asarray(ids, np.uint64) + np.uint64(1)
    if len(t) == 0:
        return np.zeros(0, np.uint64)
    k = min(k, len(t))
    with np.errstate(over="ignore"):  # wrapping arithmetic is the hash
        h = np.zeros(len(t) - k + 1, np.uint64)
        for m in range(k):
            h = h * _P + t[m : len(t) - k + 1 + m]
        return _mix(h)


def sketch(ids: np.ndarray, k: int, size: int) -> np.ndarray:
    """The bottom-`size` sketch of a document's k-gram set: its `size` smallest distinct hashes.

    A partial sort (`np.partition`, linear) finds the smallest candidates and only they are sorted; when
    repeats leave fewer than `size` distinct among them, the whole set is sorted instead, so the sketch
    is always exactly `np.unique(hashes)[:size]`. A checked pair needs its two sketches, and at 1M
    documents the check computes millions of them (README, Diversity pruning).
    """
    h = _hashes(ids, k)
    if len(h) <= 2 * size:
        return np.unique(h)[:size]
    low = np.unique(np.partition(h, 2 * size)[: 2 * size + 1])
    if len(low) >= size:  # every hash left out is >= the largest kept candidate, so these are the smallest
        return low[:size]
    return np.unique(h)[:size]


def jaccard(a: np.ndarray, b: np.ndarray, size: int) -> float:
    """Jaccard estimate from two bottom-`size` sketches (exact when both hold every shingle).

    One merge sort of the two sketches answers both cases: a sketch holds distinct values, so a value
    in both appears twice in a row. Two complete sketches give the exact |A & B| / |A | B|; otherwise
    the estimate is the share of the union's `size` smallest values that lie in both (Broder's bottom-k).
    """
    if not len(a) and not len(b):
        return 1.0
    merged = np.concatenate((a, b))
    merged.sort()
    dup = merged[1:] == merged[:-1]
    if len(a) < size and len(b) < size:
        inter = int(dup.sum())
        return inter / (len(a) + len(b) - inter)
    in_both = np.r_[dup, False][np.r_[True, ~dup]]  # per distinct union value, in increasing order
    union = in_both[:size]
    return float(union.sum()) / len(union)
