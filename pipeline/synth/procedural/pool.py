"""Packed pretraining rows as haystack material, read a row group at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.core.tokenizer import Tokenizer
from pipeline.synth.chat import Haystack

ROW_COLUMNS = ["row_id", "input_ids", "segments", "lineage"]


@dataclass(frozen=True)
class PoolFile:
    path: str  # absolute
    rows: int


class RowPool:
    """Every packed row of a run, addressable by one index; consecutive rows make long haystacks."""

    CACHED_GROUPS = 4  # row groups hold <= output.row_group_tokens tokens each (16 MB of ids at 4M)

    def __init__(self, files: list[PoolFile]) -> None:
        self.files = [f for f in files if f.rows > 0]
        if not self.files:
            raise ValueError(
                "procedural: no packed rows to draw haystacks from; the build wrote no pretraining rows"
            )
        self._ends = np.cumsum([f.rows for f in self.files])
        self._meta: dict[int, np.ndarray] = {}  # file -> row-group ends
        self._cache: dict[tuple[int, int], Any] = {}  # a few recently read row groups

    @property
    def n_rows(self) -> int:
        return int(self._ends[-1])

    def _group_ends(self, fi: int) -> np.ndarray:
        if fi not in self._meta:
            md = pq.ParquetFile(self.files[fi].path).metadata
            self._meta[fi] = np.cumsum([md.row_group(g).num_rows for g in range(md.num_row_groups)])
        return self._meta[fi]

    def row(self, i: int) -> dict[str, Any]:
        """Row i: row_id, input_ids (numpy), segments (dicts), lineage."""
        i %= self.n_rows
        fi = int(np.searchsorted(self._ends, i, side="right"))
        local = i - (int(self._ends[fi - 1]) if fi else 0)
        ends = self._group_ends(fi)
        g = int(np.searchsorted(ends, local, side="right"))
        table = self._cache.pop((fi, g), None)
        if table is None:
            table = pq.ParquetFile(self.files[fi].path).read_row_group(g, columns=ROW_COLUMNS)
            while len(self._cache) >= self.CACHED_GROUPS:
                self._cache.pop(next(iter(self._cache)))
        self._cache[(fi, g)] = table  # most recent last
        j = local - (int(ends[g - 1]) if g else 0)
        one = table.slice(j, 1)
        ids = one.column("input_ids").combine_chunks().values.to_numpy(zero_copy_only=False)
        return {
            "row_id": one.column("row_id")[0].as_py(),
            "input_ids": ids,
            "segments": one.column("segments")[0].as_py(),
            "lineage": one.column("lineage")[0].as_py(),
        }

    def haystack(self, tok: Tokenizer, start_row: int, min_tokens: int) -> tuple[Haystack, list[dict], bool]:
        """A haystack of at least `min_tokens` text tokens from consecutive rows starting at `start_row`.

        Returns the haystack, the rows used (without their ids), and whether the pool had to be
        wrapped around and rows repeated because it holds fewer tokens than asked for.
        """
        rows: list[dict[str, Any]] = []
        tokens = 0
        k = 0
        while tokens < min_tokens:
            r = self.row(start_row + k)
            tokens += sum(int(s["row_token_end"]) - int(s["row_token_start"]) for s in r["segments"])
            rows.append(r)
            k += 1
            if k > self.n_rows and tokens == 0:
                raise ValueError("procedural: the packed rows hold no document text")
        repeated = k > self.n_rows
        hay = Haystack.from_rows(tok, rows, max_tokens=min_tokens)
        return hay, [{"row_id": r["row_id"], "lineage": r["lineage"]} for r in rows], repeated


def pool_from_shards(out: Path, paths_and_rows: list[tuple[str, int]]) -> RowPool:
    return RowPool([PoolFile(str(out / p), n) for p, n in paths_and_rows])
