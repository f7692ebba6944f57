"""From a draft to a kept sample: place it after a long context of exactly the target length, find
every evidence quote in that context, fix token positions and dependency distances, and reject what
does not need the far context.

Sizing is `pipeline.synth.chat.assemble_chat` (token-exact, verified against a full tokenization). The
quotes are searched in the whole haystack, then mapped into the sample through the assembled
context's runs, so a quote that exists only past the cut is told apart from one that never existed.
Where a quote occurs several times, the occurrence nearest the question is used: that is the one a
model can get away with reading, so distances and the tail check are conservative.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.synth.chat import AssembledChat, AssemblyError, ChatTemplate, HaystackTooShort, assemble_chat
from pipeline.synth.chat.assemble import TailCut, mid_line_start
from pipeline.synth.rewriter.contexts import Context, Passage, document_header, head_tokens
from pipeline.synth.rewriter.evidence import NormalizedText
from pipeline.synth.rewriter.plan import SamplePlan
from pipeline.synth.rewriter.strategies import Draft, Rejection
from schemas.synthesis import RewriterConfig

GENERATOR_VERSION = 1


class SampleFailure(Exception):
    """A sample that could not be built for a reason that is not the model's answer (counted as failed)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Located:
    label: str
    message_index: int
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    depth: float


def generator_name(kind: str) -> str:
    return f"rewriter_{kind}@{GENERATOR_VERSION}"


def _to_content(asm: AssembledChat, a: int, b: int) -> tuple[int, int] | None:
    """Haystack chars [a, b) as chars of the context message, or None if they are not all in the context."""
    for run in asm.runs:
        if run.hay_char_start <= a < run.hay_char_end:
            ca = run.char_start + (a - run.hay_char_start)
            cb = ca + (b - a)
            # runs are contiguous when nothing is inserted; the quote must end inside the used text
            if b <= asm.runs[-1].hay_char_end and cb <= asm.context_char_span[1]:
                return ca, cb
            return None
    return None


def _overlaps(span: tuple[int, int], p: Passage) -> bool:
    return span[0] < p.char_end and span[1] > p.char_start


def _locate_quotes(
    draft: Draft, ctx: Context, passages: list[Passage], asm: AssembledChat, cm: int
) -> list[Located]:
    out: list[Located] = []
    for qi, q in enumerate(draft.quotes):
        occ = ctx.norm.find_all(q.text)
        if not occ:
            raise Rejection(
                "evidence_not_found", f"quote {qi} is not in the context: {q.text[:200]!r}", q.group
            )
        if q.passage is not None and not any(_overlaps(o, passages[q.passage]) for o in occ):
            raise Rejection("quote_outside_passage", f"quote {qi} is not in passage {q.passage + 1}", q.group)
        inside = [c for c in (_to_content(asm, a, b) for a, b in occ) if c is not None]
        if not inside:
            raise Rejection(
                "evidence_truncated", f"quote {qi} lies only past the end of the sized context", q.group
            )
        ca, cb = inside[-1]
        t0, t1 = asm.locate(cm, ca, cb)
        out.append(Located(q.label, cm, ca, cb, t0, t1, asm.depth(t0)))
    return out


def _question_span(messages: list[dict[str, str]], mi: int, suffix_len: int | None) -> tuple[int, int]:
    content = messages[mi]["content"]
    return (len(content) - suffix_len, len(content)) if suffix_len is not None else (0, len(content))


def build_record(
    plan: SamplePlan,
    draft: Draft,
    ctx: Context | None,
    passages: list[Passage],
    chat: ChatTemplate,
    rw: RewriterConfig,
    sample_length: int,
) -> dict[str, Any]:
    """The CHAT_SCHEMA fields that depend on the sample (model, lineage and params are added by the caller)."""
    system = [{"role": "system", "content": rw.system_prompt}] if rw.system_prompt else []
    cm = len(system)  # index of the message that holds the context
    located: list[Located] = []
    passage_spans: list[dict[str, Any]] = []
    if ctx is not None:
        suffix = draft.turns[0]["content"].lstrip()
        messages = [*system, {"role": "user", "content": ""}, *draft.turns[1:]]
        cut: dict[str, Any] | None = None
        try:
            if rw.context_format == "documents":
                asm, cut = _assemble_documents(chat, messages, cm, ctx, passages, sample_length, rw, suffix)
            else:
                asm = assemble_chat(
                    chat, messages, cm, ctx.hay, sample_length, length_counts=rw.length_counts, suffix=suffix
                )
        except HaystackTooShort as err:
            raise SampleFailure("haystack_too_short", str(err)) from None
        except (AssemblyError, ValueError) as err:
            raise SampleFailure("assembly_error", str(err)) from None
        located = _locate_quotes(draft, ctx, passages, asm, cm)
        # each QA turn on its own: a turn whose evidence all lies in the tail needs no far context
        for g in draft.groups:
            mine = [x for x, q in zip(located, draft.quotes, strict=True) if q.group == g]
            if mine and all(x.depth >= 1.0 - rw.reject_tail_fraction for x in mine):
                depths = ", ".join(f"{x.depth:.3f}" for x in mine)
                raise Rejection(
                    "evidence_in_tail",
                    f"all evidence lies in the last {rw.reject_tail_fraction:.0%} of the context (depths {depths})",
                    g,
                )
        final = asm.messages
        rendered = asm.rendered
        length, context_tokens = asm.length, asm.context_tokens
        suffix_len: int | None = len(suffix)
        for p in passages:
            span = _to_content(asm, p.char_start, p.char_end)
            t = asm.locate(cm, *span) if span else (None, None)
            passage_spans.append(
                {
                    "depth_requested": round(p.depth, 4),
                    "haystack_chars": [p.char_start, p.char_end],
                    "token_start": t[0],
                    "token_end": t[1],
                    "segment": ctx.part_lineage(p.part),
                }
            )
        haystack = asm.haystack_lineage()
    else:
        cut = None
        final = [*system, *draft.turns]
        rendered = chat.render(final)
        length = rendered.counted(rw.length_counts, 0)
        context_tokens = 0
        suffix_len = None
        haystack = []

    # evidence inside earlier turns (session state): a span of that turn's text
    for te in draft.turn_evidence:
        mi = cm + te.turn
        content = final[mi]["content"]
        off = len(content) - suffix_len if (te.turn == 0 and suffix_len is not None) else 0
        occ = NormalizedText.of(content[off:]).find_all(te.text)
        if not occ:
            raise Rejection("turn_evidence_not_found", f"{te.text!r} is not in turn {te.turn}")
        a, b = off + occ[0][0], off + occ[0][1]
        t0, t1 = rendered.locate(mi, a, b)
        depth = asm.depth(t0) if ctx is not None else 0.0
        located.append(Located(te.label, mi, a, b, t0, t1, depth))

    n_quotes = len(draft.quotes)
    questions: list[dict[str, Any]] = []
    for q in draft.questions:
        mi = cm + q.turn
        a, b = _question_span(final, mi, suffix_len if q.turn == 0 else None)
        t0, t1 = rendered.locate(mi, a, b)
        needed = list(q.quotes) + [n_quotes + k for k in q.turn_evidence]
        starts = [located[i].token_start for i in needed]
        questions.append(
            {
                "message_index": mi,
                "text": final[mi]["content"][a:b],
                "expected": q.expected,
                "match": q.match,
                "token_start": t0,
                "token_end": t1,
                "evidence": needed,
                "dependency_distance": (t0 - min(starts)) if starts else 0,
            }
        )
    evidence = [
        {
            "label": x.label,
            "message_index": x.message_index,
            "char_start": x.char_start,
            "char_end": x.char_end,
            "token_start": x.token_start,
            "token_end": x.token_end,
            "depth": x.depth,
        }
        for x in located
    ]
    return {
        "messages": final,
        "chat_template": chat.name,
        "target_length": sample_length if ctx is not None else length,
        "length": length,
        "length_counts": rw.length_counts,
        "context_tokens": context_tokens,
        "evidence": evidence,
        "questions": questions,
        "dependency_distance": max((q["dependency_distance"] for q in questions), default=0),
        "haystack": haystack,
        "input_ids": rendered.ids.tolist(),
        "loss_mask": rendered.loss_mask(),  # every assistant turn; chat_table applies output.loss_mask
        "haystack_rows": asm.haystack_rows() if ctx is not None else [],
        "_passages": passage_spans,
        "_context_rows": ctx.row_ids if ctx is not None else [],
        "_cut": cut,
    }


_MAX_STARTS = 320
_PASSAGE_MARGIN = 64  # tokens kept between a late start and the first passage
_SENTENCE_CLOSE = "\"')]}”’"
_SENTENCE_OPEN = "\"'([“‘"


def _header_start(text: str, part_char_start: int) -> int:
    """Where the header line before a document piece begins (the line just before its body)."""
    return text.rfind("\n", 0, max(0, part_char_start - 1)) + 1


def begins_sentence(text: str, c: int, lo: int) -> bool:
    """Whether text[c:] begins a paragraph (a blank line before it), or a sentence or clause: its
    first character (after an opening quote or bracket) is a capital or a digit, and the text of the
    same document before it (from `lo`) ends with . ! ? ; or : (closing quotes and brackets may
    follow the mark)."""
    if c <= lo:
        return bool(text[c : c + 1].strip())
    before = text[max(lo, c - 256) : c]
    if before[len(before.rstrip()) :].count("\n") >= 2:  # a blank line (maybe with spaces) before it
        return bool(text[c : c + 1].strip())
    first = text[c : c + 2].lstrip(_SENTENCE_OPEN)[:1]
    if not (first.isupper() or first.isdigit()):
        return False
    return before.rstrip().rstrip(_SENTENCE_CLOSE)[-1:] in (".", "!", "?", ";", ":")


@dataclass(frozen=True)
class _Start:
    token: int  # haystack token where the context starts
    kind: str  # "document" (a header line) or "sentence"
    part: int  # the haystack part (document piece) it opens
    mid_line: bool  # a sentence start inside a line (an inline boundary: the spaces before it are dropped)


def _starts(ctx: Context, limit: int, lo: int = 0) -> list[_Start]:
    """Candidate starts of a documents-format context in haystack tokens [lo, limit), best first: a
    document's header line; then a line inside a document piece that begins a sentence, a clause or a
    paragraph; then a sentence start inside a line. A context opening inside a document opens with
    that document's header, continued."""
    hay = ctx.hay
    text, cs = hay.text, hay.char_starts
    n = min(limit, len(hay))

    def within(bounds: np.ndarray) -> list[int]:
        return bounds[np.searchsorted(bounds, lo) : np.searchsorted(bounds, n)].tolist()

    lines = within(hay.line_bounds)
    line_at = {int(cs[h]): h for h in lines}
    first_char = int(cs[min(lo, len(hay))])
    last_char = int(cs[n]) if n < len(hay) else len(text)
    docs: list[_Start] = []
    for k, part in enumerate(hay.parts):
        if part.char_start > last_char:
            break
        if part.char_start < first_char:
            continue
        h = line_at.get(_header_start(text, part.char_start))
        if h is None or (k == 0 and int(part.meta.get("doc_token_start") or 0) > 0):
            continue  # a row that begins inside a document begins wherever the packer cut it
        docs.append(_Start(h, "document", k, False))
    at_line: list[_Start] = []
    mid: list[_Start] = []
    inline = within(hay.inline_bounds)
    part_starts = [p.char_start for p in hay.parts]
    for h, is_mid in [(h, False) for h in lines] + [(h, True) for h in inline]:
        c = mid_line_start(text, int(cs[h])) if is_mid else int(cs[h])  # drops the spaces before the word
        if not text[c : c + 1].strip():
            continue
        k = max(0, bisect.bisect_right(part_starts, c) - 1)
        part = hay.parts[k]
        if part.char_start < c < part.char_end and begins_sentence(text, c, part.char_start):
            (mid if is_mid else at_line).append(_Start(h, "sentence", k, is_mid))
    return docs + at_line + mid


def _end_kind(text: str, e: int) -> str:
    """What a clean context end at haystack char e closes: a paragraph (or document piece), a sentence
    or a clause."""
    if e >= len(text) or text[e : e + 2] == "\n\n":
        return "paragraph"
    return "sentence" if text[:e].rstrip(_SENTENCE_CLOSE)[-1:] in ".!?" else "clause"


def _assemble_documents(
    chat: ChatTemplate,
    messages: list[dict[str, str]],
    cm: int,
    ctx: Context,
    passages: list[Passage],
    sample_length: int,
    rw: RewriterConfig,
    suffix: str,
) -> tuple[AssembledChat, dict[str, Any]]:
    """The instruction, then the documents with their header lines, cut at a document or sentence start
    and at a sentence, clause-at-line or paragraph end; where no such end sizes the sample exactly
    from any start, at a word end (recorded in params.context_cut).

    Whether a start gives an exactly sized context that ends cleanly is a matter of luck (the clean
    ends near the size leave a gap the whitespace fillers close for about one start in eight), so many
    starts are tried: those in the first head_tokens() first, then later ones up to the first passage
    (which must stay inside the context)."""
    instruction = rw.instruction.strip() + "\n\n"
    header = document_header(rw.document_header)

    def continued(k: int) -> str:  # the header of a document the context opens inside of
        return header({**ctx.hay.parts[k].meta, "doc_token_start": 1}) + "\n"

    head = head_tokens(sample_length)
    starts = _starts(ctx, head)
    if passages:
        first = min(p.char_start for p in passages)
        until = int(np.searchsorted(ctx.hay.char_starts, first, "right")) - 1 - _PASSAGE_MARGIN
        starts += _starts(ctx, until, head)
    starts = starts[:_MAX_STARTS]
    # a sentence, paragraph or clause-at-line end from every candidate start first, then a clause end
    # inside a line, then a word end (the plain cut), from the same starts
    tails: tuple[TailCut, ...] = ("sentence", "clause", "word")
    for tail in tails:
        for st in starts:
            prefix = instruction + (continued(st.part) if st.kind == "sentence" else "")
            try:
                asm = assemble_chat(
                    chat,
                    messages,
                    cm,
                    ctx.hay,
                    sample_length,
                    length_counts=rw.length_counts,
                    prefix=prefix,
                    suffix=suffix,
                    start_token=st.token,
                    start_attempts=1,
                    tail=tail,
                    start_mid_line=st.mid_line,
                )
            except (AssemblyError, HaystackTooShort):
                continue
            cut: dict[str, Any] = {"start": st.kind, "start_token": st.token, "end": tail}
            if st.mid_line:
                cut["mid_line"] = True
            if tail != "word":
                cut["end_at"] = _end_kind(ctx.hay.text, asm.runs[-1].hay_char_end)
            return asm, cut
    asm = assemble_chat(
        chat,
        messages,
        cm,
        ctx.hay,
        sample_length,
        length_counts=rw.length_counts,
        prefix=instruction + continued(0),
        suffix=suffix,
    )
    return asm, {"start": "line", "start_token": 0, "end": "word"}


def params_json(plan: SamplePlan, draft: Draft, extra: dict[str, Any]) -> str:
    payload = {
        "strategy": plan.strategy,
        "template": plan.template,
        "depths": list(plan.depths),
        **draft.info,
        **extra,
    }
    return json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
