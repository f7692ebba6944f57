"""Property tests of the packers: exact row lengths, every token placed exactly once, spans disjoint."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.packing import Layout, pack_best_fit, pack_greedy

footprints = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=300).map(
    lambda xs: np.array(xs, np.int64)
)
lengths = st.sampled_from([16, 64, 1000, 4096])


def check_layout(lay: Layout, fp: np.ndarray, L: int, last_row: str) -> None:
    # every row is exactly L: its segments plus padding (padding only in the last row)
    fill = np.bincount(lay.row, weights=lay.end - lay.start, minlength=lay.n_rows).astype(np.int64)
    assert np.all(fill + lay.n_pad == L)
    assert np.all(lay.n_pad[:-1] == 0)
    # segments within a row are disjoint and cover [0, L - pad) without gaps, in order
    for r in range(lay.n_rows):
        sel = lay.row == r
        starts, sizes = lay.row_start[sel], (lay.end - lay.start)[sel]
        assert np.all(np.diff(starts) > 0)
        assert starts[0] == 0
        assert np.array_equal(starts[1:], (starts + sizes)[:-1])
    # every item's spans (placed or dropped) tile [0, footprint) exactly once
    item = np.concatenate([lay.item, lay.dropped_item])
    start = np.concatenate([lay.start, lay.dropped_start])
    end = np.concatenate([lay.end, lay.dropped_end])
    order = np.lexsort((start, item))
    item, start, end = item[order], start[order], end[order]
    for i in range(len(fp)):
        sel = item == i
        s, e = start[sel], end[sel]
        assert len(s) >= 1, f"item {i} lost"
        assert s[0] == 0 and e[-1] == fp[i]
        assert np.array_equal(s[1:], e[:-1]), f"item {i} has a gap or overlap"
    if last_row == "drop":
        assert lay.n_pad.sum() == 0
        assert int((lay.dropped_end - lay.dropped_start).sum()) < L
    else:
        assert len(lay.dropped_item) == 0


@settings(max_examples=150, deadline=None)
@given(fp=footprints, L=lengths, last_row=st.sampled_from(["pad", "drop"]))
def test_greedy_properties(fp: np.ndarray, L: int, last_row: str) -> None:
    check_layout(pack_greedy(fp, L, last_row), fp, L, last_row)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(
    fp=footprints,
    L=lengths,
    last_row=st.sampled_from(["pad", "drop"]),
    open_bins=st.integers(1, 40),
    lookahead=st.integers(1, 64),
)
def test_best_fit_properties(fp: np.ndarray, L: int, last_row: str, open_bins: int, lookahead: int) -> None:
    lay = pack_best_fit(fp, L, last_row, open_bins=open_bins, lookahead=lookahead)  # type: ignore[arg-type]
    check_layout(lay, fp, L, last_row)


def test_best_fit_cuts_fewer_documents_than_greedy() -> None:
    rng = np.random.default_rng(7)
    fp = rng.lognormal(5.5, 1.2, 20_000).astype(np.int64) + 2  # short-document heavy, like web text
    L = 16_384
    fits = fp <= L

    def needless(lay: Layout) -> int:
        return int(fits[lay.split_items()].sum())

    greedy, best = needless(pack_greedy(fp, L)), needless(pack_best_fit(fp, L))
    assert greedy > 100
    assert best < greedy / 5, (best, greedy)


def test_over_long_items_are_split_not_truncated() -> None:
    fp = np.array([10, 25_000, 7], np.int64)
    for lay in (pack_greedy(fp, 1024), pack_best_fit(fp, 1024)):
        mask = lay.item == 1
        assert int((lay.end - lay.start)[mask].sum()) == 25_000
        assert mask.sum() >= 25  # at least ceil(25000 / 1024) pieces
        assert 1 in lay.split_items()


def test_last_row_drop_reports_the_dropped_tail() -> None:
    fp = np.array([600, 600, 600], np.int64)
    lay = pack_greedy(fp, 1000, "drop")
    assert lay.n_rows == 1
    assert int((lay.dropped_end - lay.dropped_start).sum()) == 800
    padded = pack_greedy(fp, 1000, "pad")
    assert padded.n_rows == 2 and padded.n_pad[-1] == 200


def test_rejects_empty_items() -> None:
    with pytest.raises(ValueError):
        pack_greedy(np.array([3, 0]), 8)
