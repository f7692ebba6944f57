"""Long contexts for the rewriter: packed pretraining rows read back with their segment lineage.

A context is a `pipeline.synth.chat.Haystack` built from one packed row (and the next row too, when one
row holds fewer tokens than the sample needs): its documents decoded and joined by blank lines,
tokenized once. Passages shown to the model are character spans of that text, cut inside one
document at line or sentence ends, so any quote the model copies has a known place in the context.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.results import TargetPlan, shard_path
from pipeline.core.tokenizer import Tokenizer
from pipeline.synth.chat import Haystack
from pipeline.synth.rewriter.evidence import NormalizedText

# context_format "documents": the context starts within the first head_tokens() haystack tokens (at a
# document's header, or where a sentence begins), and passages are taken after that.
HEAD_TOKENS = 2048


def head_tokens(sample_length: int) -> int:
    """How far in a documents-format context may start: 2048 tokens, a quarter of short samples.
    A clean, exactly sized cut needs a few dozen candidate starts; in verse (long sentences over
    many lines) an eighth of an 8K sample held too few of them."""
    return min(HEAD_TOKENS, sample_length // 4)


@dataclass(frozen=True)
class ContextRef:
    """A packed row: its shard (relative to the output folder), its index there, and its id."""

    path: str
    index: int
    row_id: str


def context_refs(plan: TargetPlan) -> list[ContextRef]:
    """Every row of a packing target, in row order."""
    return [
        ContextRef(
            shard_path(plan, r // plan.rows_per_shard), r % plan.rows_per_shard, f"{plan.config_name}-{r:09d}"
        )
        for r in range(plan.n_rows)
    ]


@dataclass
class Passage:
    """Haystack characters [char_start, char_end) shown to the model."""

    char_start: int
    char_end: int
    text: str
    depth: float  # requested depth, a fraction of the usable context
    part: int  # index of the haystack part (document piece) it lies in


class Context:
    """A haystack with the normalised text used to find quotes in it."""

    def __init__(self, hay: Haystack, row_ids: list[str]) -> None:
        self.hay = hay
        self.row_ids = row_ids

    @cached_property
    def norm(self) -> NormalizedText:
        return NormalizedText.of(self.hay.text)

    def passage(
        self, depth: float, context_tokens: int, usable_end: int, n_tokens: int, lo: int = 0
    ) -> Passage:
        """About `n_tokens` of text at `depth` of a context of `context_tokens`, ending before token
        `usable_end` (room for the question), inside one document, cut at line or sentence ends, and
        starting at token `lo` or later (where the context may start)."""
        hay = self.hay
        cs = hay.char_starts
        n = len(hay)
        end_limit = max(1, min(n, usable_end))
        t0 = lo + int(depth * (min(context_tokens, n) - lo)) - n_tokens // 2
        t0 = max(0, lo, min(t0, end_limit - n_tokens))
        t1 = min(end_limit, t0 + n_tokens)
        centre = int(cs[(t0 + t1) // 2])
        part_i = self._part_at(centre)
        part = hay.parts[part_i]
        a = max(part.char_start, int(cs[t0]))
        b = min(part.char_end, int(cs[t1]))
        width = int(cs[t1]) - int(cs[t0])
        if b - a < width // 2:  # the window straddles a document break: keep it inside the document
            a = max(part.char_start, min(centre - width // 2, part.char_end - width))
            b = min(part.char_end, a + width, int(cs[t1]) if t1 < n else len(hay.text))
        a = _snap_start(hay.text, a, part.char_start, b)
        b = _snap_end(hay.text, b, part.char_end, a)
        return Passage(a, b, hay.text[a:b], depth, part_i)

    def _part_at(self, char: int) -> int:
        starts = [p.char_start for p in self.hay.parts]
        i = int(np.searchsorted(starts, char, side="right")) - 1
        return max(0, min(i, len(starts) - 1))

    def part_lineage(self, part: int) -> dict[str, Any]:
        """Segment lineage of one haystack part (the document piece a passage came from)."""
        p = self.hay.parts[part]
        keys = ("source", "uri", "revision", "record", "doc_id", "content_hash", "is_split", "part")
        out = {k: p.meta.get(k) for k in keys}
        out["row_id"] = p.row_id
        out["row_token_start"] = p.meta.get("row_token_start")
        out["row_token_end"] = p.meta.get("row_token_end")
        return out


_ENDS = ("\n", ". ", "? ", "! ", "; ")


def _snap_start(text: str, pos: int, lo: int, hi: int) -> int:
    """Move a start forward to just after a line or sentence end (within 200 characters)."""
    if pos <= lo:
        return lo
    window = text[pos : min(hi, pos + 200)]
    found = [window.find(sep) + len(sep) for sep in _ENDS if window.find(sep) >= 0]
    return pos + min(found) if found else pos


def _snap_end(text: str, pos: int, hi: int, lo: int) -> int:
    """Move an end back to just after a line or sentence end (within 200 characters)."""
    if pos >= hi:
        return hi
    start = max(lo + 1, pos - 200)
    window = text[start:pos]
    found = [window.rfind(sep) + len(sep.rstrip(" ")) for sep in _ENDS if window.rfind(sep) >= 0]
    return start + max(found) if found else pos


class ContextReader:
    """Reads packed rows by reference (only the row groups needed) and builds their haystacks."""

    COLUMNS = ("row_id", "input_ids", "segments")

    def __init__(
        self, out: Path, tok: Tokenizer, header: Callable[[Mapping[str, Any]], str] | None = None
    ) -> None:
        self.out = out
        self.tok = tok
        self.header = header  # a title line before each document (rewriter.context_format: documents)
        self._files: dict[str, pq.ParquetFile] = {}
        self._groups: dict[tuple[str, int], pa.Table] = {}

    def _file(self, path: str) -> pq.ParquetFile:
        if path not in self._files:
            self._files[path] = pq.ParquetFile(self.out / path)
        return self._files[path]

    def _group(self, path: str, g: int) -> pa.Table:
        """Row group g of a shard; the last few stay in memory (contexts of a batch are neighbours)."""
        key = (path, g)
        if key not in self._groups:
            if len(self._groups) >= 2:
                self._groups.pop(next(iter(self._groups)))
            self._groups[key] = self._file(path).read_row_group(g, columns=list(self.COLUMNS))
        return self._groups[key]

    def row(self, ref: ContextRef) -> dict[str, Any]:
        f = self._file(ref.path)
        ends = np.cumsum([f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)])
        g = int(np.searchsorted(ends, ref.index, side="right"))
        first = int(ends[g - 1]) if g else 0
        t = self._group(ref.path, g).slice(ref.index - first, 1)
        row_id = t.column("row_id")[0].as_py()
        if row_id != ref.row_id:
            raise ValueError(f"{ref.path} row {ref.index}: expected {ref.row_id}, found {row_id}")
        return {
            "row_id": row_id,
            "input_ids": t.column("input_ids").combine_chunks().flatten().to_numpy(),
            "segments": t.column("segments")[0].as_py(),
        }

    def context(self, refs: list[ContextRef], min_tokens: int) -> Context:
        """The haystack of the first row, extended by the next ones only while it is under `min_tokens`."""
        rows = [self.row(refs[0])]
        hay = Haystack.from_rows(self.tok, rows, header=self.header)
        for ref in refs[1:]:
            if len(hay) >= min_tokens:
                break
            rows.append(self.row(ref))
            hay = Haystack.from_rows(self.tok, rows, header=self.header)
        return Context(hay, [r["row_id"] for r in rows])


def document_header(fmt: str) -> Callable[[Mapping[str, Any]], str]:
    """The header line of a document piece from `rewriter.document_header` and its segment fields."""

    def header(seg: Mapping[str, Any]) -> str:
        continued = int(seg.get("doc_token_start") or 0) > 0
        return (
            " ".join(
                fmt.format(
                    source=seg.get("source") or "",
                    doc_id=seg.get("doc_id") or "",
                    uri=seg.get("uri") or "",
                    continued=", continued" if continued else "",
                ).split()
            )
            or "###"
        )  # never an empty line: the header must be visible text

    return header
