"""Packing: place documents into rows of exactly `target_length` tokens, working on lengths only.

A packer sees each document as an *item* of `footprint` tokens (its tokens plus the separator that
follows it) and returns a `Layout`: which token span of which item goes where in which row. Token
ids are gathered later, per output shard, so packing a million documents is a numpy job.

Strategies:
- `pack_greedy` (greedy@1): items in order, cut at every row boundary.
- `pack_best_fit` (best_fit@1): best-fit-decreasing over a bounded lookahead window and a bounded
  set of open rows, streaming (no global sort); cuts a document only when it must, so far fewer
  documents are split than with greedy.
Items longer than a row are split into row-sized chunks by both, and the split is recorded.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

GREEDY = "greedy@1"
BEST_FIT = "best_fit@1"


@dataclass
class Layout:
    """Segments of a packing, sorted by (row, row_start). Coordinates are footprint tokens."""

    target_length: int
    strategy: str
    item: np.ndarray  # int64: which item
    start: np.ndarray  # int64: span start in the item's footprint
    end: np.ndarray  # int64: span end (exclusive)
    row: np.ndarray  # int64: row index
    row_start: np.ndarray  # int64: position of the span in the row
    n_pad: np.ndarray  # int64 per row: padding tokens at the end of the row
    # spans of a final partial row that config said to drop: (item, start, end)
    dropped_item: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dropped_start: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dropped_end: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def n_rows(self) -> int:
        return len(self.n_pad)

    def row_range(self, first: int, last: int) -> slice:
        """Segment index range of rows [first, last)."""
        lo = int(np.searchsorted(self.row, first, side="left"))
        hi = int(np.searchsorted(self.row, last, side="left"))
        return slice(lo, hi)

    def split_items(self) -> np.ndarray:
        """Items that were cut into more than one segment (or lost a part to a dropped tail)."""
        counts = np.bincount(self.item, minlength=int(self.item.max(initial=-1)) + 1)
        cut = np.flatnonzero(counts > 1)
        if len(self.dropped_item):
            partly = np.intersect1d(np.unique(self.dropped_item), np.unique(self.item))
            cut = np.union1d(cut, partly)
        return cut


def _finish(
    L: int,
    strategy: str,
    item: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    row: np.ndarray,
    row_start: np.ndarray,
    last_row: Literal["drop", "pad"],
) -> Layout:
    """Sort segments, handle the final partial row, and compute padding."""
    order = np.lexsort((row_start, row))
    item, start, end, row, row_start = item[order], start[order], end[order], row[order], row_start[order]
    n_rows = int(row[-1]) + 1 if len(row) else 0
    fill = np.bincount(row, weights=(end - start), minlength=n_rows).astype(np.int64)
    partial = np.flatnonzero(fill < L)
    assert len(partial) <= 1 and (len(partial) == 0 or partial[0] == n_rows - 1), (
        "only the last row may be partial"
    )
    n_pad = np.zeros(n_rows, np.int64)
    empty = np.zeros(0, np.int64)
    dropped = (empty, empty, empty)
    if len(partial):
        if last_row == "pad":
            n_pad[-1] = L - fill[-1]
        else:
            keep = row < n_rows - 1
            dropped = (item[~keep], start[~keep], end[~keep])
            item, start, end, row, row_start = item[keep], start[keep], end[keep], row[keep], row_start[keep]
            n_pad = n_pad[:-1]
    return Layout(L, strategy, item, start, end, row, row_start, n_pad, *dropped)


def pack_greedy(footprints: np.ndarray, L: int, last_row: Literal["drop", "pad"] = "pad") -> Layout:
    """Concatenate items in order and cut at every multiple of L (fully vectorised)."""
    fp = np.asarray(footprints, np.int64)
    if np.any(fp <= 0):
        raise ValueError("every item needs a positive footprint")
    ends = np.cumsum(fp)
    starts = ends - fp
    # segments per item = rows it touches
    first_row = starts // L
    last_row_idx = (ends - 1) // L
    nseg = last_row_idx - first_row + 1
    item = np.repeat(np.arange(len(fp), dtype=np.int64), nseg)
    k = np.arange(len(item), dtype=np.int64) - np.repeat(
        np.cumsum(nseg) - nseg, nseg
    )  # segment index within item
    row = np.repeat(first_row, nseg) + k
    g_start = np.maximum(np.repeat(starts, nseg), row * L)
    g_end = np.minimum(np.repeat(ends, nseg), (row + 1) * L)
    start = g_start - np.repeat(starts, nseg)
    end = g_end - np.repeat(starts, nseg)
    return _finish(L, GREEDY, item, start, end, row, g_start - row * L, last_row)


class _Bin:
    __slots__ = ("fill", "pieces")

    def __init__(self) -> None:
        self.fill = 0
        self.pieces: list[tuple[int, int, int]] = []  # (item, start, end)


def pack_best_fit(
    footprints: np.ndarray,
    L: int,
    last_row: Literal["drop", "pad"] = "pad",
    open_bins: int = 1024,
    lookahead: int = 16384,
    max_open_tokens: int = 1 << 26,
) -> Layout:
    """Streaming best-fit-decreasing with at most `open_bins` rows open and `lookahead` items sorted together.

    Each item goes to the open row with the least room that still holds it whole. With no such row,
    a new row opens; when `open_bins` rows are already open, the fullest one is closed by cutting the
    item to fill its gap exactly. Items of a row's length or more first give off whole rows.
    Open rows are also capped at `max_open_tokens` in total, which bounds the final repacking work.
    """
    open_bins = max(1, min(open_bins, max_open_tokens // L))
    fp = np.asarray(footprints, np.int64)
    if np.any(fp <= 0):
        raise ValueError("every item needs a positive footprint")
    out_item: list[int] = []
    out_start: list[int] = []
    out_end: list[int] = []
    out_row: list[int] = []
    out_row_start: list[int] = []
    bins: dict[int, _Bin] = {}
    by_room: list[tuple[int, int]] = []  # (room left, bin id), ascending: best fit by bisection
    next_row = 0
    next_bin = 0

    def close(b: _Bin) -> None:
        nonlocal next_row
        pos = 0
        for it, s, e in b.pieces:
            out_item.append(it)
            out_start.append(s)
            out_end.append(e)
            out_row.append(next_row)
            out_row_start.append(pos)
            pos += e - s
        next_row += 1

    def put(bid: int, room: int, it: int, s: int, e: int) -> None:
        b = bins[bid]
        b.pieces.append((it, s, e))
        b.fill += e - s
        if room - (e - s) == 0:
            close(bins.pop(bid))
        else:
            insort(by_room, (room - (e - s), bid))

    def place(it: int, s: int, e: int, pending: deque[int]) -> None:
        """Place footprint span [s, e) of item `it`, cutting only when no open row can take it."""
        nonlocal next_bin
        while s < e:
            size = e - s
            if size >= L:
                whole = _Bin()
                whole.pieces.append((it, s, s + L))
                close(whole)
                s += L
                continue
            i = bisect_left(by_room, (size, -1))
            if i < len(by_room):
                room, bid = by_room.pop(i)
                put(bid, room, it, s, e)
                return
            if len(bins) < open_bins:
                bins[next_bin] = _Bin()
                put(next_bin, L, it, s, e)
                next_bin += 1
                return
            # Every row is open and none holds this item: close the fullest, first topping it up
            # with the smallest waiting items, and cut this item only for what still remains.
            room, bid = by_room.pop(0)
            fullest = bins.pop(bid)
            while pending and fp[pending[-1]] <= L - fullest.fill:
                small = pending.pop()
                fullest.pieces.append((small, 0, int(fp[small])))
                fullest.fill += int(fp[small])
            gap = L - fullest.fill
            if gap:
                fullest.pieces.append((it, s, s + gap))
                fullest.fill = L
                s += gap
            close(fullest)

    n = len(fp)
    for w0 in range(0, n, lookahead):
        window = np.arange(w0, min(n, w0 + lookahead), dtype=np.int64)
        # largest first, ties in input order: deterministic
        pending = deque(window[np.lexsort((window, -fp[window]))].tolist())
        while pending:
            it = pending.popleft()
            place(it, 0, int(fp[it]), pending)

    # Leftover open rows: repack their pieces largest first, each row topped up with the largest
    # piece that still fits and cut at most once to close it; only the very last row can fall short.
    pool = sorted(
        ((e - s, it, s, e) for b in bins.values() for it, s, e in b.pieces),
        key=lambda p: (p[0], -p[1]),
    )
    sizes = [p[0] for p in pool]
    while pool:
        size, it, s, e = pool.pop()
        sizes.pop()
        row_bin = _Bin()
        row_bin.pieces.append((it, s, e))
        gap = L - size
        while gap and pool:
            i = bisect_right(sizes, gap) - 1
            if i >= 0:
                size, it, s, e = pool.pop(i)
                sizes.pop(i)
                row_bin.pieces.append((it, s, e))
                gap -= size
                continue
            size, it, s, e = pool.pop(0)  # nothing fits whole: cut the smallest piece
            sizes.pop(0)
            row_bin.pieces.append((it, s, s + gap))
            rest = (size - gap, it, s + gap, e)
            j = bisect_right(sizes, rest[0])
            pool.insert(j, rest)
            sizes.insert(j, rest[0])
            gap = 0
        close(row_bin)

    as_arr = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
    return _finish(
        L,
        BEST_FIT,
        as_arr(out_item),
        as_arr(out_start),
        as_arr(out_end),
        as_arr(out_row),
        as_arr(out_row_start),
        last_row,
    )
