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
    t = np.asarray(ids, np.uint64) + np.uint64(1)
    if len(t) == 0:
        return np.zeros(0, np.uint64)
    k = min(k, len(t))
    with np.errstate(over="ignore"):  # wrapping arithmetic is the hash
        h = np.zeros(len(t) - k + 1, np.uint64)
        for m in range(k):
            h = h * _P + t[m : len(t) - k + 1 + m]
        return np.unique(_mix(h))


def sketch(ids: np.ndarray, k: int, size: int) -> np.ndarray:
    """The bottom-`size` sketch of a document's k-gram set."""
    return shingle_hashes(ids, k)[:size]


def jaccard(a: np.ndarray, b: np.ndarray, size: int) -> float:
    """Jaccard estimate from two bottom-`size` sketches (exact when both hold every shingle)."""
    if not len(a) and not len(b):
        return 1.0
    if len(a) < size and len(b) < size:  # both complete: exact, by binary search in the sorted sketches
        if not len(a) or not len(b):
            return 0.0
        at = np.minimum(np.searchsorted(b, a), len(b) - 1)
        inter = int((b[at] == a).sum())
        return inter / (len(a) + len(b) - inter)
    union = np.union1d(a, b)[:size]  # a sketch may be cut: estimate from the union's bottom `size`
    both = np.isin(union, a, assume_unique=True) & np.isin(union, b, assume_unique=True)
    return float(both.sum()) / len(union)
