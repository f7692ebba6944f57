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


class Segments:
    """Segments a streaming packer has emitted, in (row, row_start) order; `item` is the caller's id."""

    __slots__ = ("end", "fp", "item", "row", "row_start", "start")

    def __init__(self) -> None:
        self.item: list[int] = []
        self.start: list[int] = []
        self.end: list[int] = []
        self.row: list[int] = []
        self.row_start: list[int] = []
        self.fp: list[int] = []  # the item's whole footprint (callers that stream need it per segment)

    def __len__(self) -> int:
        return len(self.item)

    def take(self, upto_row: int | None = None) -> tuple[np.ndarray, ...]:
        """Remove and return (item, start, end, row, row_start, fp) of the segments in rows < `upto_row`
        (all when None), as int64 arrays. Rows are emitted in order, so that is a prefix."""
        n = len(self.item) if upto_row is None else bisect_left(self.row, upto_row)
        out = tuple(np.asarray(xs[:n], dtype=np.int64) for xs in self._lists())
        for xs in self._lists():
            del xs[:n]
        return out

    def _lists(self) -> tuple[list[int], ...]:
        return (self.item, self.start, self.end, self.row, self.row_start, self.fp)


class GreedyPacker:
    """`pack_greedy` as a stream: feed footprints (with the caller's item ids) in any chunks, take the
    finished rows' segments as they come, and `finish` at the end. Holds one row's state, no history."""

    strategy = GREEDY

    def __init__(self, L: int, min_piece: int = DEFAULT_MIN_PIECE) -> None:
        self.L = L
        self.m = effective_min_piece(min_piece, L)
        self.seg = Segments()
        self.row = self.pos = 0

    def feed(self, footprints: np.ndarray, ids: np.ndarray) -> None:
        fp = _check(footprints)
        L, m, seg = self.L, self.m, self.seg
        row, pos = self.row, self.pos
        for it, f in zip(ids.tolist(), fp.tolist(), strict=True):
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
                    seg.item.append(it)
                    seg.start.append(s)
                    seg.end.append(s + head)
                    seg.row.append(row)
                    seg.row_start.append(pos)
                    seg.fp.append(f)
                    s += head
                    pos += head
                if head < rest or pos == L:  # the row is full, or ends in padding
                    row, pos = row + 1, 0
        self.row, self.pos = row, pos

    def done_rows(self) -> int:
        """Rows that no later item can change (all but the one being filled)."""
        return self.row

    def finish(self) -> None:
        """Nothing is pending in a greedy packing; here for the common interface."""


class _Bin:
    __slots__ = ("fill", "pieces")

    def __init__(self) -> None:
        self.fill = 0
        self.pieces: list[tuple[int, int, int]] = []  # (item, start, end)


class BestFitPacker:
    """`pack_best_fit` as a stream (see there for the rule). Items are given with ids that increase in
    input order (ties are broken by id, as by position in the batch version). State: the open rows,
    the current lookahead window and the footprints of the items still in either, so memory does not
    grow with the number of items; finished rows' segments are taken with `seg.take`."""

    strategy = BEST_FIT

    def __init__(
        self,
        L: int,
        open_bins: int = 1024,
        lookahead: int = 16384,
        max_open_tokens: int = 1 << 26,
        min_piece: int = DEFAULT_MIN_PIECE,
    ) -> None:
        self.L = L
        self.open_bins = max(1, min(open_bins, max_open_tokens // L))
        self.lookahead = lookahead
        self.m = effective_min_piece(min_piece, L)
        self.seg = Segments()
        self.bins: dict[int, _Bin] = {}
        self.by_room: list[tuple[int, int]] = []  # (room left, bin id), ascending: best fit by bisection
        self.was_cut: set[int] = set()  # items that fit in a row and were cut once already
        self.fp: dict[int, int] = {}  # footprints of the items in the window or in open rows
        self.next_row = 0
        self.next_bin = 0
        self._buf_fp: list[np.ndarray] = []
        self._buf_id: list[np.ndarray] = []
        self._buffered = 0

    # -- the rule, as in the batch version ----------------------------------------------------------

    def _cut_head(self, it: int, size: int, gap: int) -> int:
        """How much of a `size`-token piece of `it` may go into a `gap` it does not fit; 0: none."""
        if gap < self.m or (self.fp[it] <= self.L and it in self.was_cut):
            return 0
        head = min(gap, size - self.m)
        return head if head >= self.m else 0

    def _close(self, b: _Bin) -> None:
        pos = 0
        seg = self.seg
        for it, s, e in b.pieces:
            seg.item.append(it)
            seg.start.append(s)
            seg.end.append(e)
            seg.row.append(self.next_row)
            seg.row_start.append(pos)
            seg.fp.append(self.fp[it])
            pos += e - s
        self.next_row += 1

    def _put(self, bid: int, room: int, it: int, s: int, e: int) -> None:
        b = self.bins[bid]
        b.pieces.append((it, s, e))
        b.fill += e - s
        if room - (e - s) == 0:
            self._close(self.bins.pop(bid))
        else:
            insort(self.by_room, (room - (e - s), bid))

    def _place_piece(self, it: int, s: int, e: int, pending: deque[int]) -> None:
        """Place footprint span [s, e) (shorter than a row) of item `it`, cutting only when it must."""
        fp, L = self.fp, self.L
        while s < e:
            size = e - s
            i = bisect_left(self.by_room, (size, -1))
            if i < len(self.by_room):
                room, bid = self.by_room.pop(i)
                self._put(bid, room, it, s, e)
                return
            if len(self.bins) < self.open_bins:
                self.bins[self.next_bin] = _Bin()
                self._put(self.next_bin, L, it, s, e)
                self.next_bin += 1
                return
            # Every row is open and none holds this piece: close the fullest, first topping it up
            # with the smallest waiting items, then with a piece of this one if the rule allows.
            # The rest then opens a row of its own (one row was just closed), so it is not cut again.
            room, bid = self.by_room.pop(0)
            fullest = self.bins.pop(bid)
            while pending and fp[pending[-1]] <= L - fullest.fill:
                small = pending.pop()
                fullest.pieces.append((small, 0, fp[small]))
                fullest.fill += fp[small]
            head = self._cut_head(it, size, L - fullest.fill)
            if head:
                fullest.pieces.append((it, s, s + head))
                fullest.fill += head
                s += head
                self.was_cut.add(it)
            self._close(fullest)

    def _place(self, it: int, s: int, e: int, pending: deque[int]) -> None:
        """Place item `it` from footprint position `s` on: whole rows first if it is that long."""
        L, m = self.L, self.m
        # a remainder of 1..m-1 tokens after the whole rows would be a piece under the minimum:
        # stop one row early and cut that last stretch in two pieces of at least m instead
        while e - s == L or e - s - L >= m:
            whole = _Bin()
            whole.pieces.append((it, s, s + L))
            self._close(whole)
            s += L
        if e - s > L:  # L < e - s < L + m
            self._place_piece(it, s, e - m, pending)
            self._place_piece(it, e - m, e, pending)
        elif s < e:
            self._place_piece(it, s, e, pending)

    def _window(self, fp: np.ndarray, ids: np.ndarray) -> None:
        for it, f in zip(ids.tolist(), fp.tolist(), strict=True):
            self.fp[it] = f
        # largest first, ties in input order: deterministic
        pending = deque(ids[np.lexsort((ids, -fp))].tolist())
        while pending:
            it = pending.popleft()
            self._place(it, 0, self.fp[it], pending)
        # forget what no open row refers to: memory stays bounded by the open rows
        live = {it for b in self.bins.values() for it, _s, _e in b.pieces}
        self.fp = {it: self.fp[it] for it in live}
        self.was_cut &= live

    # -- the stream -----------------------------------------------------------------------------

    def feed(self, footprints: np.ndarray, ids: np.ndarray) -> None:
        fp = _check(footprints)
        ids = np.asarray(ids, np.int64)
        self._buf_fp.append(fp)
        self._buf_id.append(ids)
        self._buffered += len(fp)
        if self._buffered < self.lookahead:
            return
        all_fp, all_id = np.concatenate(self._buf_fp), np.concatenate(self._buf_id)
        n_full = len(all_fp) // self.lookahead * self.lookahead
        for w0 in range(0, n_full, self.lookahead):
            self._window(all_fp[w0 : w0 + self.lookahead], all_id[w0 : w0 + self.lookahead])
        self._buf_fp, self._buf_id = [all_fp[n_full:]], [all_id[n_full:]]
        self._buffered = len(all_fp) - n_full

    def done_rows(self) -> int:
        """Rows closed so far: no later item changes them."""
        return self.next_row

    def finish(self) -> None:
        """Pack the last partial window and repack the rows left open."""
        if self._buffered:
            self._window(np.concatenate(self._buf_fp), np.concatenate(self._buf_id))
            self._buf_fp, self._buf_id, self._buffered = [], [], 0
        L, m = self.L, self.m
        # Leftover open rows: repack their pieces largest first, each row topped up with the largest
        # piece that still fits; when none fits, the largest piece the rule allows to cut fills the
        # gap and its rest goes back. Rows left with no such piece end in padding.
        pool = sorted(
            ((e - s, it, s, e) for b in self.bins.values() for it, s, e in b.pieces),
            key=lambda p: (p[0], -p[1]),
        )
        self.bins.clear()
        self.by_room.clear()
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
                # nothing fits whole: the largest cuttable piece; only pieces of at least 2m can be
                # cut, and those skipped are rests of earlier cuts (at most one per row), so this scan
                # is short
                if gap < m:
                    break  # padding: no piece may be cut this small
                j = len(pool) - 1
                while j >= 0 and sizes[j] >= 2 * m and not self._cut_head(pool[j][1], sizes[j], gap):
                    j -= 1
                if j < 0 or sizes[j] < 2 * m:
                    break  # padding
                size, it, s, e = pool.pop(j)
                sizes.pop(j)
                head = self._cut_head(it, size, gap)
                row_bin.pieces.append((it, s, s + head))
                self.was_cut.add(it)
                rest = (size - head, it, s + head, e)
                k = bisect_right(sizes, rest[0])
                pool.insert(k, rest)
                sizes.insert(k, rest[0])
                gap -= head
                # a gap under m can still take a whole small piece
            self._close(row_bin)
        self.fp.clear()
        self.was_cut.clear()


Packer = GreedyPacker | BestFitPacker


def _run(packer: Packer, fp: np.ndarray, L: int, last_row: Literal["drop", "pad"]) -> Layout:
    packer.feed(fp, np.arange(len(fp), dtype=np.int64))
    packer.finish()
    item, start, end, row, row_start, _fp = packer.seg.take()
    return _finish(L, packer.strategy, item, start, end, row, row_start, last_row)


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
    return _run(GreedyPacker(L, min_piece), fp, L, last_row)


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
    fp = _check(footprints)
    return _run(BestFitPacker(L, open_bins, lookahead, max_open_tokens, min_piece), fp, L, last_row)
