"""Token-exact assembly of a chat sample from a haystack, pieces at depths and a template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.synth.chat.base import (
    AssemblyError,
    HaystackTooShort,
    LengthCounts,
    Placement,
)
from pipeline.synth.chat.boundaries import token_char_starts
from pipeline.synth.chat.haystack import Haystack
from pipeline.synth.chat.templates import ChatTemplate, RenderedChat

TailCut = Literal["word", "sentence", "clause"]

# --- assembly -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Text to insert into the context at a relative depth (0 = start, 1 = end of the context)."""

    text: str
    depth: float
    label: str = "needle"
    placement: Placement = "line"

    def normalized(self) -> str:
        """Line pieces are one or more lines ending in "\\n"; inline pieces are " " + a sentence."""
        body = self.text.strip()
        if not body:
            raise ValueError(f"empty {self.label} piece")
        return body + "\n" if self.placement == "line" else " " + body


@dataclass
class PlacedPiece:
    index: int  # position in the `pieces` argument
    label: str
    placement: Placement  # as placed (an inline piece with no inline boundary nearby falls back to "line")
    char_start: int  # in the context message's content
    char_end: int
    token_start: int  # in the rendered sample
    token_end: int
    depth: float  # (token_start - context token start) / context tokens


@dataclass
class HaystackRun:
    """A stretch of haystack text as it lies in the sample, split where inserted pieces interrupt it."""

    hay_char_start: int
    hay_char_end: int
    char_start: int  # in the context message's content
    char_end: int
    token_start: int  # in the rendered sample
    token_end: int


@dataclass
class AssembledChat:
    messages: list[dict[str, str]]
    rendered: RenderedChat
    context_message: int
    context_char_span: tuple[int, int]  # in the context message's content
    context_token_span: tuple[int, int]  # in the rendered sample
    pieces: list[PlacedPiece]
    runs: list[HaystackRun]
    length: int  # under `length_counts`
    length_counts: LengthCounts
    haystack: Haystack = field(repr=False)
    _lineage: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def ids(self) -> np.ndarray:
        return self.rendered.ids

    @property
    def context_tokens(self) -> int:
        a, b = self.context_token_span
        return b - a

    def depth(self, token: int) -> float:
        a, b = self.context_token_span
        return float((token - a) / max(1, b - a))

    def locate(self, message_index: int, char_start: int, char_end: int) -> tuple[int, int]:
        """Token span in the sample of chars [char_start, char_end) of a message's content."""
        return self.rendered.locate(message_index, char_start, char_end)

    def haystack_lineage(self) -> list[dict[str, Any]]:
        """SEGMENT_TYPE records of the haystack text used, one per (segment, run) overlap.

        Source char and byte spans are exact for the text used; doc token spans are the segment's when
        the whole segment was used and null otherwise; row_token_start/end give the span in the sample;
        is_split is true when only part of the document is here.
        """
        if self._lineage is None:
            self._lineage = self._haystack_lineage()
        return [dict(r) for r in self._lineage]

    def _haystack_lineage(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        m = self.context_message
        content = self.messages[m]["content"]
        text = self.haystack.text
        for run in self.runs:
            for part, a, b in self.haystack.parts_in(run.hay_char_start, run.hay_char_end):
                rec: dict[str, Any] = {k: part.meta.get(k) for k in _SEGMENT_FIELDS}
                ctx_a = run.char_start + (a - run.hay_char_start)
                ctx_b = ctx_a + (b - a)
                assert content[ctx_a:ctx_b] == text[a:b]
                t0, t1 = self.locate(m, ctx_a, ctx_b)
                whole = a == part.char_start and b == part.char_end
                if part.meta:
                    skip = part.lead_chars + (a - part.char_start)
                    skip_bytes = part.lead_bytes + len(text[part.char_start : a].encode())
                    rec["char_start"] = int(part.meta["char_start"]) + skip
                    rec["char_end"] = rec["char_start"] + (b - a)
                    rec["byte_start"] = int(part.meta["byte_start"]) + skip_bytes
                    rec["byte_end"] = rec["byte_start"] + len(text[a:b].encode())
                    if not whole:
                        rec["doc_token_start"] = rec["doc_token_end"] = None
                    rec["is_split"] = bool(part.meta.get("is_split")) or not whole
                else:
                    rec.update(
                        char_start=a - part.char_start,
                        char_end=b - part.char_start,
                        is_split=not whole,
                    )
                rec["row_token_start"], rec["row_token_end"] = t0, t1
                rec["separator_after"] = False
                rec["row_id"] = part.row_id
                out.append(rec)
        return out

    def haystack_rows(self) -> list[str]:
        """Ids of the packed rows whose text is in the context, in order of first use."""
        seen: dict[str, None] = {}
        for r in self.haystack_lineage():
            if r.get("row_id"):
                seen.setdefault(r["row_id"])
        return list(seen)


_SEGMENT_FIELDS = (
    "source",
    "uri",
    "revision",
    "record",
    "doc_id",
    "content_hash",
    "char_start",
    "char_end",
    "byte_start",
    "byte_end",
    "doc_token_start",
    "doc_token_end",
    "doc_tokens",
    "row_token_start",
    "row_token_end",
    "separator_after",
    "is_split",
    "part",
    "placed_by",
    "neighbor_similarity",
)


def _snap(bounds: np.ndarray, x: float, lo: int, hi: int) -> int | None:
    """The boundary in [lo, hi] nearest to x, or None."""
    i0, i1 = np.searchsorted(bounds, lo, "left"), np.searchsorted(bounds, hi, "right")
    if i0 >= i1:
        return None
    cand = bounds[i0:i1]
    j = int(np.searchsorted(cand, x))
    best = [int(cand[k]) for k in (j - 1, j) if 0 <= k < len(cand)]
    return min(best, key=lambda b: (abs(b - x), b))


def assemble_chat(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, str]],
    context_message: int,
    haystack: Haystack,
    target_length: int,
    pieces: Sequence[Piece] = (),
    length_counts: LengthCounts = "full_chat",
    prefix: str = "",
    suffix: str = "",
    start_token: int = 0,
    terminator: str = "\n\n",
    inline_window: int = 2048,
    verify: bool = True,
    start_attempts: int = 8,
    tail: TailCut = "word",
    start_mid_line: bool = False,
) -> AssembledChat:
    """A chat whose length under `length_counts` is exactly `target_length`.

    Message `context_message` gets content `prefix + context + suffix`, where the context is haystack
    text from the first line boundary at or after `start_token`, with `pieces` inserted near their
    depths and `terminator` after the cut. `prefix` must be empty or end with a line break and `suffix`
    must not start with whitespace, so the three tokenize independently. Other messages are as given.

    `start_attempts`: when the tail cannot be sized exactly, the context starts at the next line
    boundary, up to this many starts (1: exactly at the first). `tail`: "word" cuts the haystack at a
    word end (a sentence end where one fits); "sentence" only at a sentence, paragraph or clause-at-line
    end; "clause" at those or at a clause end (";" or ":") inside a line.

    `start_mid_line`: `start_token` is an inline boundary inside a line (" " before a sentence's first
    word, or the first of two spaces before it) and the context starts at that word, without the
    spaces (the prefix ends the line before it); the text up to the next safe boundary is tokenized
    again, so the ids stay those of the rendered text. Takes no pieces and one start.
    """
    tok = template.tok
    if start_mid_line and (pieces or start_attempts != 1):
        raise ValueError("a mid-line start takes no pieces and exactly one start (start_attempts=1)")
    if prefix and not prefix.endswith("\n"):
        raise ValueError(
            "prefix must be empty or end with a line break (so the context starts on a new line)"
        )
    if suffix and suffix[0].isspace():
        raise ValueError(
            "suffix must not start with whitespace (the context already ends with the terminator)"
        )
    if not terminator.endswith("\n"):
        raise ValueError("terminator must end with a line break")
    if not 0 <= context_message < len(messages):
        raise ValueError(f"context_message {context_message} out of range for {len(messages)} messages")

    texts = [p.normalized() for p in pieces]
    flat, offs = tok.encode_batch([prefix, suffix, terminator, *texts])
    seq = [flat[offs[k] : offs[k + 1]] for k in range(len(offs) - 1)]
    prefix_ids, suffix_ids, term_ids, piece_ids = seq[0], seq[1], seq[2], seq[3:]

    msgs = [dict(m) for m in messages]
    msgs[context_message]["content"] = prefix + suffix
    base = template.render(msgs, {context_message: np.concatenate([prefix_ids, suffix_ids])})
    fixed = 0 if length_counts == "context_only" else base.counted(length_counts)
    budget = target_length - fixed  # context tokens
    piece_total = sum(len(p) for p in piece_ids)
    if budget < piece_total + len(term_ids) + 1:
        raise AssemblyError(
            f"target {target_length} leaves {budget} context tokens, fewer than the {piece_total} tokens of "
            f"the pieces plus the terminator; raise the target length or insert fewer pieces"
        )

    ctx = _assemble_context(
        haystack,
        texts,
        piece_ids,
        pieces,
        term_ids,
        terminator,
        budget,
        start_token,
        inline_window,
        start_attempts,
        tail,
        start_mid_line,
    )
    content = prefix + ctx.text + suffix
    msgs[context_message]["content"] = content
    ids = np.concatenate([prefix_ids, ctx.ids, suffix_ids]).astype(np.int32)
    rendered = template.render(msgs, {context_message: ids})
    ctx_tok0 = int(rendered.content_spans[context_message][0]) + len(prefix_ids)
    ctx_tokens = len(ctx.ids)
    length = rendered.counted(length_counts, ctx_tokens)
    if length != target_length:
        raise AssemblyError(f"sized to {length} tokens instead of {target_length}")
    if verify:
        check = template.render(msgs)
        if not np.array_equal(check.ids, rendered.ids):
            n = min(len(check.ids), len(rendered.ids))
            where = np.flatnonzero(check.ids[:n] != rendered.ids[:n])
            diff = int(where[0]) if len(where) else n
            raise AssemblyError(
                f"{tok.name}: assembled ids differ from a full tokenization of the sample (first difference at "
                f"token {diff}; {len(check.ids)} vs {len(rendered.ids)} tokens). This tokenizer does not split "
                f"at the assumed boundaries."
            )
    p0 = len(prefix)
    placed = [
        PlacedPiece(
            index=pp.index,
            label=pp.label,
            placement=pp.placement,
            char_start=p0 + pp.char_start,
            char_end=p0 + pp.char_end,
            token_start=ctx_tok0 + pp.token_start,
            token_end=ctx_tok0 + pp.token_end,
            depth=pp.token_start / max(1, ctx_tokens),
        )
        for pp in ctx.placed
    ]
    placed.sort(key=lambda p: p.index)
    runs = [
        HaystackRun(
            r.hay_char_start,
            r.hay_char_end,
            p0 + r.char_start,
            p0 + r.char_end,
            ctx_tok0 + r.token_start,
            ctx_tok0 + r.token_end,
        )
        for r in ctx.runs
    ]
    return AssembledChat(
        messages=msgs,
        rendered=rendered,
        context_message=context_message,
        context_char_span=(p0, p0 + len(ctx.text)),
        context_token_span=(ctx_tok0, ctx_tok0 + ctx_tokens),
        pieces=placed,
        runs=runs,
        length=length,
        length_counts=length_counts,
        haystack=haystack,
    )


@dataclass
class _Context:
    text: str
    ids: np.ndarray
    placed: list[PlacedPiece]  # positions relative to the context
    runs: list[HaystackRun]


def _assemble_context(
    hay: Haystack,
    texts: list[str],
    piece_ids: list[np.ndarray],
    pieces: Sequence[Piece],
    term_ids: np.ndarray,
    terminator: str,
    budget: int,
    start_token: int,
    inline_window: int,
    start_attempts: int = 8,
    tail: TailCut = "word",
    start_mid_line: bool = False,
) -> _Context:
    """Haystack tokens + pieces at safe boundaries + an exactly sized tail: `budget` tokens in all.

    Some totals cannot be hit at a given cut (adding one character can add two tokens, e.g. " 2" in
    "of 24"); then the context starts one line later, which moves the cut elsewhere.
    """
    line_b = hay.line_bounds

    def attempt_from(start: int, mid_line: bool = False) -> _Context | None:
        return _try_context(
            hay, list(texts), list(piece_ids), pieces, term_ids, terminator, budget, start,
            inline_window, tail, mid_line,
        )  # fmt: skip

    if start_mid_line:
        ib = hay.inline_bounds
        j = int(np.searchsorted(ib, start_token))
        if j >= len(ib) or int(ib[j]) != start_token:
            raise ValueError(f"haystack token {start_token} is not an inline boundary")
        ctx = attempt_from(start_token, mid_line=True)
        if ctx is None:
            raise AssemblyError(
                f"could not size the context to {budget} tokens from haystack token {start_token}"
            )
        return ctx
    i = int(np.searchsorted(line_b, start_token))
    if i >= len(line_b):
        raise HaystackTooShort(budget, 0)
    for attempt in range(start_attempts):
        if i + attempt >= len(line_b):
            break
        ctx = attempt_from(int(line_b[i + attempt]))
        if ctx is not None:
            return ctx
    raise AssemblyError(f"could not size the context to {budget} tokens from haystack token {start_token}")


def _try_context(
    hay: Haystack,
    texts: list[str],
    piece_ids: list[np.ndarray],
    pieces: Sequence[Piece],
    term_ids: np.ndarray,
    terminator: str,
    budget: int,
    h0: int,
    inline_window: int,
    tail: TailCut = "word",
    mid_line: bool = False,
) -> _Context | None:
    """One assembly from haystack token h0, or None when the tail cannot be sized exactly there.
    `mid_line`: h0 is an inline boundary and the context starts after its spaces (no pieces)."""
    tok = hay.tok
    line_b, inline_b, sent_b = hay.line_bounds, hay.inline_bounds, hay.sentence_bounds
    piece_total = sum(len(p) for p in piece_ids)
    hay_needed = budget - piece_total - len(term_ids)
    available = len(hay) - h0
    if hay_needed + 16 > available:
        raise HaystackTooShort(hay_needed + 16, available)

    # where the exactly-sized tail window starts: a safe boundary a little short of the budget
    margin = 8
    any_b = hay.any_bounds
    s = _snap(any_b, h0 + hay_needed - margin, h0, h0 + hay_needed - margin)
    if s is None:
        s = h0

    # pieces in depth order; desired haystack offset discounts the pieces before them
    order = sorted(range(len(pieces)), key=lambda k: (pieces[k].depth, k))
    inserts: list[tuple[int, int, Placement]] = []  # (haystack token, piece index, placement)
    before = 0
    for k in order:
        p = pieces[k]
        if not 0.0 <= p.depth <= 1.0:
            raise ValueError(f"piece {k} ({p.label}): depth {p.depth} outside [0, 1]")
        x = h0 + p.depth * budget - before
        x = min(max(x, h0), s)
        placement: Placement = p.placement
        b: int | None = None
        if placement == "inline":
            lo, hi = max(h0, int(x) - inline_window), min(s, int(x) + inline_window)
            b = _snap(sent_b, x, lo, hi)
            # no sentence end nearby (verse, code, lists): a line of its own reads better than a
            # sentence dropped mid-sentence; mid-sentence only where there are no lines either
            if b is None and _snap(line_b, x, lo, hi) is None:
                b = _snap(inline_b, x, lo, hi)
            if b is None:
                placement = "line"
                texts[k] = texts[k].strip() + "\n"
                piece_ids[k] = tok.encode(texts[k])
        if b is None:
            b = _snap(line_b, x, h0, s)
        if b is None:
            b = h0
        inserts.append((b, k, placement))
        before += len(piece_ids[k])
    inserts.sort(key=lambda t: (t[0], t[1]))
    # fallbacks may have changed piece sizes: place the tail window again, after every insertion point
    piece_total = sum(len(p) for p in piece_ids)
    last_insert = max((b for b, _, _ in inserts), default=h0)
    goal = h0 + budget - piece_total - len(term_ids) - margin
    s = _snap(any_b, goal, last_insert, max(goal, last_insert)) or last_insert

    cs = hay.char_starts
    id_parts: list[np.ndarray] = []
    text_parts: list[str] = []
    placed: list[PlacedPiece] = []
    runs: list[HaystackRun] = []
    tpos = cpos = 0
    cur = h0
    if mid_line:
        # drop the space before the sentence's first word; re-tokenize up to the next safe boundary
        # (its left neighbour is unchanged, so the haystack's split there still holds)
        h1 = int(any_b[np.searchsorted(any_b, h0, "right")]) if any_b[-1] > h0 else len(hay)
        if h1 > s:
            return None
        ca, cb = mid_line_start(hay.text, int(cs[h0])), int(cs[h1])
        if not ca < cb:
            return None
        head_ids = tok.encode(hay.text[ca:cb])
        id_parts.append(head_ids)
        text_parts.append(hay.text[ca:cb])
        runs.append(HaystackRun(ca, cb, 0, cb - ca, 0, len(head_ids)))
        tpos, cpos, cur = len(head_ids), cb - ca, h1

    def add_run(a: int, b: int) -> None:
        nonlocal tpos, cpos
        if b <= a:
            return
        ca, cb = int(cs[a]), int(cs[b])
        id_parts.append(hay.ids[a:b])
        text_parts.append(hay.text[ca:cb])
        runs.append(HaystackRun(ca, cb, cpos, cpos + (cb - ca), tpos, tpos + (b - a)))
        tpos += b - a
        cpos += cb - ca

    for b, k, placement in inserts:
        add_run(cur, b)
        cur = b
        ids_k = piece_ids[k]
        placed.append(
            PlacedPiece(
                k, pieces[k].label, placement, cpos, cpos + len(texts[k]), tpos, tpos + len(ids_k), 0.0
            )
        )
        id_parts.append(ids_k)
        text_parts.append(texts[k])
        tpos += len(ids_k)
        cpos += len(texts[k])
    add_run(cur, s)

    remaining = budget - tpos
    fitted = _fit_tail(hay, s, remaining, terminator, tail)
    if fitted is None:
        return None
    e_char, filler, tail_ids = fitted
    c_s = int(cs[s])
    tail_text = hay.text[c_s:e_char] + filler + terminator
    if e_char > c_s:
        n_hay = len(hay.text[c_s:e_char])
        # token span of the haystack chars inside the window (the terminator may share the last token)
        w_starts = token_char_starts(tok, tail_ids)
        t_end = int(np.searchsorted(w_starts[:-1], n_hay, side="left"))
        runs.append(HaystackRun(c_s, e_char, cpos, cpos + n_hay, tpos, tpos + t_end))
    id_parts.append(tail_ids)
    text_parts.append(tail_text)
    ids = np.concatenate(id_parts).astype(np.int32) if id_parts else np.zeros(0, np.int32)
    assert len(ids) == budget, (len(ids), budget)
    return _Context("".join(text_parts), ids, placed, runs)


# Whitespace-only fillers put between a haystack cut at a word end and the terminator, to make up
# the one to three tokens by which the nearest word ends miss the exact size (no visible text added).
_TAIL_FILLERS = ("", "\n ", " \n ", "\n \n ", " \n \n ", "\n \n \n ")


def mid_line_start(text: str, c: int) -> int:
    """Where a context that starts at an inline boundary at char c begins: after its spaces."""
    while c < len(text) and text[c] in " \t":
        c += 1
    return c


def _continues(meta: Mapping[str, Any]) -> bool:
    """Whether a packed segment stops before its document's end (from its lineage fields)."""
    end, total = meta.get("doc_token_end"), meta.get("doc_tokens")
    return end is not None and total is not None and int(end) < int(total)


def _fit_tail(
    hay: Haystack, s: int, want: int, terminator: str, cut: TailCut = "word"
) -> tuple[int, str, np.ndarray] | None:
    """A char end e and a whitespace filler f such that tok(hay.text[cs[s]:e] + f + terminator) has
    exactly `want` tokens, with e at a word end (a sentence end where one fits): the context never
    stops mid-word. With `cut="sentence"`, e must be a sentence end, a paragraph (document) end, or
    a line end after a clause (";" or ":", trailing spaces allowed); with `cut="clause"`, a clause end
    inside a line too. A document piece that the packer cut off from the rest of its document does
    not end a paragraph.
    None when no such end is near; the caller then starts the context a line later.

    Candidates are tried near the haystack's own token boundaries first (cheap: each try tokenizes
    only the short window), then at word ends near the estimate, with fillers of whitespace.
    """
    tok, text, cs = hay.tok, hay.text, hay.char_starts
    c_s = int(cs[s])
    n_term = len(tok.encode(terminator))
    k0 = s + want - n_term
    if k0 < s:
        return None
    cache: dict[tuple[int, str], np.ndarray] = {}

    def count(e: int, f: str = "") -> np.ndarray:
        if (e, f) not in cache:
            cache[(e, f)] = tok.encode(text[c_s:e] + f + terminator)
        return cache[(e, f)]

    def word_end(e: int) -> bool:
        return e >= len(text) or text[e].isspace() or (e > 0 and text[e - 1] in ".,;:!?)]}\"'")

    def sentence_end(e: int) -> bool:
        return e > 0 and text[e - 1] in ".!?" and (e >= len(text) or text[e].isspace())

    # ends of document pieces whose document goes on past them (the packer split it there): the
    # blank line after them is the join, not the document's own paragraph break
    clean = cut != "word"
    open_ends = {p.char_end for p in hay.parts if _continues(p.meta)} if clean else set()

    def line_end(e: int) -> bool:
        """Only spaces or tabs between e and the next line break (verse lines often carry a trailing
        space)."""
        n = text.find("\n", e, e + 64)
        return n >= 0 and not text[e:n].strip(" \t")

    def clean_rank(e: int) -> int:
        """0: a sentence end (a closing quote or bracket may follow the mark) or a paragraph's end; 1:
        a line that ends a clause (";" or ":"); 2: a clause end inside a line; 3: none of these. Verse
        and lists rarely end sentences at a size that fits; clause ends make a clean cut likely."""
        if e <= 0 or e > len(text) or text[e - 1].isspace():
            return 3
        if (e >= len(text) or text[e : e + 2] == "\n\n") and e not in open_ends:
            return 0
        body = text[max(0, e - 3) : e].rstrip("\"')]}”’")
        if not body or e >= len(text) or not text[e].isspace():
            return 3
        if body[-1] in ".!?":
            return 0
        if body[-1] in ";:":
            return 1 if line_end(e) else 2
        return 3

    def clean_end(e: int) -> bool:
        return clean_rank(e) <= (1 if cut == "sentence" else 2)

    ok_end = clean_end if clean else word_end

    def rank(e: int) -> int:  # which ends are preferred: sentence ends (word cut), cleaner ends
        return clean_rank(e) if clean else int(not sentence_end(e))

    for radius in (4, 16, 64):
        lo, hi = max(s, k0 - radius), min(len(hay), k0 + radius)
        ends = [int(cs[k]) for k in range(lo, hi + 1) if ok_end(int(cs[k]))]
        good = [e for e in ends if len(count(e)) == want]
        if good:
            centre = int(cs[min(k0, len(hay))])
            e = min(good, key=lambda x: (rank(x), abs(x - centre), x))
            return e, "", count(e)
    # word ends near the estimate, sentence ends first, each with the fillers in turn
    centre = int(cs[min(max(k0, s), len(hay))])
    near = [e for d in range(400) for e in (centre + d, centre - d) if c_s <= e <= len(text) and ok_end(e)]
    near.sort(key=lambda e: (rank(e), abs(e - centre)))
    for f in _TAIL_FILLERS:
        for e in near:
            if len(count(e)) <= want and len(count(e, f)) == want:
                return e, f, count(e, f)
    return None
