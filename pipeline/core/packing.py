"""Packing: place documents into rows of exactly `target_length` tokens, working on lengths only.

A packer sees each document as an *item* of `footprint` tokens (its tokens plus the separator that
follows it) and returns a `Layout`: which token span of which item goes where in which row. Token
ids are gathered later, per output shard, so packing a million documents is a numpy job.

Strategies:
- `pack_greedy` (greedy@2): items in order, cut where a row ends.
- `pack_best_fit` (best_fit@2): best-fit-decreasing over a bounded lookahead window and a bounded
  set of open rows, streaming (no global sort); cuts a document only when it must, so far fewer
  documents are split than with greedy.

Both follow one cutting rule (new in version 2): an item that fits in a row is cut at most once,
and every piece of a cut item has at least `min_piece` tokens (`packing.min_piece_tokens`). Where
no item can be cut under that rule, the rest of the row is padding. Items longer than a row give
off row-sized chunks and may be cut several times, but also only into pieces of `min_piece` or
more. Version 1 cut wherever a row ended, and best-fit's final repacking cut the smallest piece
again and again, spreading a 17-token document over 7 rows.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

GREEDY = "greedy@2"
BEST_FIT = "best_fit@2"
DEFAULT_MIN_PIECE = 64


def effective_min_piece(min_piece: int, L: int) -> int:
    """The smallest piece a cut may leave in rows of L tokens.

    At most L // 2, so that an item longer than a row can always be cut into pieces of at least
    the minimum that each fit in a row.
    """
    return max(1, min(int(min_piece), L // 2))


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
    """Sort segments, pad every row that falls short, and drop a short final row if asked to."""
    order = np.lexsort((row_start, row))
    item, start, end, row, row_start = item[order], start[order], end[order], row[order], row_start[order]
    n_rows = int(row[-1]) + 1 if len(row) else 0
    fill = np.bincount(row, weights=(end - start), minlength=n_rows).astype(np.int64)
    assert np.all(fill <= L) and np.all(fill > 0), "a row overflows or is empty"
    n_pad = L - fill
    empty = np.zeros(0, np.int64)
    dropped = (empty, empty, empty)
    if n_rows and n_pad[-1] and last_row == "drop":
        keep = row < n_rows - 1
        dropped = (item[~keep], start[~keep], end[~keep])
        item, start, end, row, row_start = item[keep], start[keep], end[keep], row[keep], row_start[keep]
        n_pad = n_pad[:-1]
    return Layout(L, strategy, item, start, end, row, row_start, n_pad, *dropped)


def _check(footprints: np.ndarray) -> np.ndarray:
    fp = np.asarray(footprints, np.int64)
    if np.any(fp <= 0):
        raise ValueError("every item needs a positive footprint")
    return fp


def pack_greedy(
    footprints: np.ndarray,
    L: int,
    last_row: Literal["drop", "pad"] = "pad",
    min_piece: int = DEFAULT_MIN_PIECE,
) -> Layout:
    """Items in order, each continuing where the previous one ended; cut where a row ends.

    Where the cut would leave a piece under `min_piece` tokens, the cut moves back (the row ends
    in padding) or, when no allowed cut exists, the whole item starts the next row.
    With `min_piece=1` this is plain concatenate-and-chop: no padding but in the last row.
    """
    fp = _check(footprints)
    m = effective_min_piece(min_piece, L)
    out: tuple[list[int], list[int], list[int], list[int], list[int]] = ([], [], [], [], [])
    o_item, o_start, o_end, o_row, o_row_start = out
    row = pos = 0
    for it, f in enumerate(fp.tolist()):
        s = 0
        while s < f:
            rest, room = f - s, L - pos
            if rest <= room:
                head = rest
            else:
                # cut here if both sides keep the minimum (an item that fits a row is cut only
                # here, at its start: its rest then fits the next row whole)
                head = min(room, rest - m)
                if head < m:
                    head = 0
            if head:
                o_item.append(it)
                o_start.append(s)
                o_end.append(s + head)
                o_row.append(row)
                o_row_start.append(pos)
                s += head
                pos += head
            if head < rest or pos == L:  # the row is full, or ends in padding
                row, pos = row + 1, 0
    item, start, end, rows, row_start = (np.asarray(x, dtype=np.int64) for x in out)
    return _finish(L, GREEDY, item, start, end, rows, row_start, last_row)


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
    min_piece: int = DEFAULT_MIN_PIECE,
) -> Layout:
    """Streaming best-fit-decreasing with at most `open_bins` rows open and `lookahead` items sorted together.

    Each item goes to the open row with the least room that still holds it whole. With no such row,
    a new row opens; when `open_bins` rows are already open, the fullest one is closed: topped up
    with the smallest waiting items, then with a piece of this item if the cutting rule allows
    (see the module docstring), else with padding. Items of a row's length or more first give off
    whole rows. Open rows are also capped at `max_open_tokens` in total, which bounds the final
    repacking work.
    """
    open_bins = max(1, min(open_bins, max_open_tokens // L))
    fp = _check(footprints)
    m = effective_min_piece(min_piece, L)
    out_item: list[int] = []
    out_start: list[int] = []
    out_end: list[int] = []
    out_row: list[int] = []
    out_row_start: list[int] = []
    bins: dict[int, _Bin] = {}
    by_room: list[tuple[int, int]] = []  # (room left, bin id), ascending: best fit by bisection
    was_cut: set[int] = set()  # items that fit in a row and were cut once already
    next_row = 0
    next_bin = 0

    def cut_head(it: int, size: int, gap: int) -> int:
        """How much of a `size`-token piece of `it` may go into a `gap` it does not fit; 0: none."""
        if gap < m or (fp[it] <= L and it in was_cut):
            return 0
        head = min(gap, size - m)
        return head if head >= m else 0

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

    def place_piece(it: int, s: int, e: int, pending: deque[int]) -> None:
        """Place footprint span [s, e) (shorter than a row) of item `it`, cutting only when it must."""
        nonlocal next_bin
        while s < e:
            size = e - s
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
            # Every row is open and none holds this piece: close the fullest, first topping it up
            # with the smallest waiting items, then with a piece of this one if the rule allows.
            # The rest then opens a row of its own (one row was just closed), so it is not cut again.
            room, bid = by_room.pop(0)
            fullest = bins.pop(bid)
            while pending and fp[pending[-1]] <= L - fullest.fill:
                small = pending.pop()
                fullest.pieces.append((small, 0, int(fp[small])))
                fullest.fill += int(fp[small])
            head = cut_head(it, size, L - fullest.fill)
            if head:
                fullest.pieces.append((it, s, s + head))
                fullest.fill += head
                s += head
                was_cut.add(it)
            close(fullest)

    def place(it: int, s: int, e: int, pending: deque[int]) -> None:
        """Place item `it` from footprint position `s` on: whole rows first if it is that long."""
        # a remainder of 1..m-1 tokens after the whole rows would be a piece under the minimum:
        # stop one row early and cut that last stretch in two pieces of at least m instead
        while e - s == L or e - s - L >= m:
            whole = _Bin()
            whole.pieces.append((it, s, s + L))
            close(whole)
            s += L
        if e - s > L:  # L < e - s < L + m
            place_piece(it, s, e - m, pending)
            place_piece(it, e - m, e, pending)
        elif s < e:
            place_piece(it, s, e, pending)

    n = len(fp)
    for w0 in range(0, n, lookahead):
        window = np.arange(w0, min(n, w0 + lookahead), dtype=np.int64)
        # largest first, ties in input order: deterministic
        pending = deque(window[np.lexsort((window, -fp[window]))].tolist())
        while pending:
            it = pending.popleft()
            place(it, 0, int(fp[it]), pending)

    # Leftover open rows: repack their pieces largest first, each row topped up with the largest
    # piece that still fits; when none fits, the largest piece the rule allows to cut fills the
    # gap and its rest goes back. Rows left with no such piece end in padding.
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
            # nothing fits whole: the largest cuttable piece; only pieces of at least 2m can be cut,
            # and those skipped are rests of earlier cuts (at most one per row), so this scan is short
            if gap < m:
                break  # padding: no piece may be cut this small
            j = len(pool) - 1
            while j >= 0 and sizes[j] >= 2 * m and not cut_head(pool[j][1], sizes[j], gap):
                j -= 1
            if j < 0 or sizes[j] < 2 * m:
                break  # padding
            size, it, s, e = pool.pop(j)
            sizes.pop(j)
            head = cut_head(it, size, gap)
            row_bin.pieces.append((it, s, s + head))
            was_cut.add(it)
            rest = (size - head, it, s + head, e)
            k = bisect_right(sizes, rest[0])
            pool.insert(k, rest)
            sizes.insert(k, rest[0])
            gap -= head
            # a gap under m can still take a whole small piece
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
