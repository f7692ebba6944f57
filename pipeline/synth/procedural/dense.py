"""Dense contexts: a context made of generated lines only (hash pairs, distractor needles, noise sentences).

HashHop (Magic) fills the whole context with hash pairs, and RULER's needle-only and noise haystacks
fill it with distractor needles or a few repeated sentences. Such a context is not cut from real text:
it is built line by line from a `Filler` until it holds exactly the token budget. Optionally a share of
the context is real text (lines of the run's haystack) interleaved between the generated lines, and
those lines keep their lineage like any haystack run.

Exact sizing works on token counts of whole lines. A line is `text + "\\n"` and starts after a line
break with a non-space character, so with a regex-pretokenized BPE the context's tokens are the lines'
tokens back to back (the same "line boundary" assumption `pipeline.synth.chat` makes); the whole sample is
tokenized once at the end and compared, so a tokenizer that breaks the assumption raises
`AssemblyError` instead of producing a wrong sample. Lines are drawn greedily until the budget is
nearly used; the last few tokens are matched by swapping or adding freshly drawn lines of the right
counts, so every line stays whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.synth.chat import (
    AssembledChat,
    AssemblyError,
    ChatTemplate,
    Haystack,
    HaystackRun,
    HaystackTooShort,
    LengthCounts,
    Piece,
    PlacedPiece,
)

LineMaker = Callable[[np.random.Generator, int], list[str]]
"""(rng, n) -> about n more filler lines (no line breaks inside, none empty)."""


@dataclass(frozen=True)
class Filler:
    """What fills a dense context besides the needles."""

    kind: str  # recorded in the sample's notes: "hash_pairs", "distractor_needles", "noise"
    seed: int  # the filler's own RNG, so filling never changes the draft's random stream
    lines: LineMaker
    prose: float = 0.0  # share of the context taken by real text lines interleaved with the filler


@dataclass
class _Unit:
    kind: str  # "fill", "prose", "piece"
    text: str  # with its trailing line break
    ids: np.ndarray
    index: int = -1  # piece index, for pieces
    hay_span: tuple[int, int] | None = None  # char span in the haystack text, for prose


class _Pool:
    """Freshly drawn filler lines, tokenized in batches and found by token count."""

    def __init__(self, tok: object, filler: Filler, rng: np.random.Generator) -> None:
        self.tok = tok
        self.filler = filler
        self.rng = rng
        self.by_count: dict[int, list[_Unit]] = {}

    def draw(self, n: int) -> list[_Unit]:
        lines = [ln.strip() for ln in self.filler.lines(self.rng, n)]
        if not lines or not all(lines):
            raise ValueError(f"{self.filler.kind}: the filler produced an empty line")
        texts = [ln + "\n" for ln in lines]
        flat, offs = self.tok.encode_batch(texts)  # type: ignore[attr-defined]
        return [_Unit("fill", t, flat[offs[i] : offs[i + 1]]) for i, t in enumerate(texts)]

    def refill(self) -> None:
        for u in self.draw(256):
            self.by_count.setdefault(len(u.ids), []).append(u)

    def take(self, count: int) -> _Unit | None:
        for _ in range(8):
            if self.by_count.get(count):
                return self.by_count[count].pop()
            self.refill()
        return None

    def counts(self) -> list[int]:
        if not self.by_count:
            self.refill()
        return sorted(c for c, us in self.by_count.items() if us)


def _prose_units(hay: Haystack, start_token: int, want_tokens: int) -> list[_Unit]:
    """Whole non-empty lines of the haystack text from `start_token` on, until `want_tokens` are reached."""
    if want_tokens <= 0:
        return []
    text = hay.text
    pos = int(hay.char_starts[min(start_token, len(hay))]) if len(hay) else 0
    if pos > 0 and text[pos - 1] != "\n":  # start at the next line start
        nl = text.find("\n", pos)
        pos = len(text) if nl < 0 else nl + 1
    units: list[_Unit] = []
    got = 0
    while got < want_tokens and pos < len(text):
        spans: list[tuple[int, int]] = []
        est = 0
        while est < (want_tokens - got) * 1.2 + 64 and pos < len(text):
            end = text.find("\n", pos)
            end = len(text) if end < 0 else end
            a, b = pos, end
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            if b > a:
                spans.append((a, b))
                est += (b - a) // 4 + 1
            pos = end + 1
        texts = [text[a:b] + "\n" for a, b in spans]
        flat, offs = hay.tok.encode_batch(texts)
        for i, (t, span) in enumerate(zip(texts, spans, strict=True)):
            if got >= want_tokens:
                break
            ids = flat[offs[i] : offs[i + 1]]
            units.append(_Unit("prose", t, ids, hay_span=span))
            got += len(ids)
    if got < want_tokens:
        raise HaystackTooShort(want_tokens, got)
    return units


def _subset(supply: dict[int, int], total: int) -> list[int] | None:
    """Line counts, each used at most as often as `supply` has it, that sum to exactly `total`; None if
    none do (a 0/1 subset sum over the lines on hand, remembering how each sum was first reached)."""
    if total < 0:
        return None
    how = np.full(total + 1, -1, np.int64)  # the count that first reached each sum
    reach = np.zeros(total + 1, bool)
    reach[0] = True
    for c, n in sorted(supply.items()):
        for _ in range(min(n, 32)):
            if c > total:
                break
            new = np.zeros_like(reach)
            new[c:] = reach[:-c] & ~reach[c:]
            how[new] = c
            reach |= new
        if reach[total]:
            break
    if not reach[total]:
        return None
    plan: list[int] = []
    s = total
    while s > 0:
        plan.append(int(how[s]))
        s -= int(how[s])
    return plan


def _fill(pool: _Pool, budget: int, ends: list[int]) -> tuple[list[_Unit], int]:
    """Filler units plus one of the context endings (token counts `ends`) summing to exactly `budget`:
    greedy, then an exact change-making end. Returns the units and the index of the ending used."""
    out: list[_Unit] = []
    total = 0
    counts = pool.counts()
    # left for the exact end: enough lines that sums of n and n + 1 lines overlap (no gaps between them)
    lo, hi = counts[0], counts[-1]
    n_end = min(64, max(6, -(-lo // max(1, hi - lo)) + 2))
    reserve = n_end * hi + max(ends)
    while budget - total > reserve + counts[-1]:
        need = budget - total - reserve
        for u in pool.draw(max(64, int(need / max(1.0, float(np.mean(counts)))) + 1)):
            if total + len(u.ids) > budget - reserve:
                break
            out.append(u)
            total += len(u.ids)
    rest = budget - total
    for _ in range(4):
        supply = {c: len(us) for c, us in pool.by_count.items() if us}
        for k, e in enumerate(ends):
            plan = _subset(supply, rest - e)
            if plan is not None:
                taken = [pool.by_count[c].pop() for c in plan]
                return [*out, *taken], k
        pool.refill()  # more lines on hand, more sums within reach
    raise AssemblyError(
        f"{pool.filler.kind}: could not fill the context to exactly {budget} tokens (the filler's lines "
        f"vary too little in length)"
    )


# Whitespace-only context endings (a blank line, then more) that make up a remainder no whole filler
# line can, when every filler line has the same token count (all-digit hashes, repeated noise).
_ENDINGS = tuple("\n" + " \n" * k for k in range(33))


def assemble_dense(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, str]],
    context_message: int,
    haystack: Haystack,
    target_length: int,
    pieces: Sequence[Piece],
    filler: Filler,
    length_counts: LengthCounts = "full_chat",
    prefix: str = "",
    suffix: str = "",
    start_token: int = 0,
) -> AssembledChat:
    """Like `assemble_chat`, but the context is filler lines (and optional prose lines) with the pieces
    as whole lines at their depths; counted length exactly `target_length`."""
    tok = template.tok
    if prefix and not prefix.endswith("\n"):
        raise ValueError("prefix must be empty or end with a line break")
    if suffix and suffix[0].isspace():
        raise ValueError("suffix must not start with whitespace")
    rng = np.random.default_rng(filler.seed)
    texts = [p.text.strip() + "\n" for p in pieces]
    flat, offs = tok.encode_batch([prefix, suffix, *texts])
    seq = [flat[offs[k] : offs[k + 1]] for k in range(len(offs) - 1)]
    prefix_ids, suffix_ids, piece_ids = seq[0], seq[1], seq[2:]
    msgs = [dict(m) for m in messages]
    msgs[context_message]["content"] = prefix + suffix
    base = template.render(msgs, {context_message: np.concatenate([prefix_ids, suffix_ids])})
    fixed = 0 if length_counts == "context_only" else base.counted(length_counts)
    budget = target_length - fixed
    piece_total = sum(len(p) for p in piece_ids)
    pool = _Pool(tok, filler, rng)
    # the context ends with a blank line: its last line is drawn first and tokenized with that ending
    last = pool.draw(1)[0]
    variants: dict[int, _Unit] = {}
    for end in _ENDINGS:
        ids = tok.encode(last.text + end)
        variants.setdefault(len(ids), _Unit("fill", last.text + end, ids))
    ends = sorted(variants)
    prose = _prose_units(haystack, start_token, int(filler.prose * budget))
    prose_total = sum(len(u.ids) for u in prose)
    fill_budget = budget - piece_total - prose_total
    if fill_budget < 8 * max(pool.counts()) + ends[-1]:
        raise AssemblyError(
            f"target {target_length} leaves {fill_budget} tokens for {filler.kind} lines; raise the target "
            f"length or insert fewer pieces"
        )
    fill, k = _fill(pool, fill_budget, ends)
    last = variants[ends[k]]
    order = rng.permutation(len(fill))
    units = [fill[int(i)] for i in order] + [last]
    if prose:
        # prose lines spread evenly between the filler lines, in their own order
        step = len(units) / len(prose)
        for j in range(len(prose) - 1, -1, -1):
            units.insert(int(j * step + step / 2), prose[j])
    # pieces at their depths; never after the last line (the last line carries the terminator)
    starts = np.cumsum([0] + [len(u.ids) for u in units])
    inserts: list[tuple[int, int]] = []
    for k, p in enumerate(pieces):
        if not 0.0 <= p.depth <= 1.0:
            raise ValueError(f"piece {k} ({p.label}): depth {p.depth} outside [0, 1]")
        at = int(np.searchsorted(starts, p.depth * (budget - piece_total), side="left"))
        inserts.append((min(at, len(units) - 1), k))
    for at, k in sorted(inserts, reverse=True):
        units.insert(at, _Unit("piece", texts[k], piece_ids[k], index=k))
    ctx_ids = np.concatenate([u.ids for u in units]).astype(np.int32)
    if len(ctx_ids) != budget:
        raise AssemblyError(f"dense context sized to {len(ctx_ids)} tokens instead of {budget}")
    ctx_text = "".join(u.text for u in units)
    content = prefix + ctx_text + suffix
    msgs[context_message]["content"] = content
    ids = np.concatenate([prefix_ids, ctx_ids, suffix_ids]).astype(np.int32)
    rendered = template.render(msgs, {context_message: ids})
    ctx_tok0 = int(rendered.content_spans[context_message][0]) + len(prefix_ids)
    length = rendered.counted(length_counts, budget)
    if length != target_length:
        raise AssemblyError(f"sized to {length} tokens instead of {target_length}")
    check = template.render(msgs)
    if not np.array_equal(check.ids, rendered.ids):
        raise AssemblyError(
            f"{tok.name}: dense context ids differ from a full tokenization of the sample; this tokenizer "
            f"does not split at line starts"
        )
    placed: list[PlacedPiece] = []
    runs: list[HaystackRun] = []
    cpos, tpos = len(prefix), 0
    for u in units:
        n_chars, n_tok = len(u.text), len(u.ids)
        if u.kind == "piece":
            text_chars = len(texts[u.index])
            placed.append(
                PlacedPiece(
                    u.index,
                    pieces[u.index].label,
                    "line",
                    cpos,
                    cpos + text_chars,
                    ctx_tok0 + tpos,
                    ctx_tok0 + tpos + n_tok,
                    tpos / budget,
                )
            )
        elif u.kind == "prose" and u.hay_span is not None:
            a, b = u.hay_span
            runs.append(HaystackRun(a, b, cpos, cpos + (b - a), ctx_tok0 + tpos, ctx_tok0 + tpos + n_tok))
        cpos += n_chars
        tpos += n_tok
    placed.sort(key=lambda p: p.index)
    return AssembledChat(
        messages=msgs,
        rendered=rendered,
        context_message=context_message,
        context_char_span=(len(prefix), len(prefix) + len(ctx_text)),
        context_token_span=(ctx_tok0, ctx_tok0 + budget),
        pieces=placed,
        runs=runs,
        length=length,
        length_counts=length_counts,
        haystack=haystack,
    )
