"""Haystacks: real packed rows tokenized once, with the lineage of every source segment."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.core.tokenizer import Tokenizer
from pipeline.synth.chat.boundaries import (
    boundary_tables,
    decode_ordinary,
    require_byte_level,
    safe_boundaries,
    token_char_starts,
)

# --- haystack -------------------------------------------------------------------------------------------


@dataclass
class HaystackPart:
    """A run of haystack text that came from one place (a packed row's segment, or given text)."""

    char_start: int  # in the haystack text
    char_end: int
    meta: dict[str, Any] = field(default_factory=dict)  # SEGMENT_TYPE fields, if from a packed row
    row_id: str | None = None
    lead_chars: int = 0  # chars stripped before char_start (relative to the segment's decoded text)
    lead_bytes: int = 0


class Haystack:
    """Real text tokenized once, with its safe boundaries and the lineage of each part."""

    JOIN = "\n\n"  # between documents: a blank line, never a special token

    def __init__(
        self,
        tok: Tokenizer,
        text: str,
        parts: list[HaystackPart] | None = None,
        ids: np.ndarray | None = None,
    ) -> None:
        """`ids`, if given, must be the tokenization of `text` (`from_rows` assembles it from the rows)."""
        require_byte_level(tok)
        self.tok = tok
        self.text = text
        self.ids = tok.encode(text) if ids is None else np.asarray(ids, np.int32)
        self.reused_ids = ids is not None
        self.parts = parts if parts is not None else [HaystackPart(0, len(text))]
        self._part_starts = [p.char_start for p in self.parts]

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def char_starts(self) -> np.ndarray:
        return token_char_starts(self.tok, self.ids)

    @cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return safe_boundaries(self.tok, self.ids)

    @property
    def line_bounds(self) -> np.ndarray:
        return self._bounds[0]

    @property
    def inline_bounds(self) -> np.ndarray:
        return self._bounds[1]

    @property
    def sentence_bounds(self) -> np.ndarray:
        return self._bounds[2]

    @cached_property
    def any_bounds(self) -> np.ndarray:
        """Line and inline boundaries together, sorted."""
        mask = np.zeros(len(self.ids) + 1, bool)
        mask[self.line_bounds] = True
        mask[self.inline_bounds] = True
        return np.flatnonzero(mask)

    @classmethod
    def from_documents(cls, tok: Tokenizer, docs: Sequence[str]) -> Haystack:
        """Plain documents joined by blank lines (leading/trailing whitespace stripped)."""
        texts: list[str] = []
        parts: list[HaystackPart] = []
        pos = 0
        for d in docs:
            body = d.strip()
            if not body:
                continue
            if texts:
                pos += len(cls.JOIN)
            lead = len(d) - len(d.lstrip())
            parts.append(
                HaystackPart(pos, pos + len(body), lead_chars=lead, lead_bytes=len(d[:lead].encode()))
            )
            texts.append(body)
            pos += len(body)
        return cls(tok, cls.JOIN.join(texts), parts)

    def retokenized(self) -> Haystack:
        """The same text and parts with ids from a full tokenization (the fallback for reused ids)."""
        return Haystack(self.tok, self.text, self.parts)

    @classmethod
    def from_rows(
        cls,
        tok: Tokenizer,
        rows: Sequence[Mapping[str, Any]],
        max_tokens: int | None = None,
        reuse_ids: bool = True,
        header: Callable[[Mapping[str, Any]], str] | None = None,
    ) -> Haystack:
        """Packed rows (`row_id`, `input_ids`, `segments`) decoded segment by segment, joined by blank lines.

        Separators and padding are not text and never enter the haystack. With `max_tokens`, only the
        first `max_tokens` row tokens of text are used (the last segment is cut short and marked split).

        With `reuse_ids`, the haystack is not tokenized again: a segment's row tokens between its first
        and last safe boundary are the tokenization of that text wherever it stands, so only the short
        head and tail of each segment (where it was cut from its document, stripped, and joined to the
        next) are re-tokenized, in one batch.

        With `header`, every document piece is preceded by the line `header(segment)` (a title or
        boundary marker); the header is haystack text outside every part, like the blank lines.
        """
        texts: list[str] = []
        heads: list[str] = []
        parts: list[HaystackPart] = []
        plans: list[tuple[np.ndarray, np.ndarray, int] | None] = []  # per part: (seg ids, char starts, lead)
        pos = 0
        used = 0
        for row in rows:
            ids = np.asarray(row["input_ids"])
            for seg in row["segments"]:
                if max_tokens is not None and used >= max_tokens:
                    break
                a, b = int(seg["row_token_start"]), int(seg["row_token_end"])
                if max_tokens is not None and used + (b - a) > max_tokens:
                    cut = max_tokens - used
                    seg = {**seg, "row_token_end": a + cut, "is_split": True}
                    if seg.get("doc_token_start") is not None:
                        seg["doc_token_end"] = int(seg["doc_token_start"]) + cut
                    b = a + cut
                used += b - a
                raw = decode_ordinary(tok, ids[a:b])  # segments hold ordinary tokens only
                # a split segment may begin or end inside a multi-byte character: drop the partial bytes
                head_cut = 0
                while head_cut < len(raw) and head_cut < 3 and raw[head_cut] & 0xC0 == 0x80:
                    head_cut += 1
                decoded = raw[head_cut:].decode("utf-8", errors="ignore")
                body = decoded.strip()
                if not body:
                    continue
                lead = len(decoded) - len(decoded.lstrip())
                if texts:
                    pos += len(cls.JOIN)
                head = header(seg) + "\n" if header is not None else ""
                pos += len(head)
                heads.append(head)
                parts.append(
                    HaystackPart(
                        pos,
                        pos + len(body),
                        meta=dict(seg),
                        row_id=row.get("row_id"),
                        lead_chars=lead,
                        lead_bytes=head_cut + len(decoded[:lead].encode()),
                    )
                )
                texts.append(body)
                pos += len(body)
                seg_ids = ids[a:b]
                plans.append((seg_ids, token_char_starts(tok, seg_ids), lead) if head_cut == 0 else None)
        text = cls.JOIN.join(h + t for h, t in zip(heads, texts, strict=True))
        if not reuse_ids:
            return cls(tok, text, parts)
        return cls(tok, text, parts, _reuse_row_ids(tok, texts, plans, cls.JOIN, heads))

    def parts_in(self, char_start: int, char_end: int) -> list[tuple[HaystackPart, int, int]]:
        """The parts overlapping haystack chars [char_start, char_end), with the overlap."""
        out = []
        k = max(0, bisect.bisect_right(self._part_starts, char_start) - 1)
        while k < len(self.parts) and self.parts[k].char_start < char_end:
            p = self.parts[k]
            a, b = max(p.char_start, char_start), min(p.char_end, char_end)
            if a < b:
                out.append((p, a, b))
            k += 1
        return out


def _reuse_row_ids(
    tok: Tokenizer,
    bodies: list[str],
    plans: list[tuple[np.ndarray, np.ndarray, int] | None],
    join: str,
    headers: list[str] | None = None,
) -> np.ndarray:
    """Ids of `join.join(header + body)` from each body's row tokens, re-tokenizing only the header
    lines and each body's head and tail."""
    t = boundary_tables(tok)
    chunks: list[str | np.ndarray] = []  # text to tokenize, or ids to keep, in order
    last = len(bodies) - 1
    for k, (body, plan) in enumerate(zip(bodies, plans, strict=True)):
        tail_join = join if k < last else ""
        head = headers[k] if headers else ""
        if plan is None:
            chunks.append(head + body + tail_join)
            continue
        seg, cs, lead = plan
        seg64 = seg.astype(np.int64)
        prev, cur = seg64[:-1], seg64[1:]
        safe = (t.ends_newline[prev] & t.starts_nonspace[cur]) | (t.ends_nonspace[prev] & t.starts_space[cur])
        cand = np.flatnonzero(safe) + 1  # token index t >= 1 where a cut is safe
        end = lead + len(body)
        # the characters on both sides of a cut decide whether it is safe, so both must be in the body
        # (what was stripped around it is not in the haystack: a boundary at the body's end is unsafe)
        cand = cand[(cs[cand] >= lead) & (cs[cand] < end)]
        if len(cand) < 2:
            chunks.append(head + body + tail_join)
            continue
        f, last_b = int(cand[0]), int(cand[-1])
        chunks.append(head + body[: int(cs[f]) - lead])
        chunks.append(seg[f:last_b])
        chunks.append(body[int(cs[last_b]) - lead :] + tail_join)
    texts = [c for c in chunks if isinstance(c, str)]
    flat, offs = tok.encode_batch(texts)
    out: list[np.ndarray] = []
    j = 0
    for c in chunks:
        if isinstance(c, str):
            out.append(flat[offs[j] : offs[j + 1]])
            j += 1
        else:
            out.append(np.asarray(c, np.int32))
    return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)
