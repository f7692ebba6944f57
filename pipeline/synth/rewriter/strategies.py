"""The four synthesis strategies: what each asks the model, and how its answer becomes a draft sample.

A draft holds the conversation turns that follow the context, the evidence quotes the model claims
(to be found in the context by `assemble`), evidence inside earlier turns, and the questions with
what each depends on. Anything that makes an answer unusable raises `Rejection` with a reason.

- chunk_qa: one passage at a chosen depth -> question, answer, verbatim quote (Large World Model style).
- multi_hop: passages far apart -> one question needing all of them, a quote from each.
- session_state: one passage -> a conversation where a value read from the document is changed in a
  later turn, then asked about; the last answer needs both the earlier turn and the far context.
- rephrase: an existing ShareGPT/UltraChat conversation rewritten into clean turns, optionally grounded
  on a passage of a long context (the first question then depends on that passage).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.synth.rewriter.client import ChatRequest
from pipeline.synth.rewriter.contexts import Context, Passage, head_tokens
from pipeline.synth.rewriter.evidence import normalize_quote
from pipeline.synth.rewriter.parsing import ParseFailure, text_field
from pipeline.synth.rewriter.plan import SamplePlan
from pipeline.synth.rewriter.templates import PromptTemplate
from schemas.synthesis import RewriterConfig, RewriterStrategy


class Rejection(Exception):
    """A model answer that cannot become a sample; `reason` is counted, `detail` kept for inspection."""

    def __init__(self, reason: str, detail: str, group: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.group = group  # the QA turn (Draft.groups) it concerns, when only that turn is at fault


@dataclass
class DraftQuote:
    text: str
    passage: int | None  # the passage it must come from (multi_hop), None: anywhere in the context
    label: str = "quote"
    group: int = 0  # the QA turn it supports (several-turn chunk_qa); 0 for every other sample


@dataclass
class DraftTurnEvidence:
    turn: int  # index into Draft.turns
    text: str  # a substring of that turn's content
    label: str = "turn"


@dataclass
class DraftQuestion:
    turn: int  # index into Draft.turns of the user turn that asks it
    expected: list[str]
    match: str  # "exact" | "set"
    quotes: list[int] = field(default_factory=list)  # indices into Draft.quotes it needs
    turn_evidence: list[int] = field(default_factory=list)  # indices into Draft.turn_evidence it needs


@dataclass
class Draft:
    turns: list[dict[str, str]]  # after the context: turns[0] is the user message the context opens
    quotes: list[DraftQuote]
    questions: list[DraftQuestion]
    dedup_key: str
    turn_evidence: list[DraftTurnEvidence] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    groups: list[int] = field(default_factory=lambda: [0])  # ids of the QA turns (several-turn chunk_qa)


def combine_turns(drafts: list[tuple[int, Draft]]) -> Draft:
    """One conversation from single-turn chunk_qa drafts `(turn id, draft)`: their turns in order, each
    question with its own quotes; quotes keep the id of their turn so a failure names the turn."""
    if len(drafts) == 1 and drafts[0][0] == 0:
        return drafts[0][1]
    turns: list[dict[str, str]] = []
    quotes: list[DraftQuote] = []
    questions: list[DraftQuestion] = []
    for g, d in drafts:
        base_turn, base_quote = len(turns), len(quotes)
        turns += d.turns
        quotes += [DraftQuote(q.text, q.passage, q.label, g) for q in d.quotes]
        questions += [
            DraftQuestion(base_turn + q.turn, q.expected, q.match, [base_quote + i for i in q.quotes])
            for q in d.questions
        ]
    return Draft(
        turns=turns,
        quotes=quotes,
        questions=questions,
        dedup_key=" || ".join(d.dedup_key for _, d in drafts),
        info={"qa_turns": [g for g, _ in drafts]},
        groups=[g for g, _ in drafts],
    )


def question_key(text: str) -> str:
    """What makes two questions the same: their words, lowercased, without punctuation."""
    return " ".join(re.findall(r"\w+", text.lower()))


def sampling_params(rw: RewriterConfig, seed: int) -> dict[str, Any]:
    s = rw.sampling
    out: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens}
    if s.seeded:
        out["seed"] = seed
    return out


# --- requests -------------------------------------------------------------------------------------------


def usable_end(rw: RewriterConfig, sample_length: int) -> int:
    """The token every passage ends before: the head of the context that the tail check accepts.

    The context of a sample takes about `sample_length - reserve_tokens` tokens (the rest is room for
    the questions and answers), and evidence whose depth is in its last `reject_tail_fraction` is
    rejected; a passage that reached into that tail would be paid for and thrown away.
    """
    context = max(1, sample_length - rw.reserve_tokens)
    return max(rw.chunk_tokens, int(context * (1.0 - rw.reject_tail_fraction)))


def passages_for(
    plan: SamplePlan, ctx: Context | None, rw: RewriterConfig, sample_length: int
) -> list[Passage]:
    if ctx is None:
        return []
    end = usable_end(rw, sample_length)
    # documents format: the context may start up to head_tokens() in, so passages come after that
    lo = head_tokens(sample_length) if rw.context_format == "documents" else 0
    return [ctx.passage(d, sample_length, end, rw.chunk_tokens, lo) for d in plan.depths]


def turn_requests(
    plan: SamplePlan,
    strategy: RewriterStrategy,
    template: PromptTemplate,
    passages: list[Passage],
    rw: RewriterConfig,
) -> list[ChatRequest]:
    """The requests of one sample: one, or one per QA turn (chunk_qa with turns_per_context > 1), each
    the single-turn prompt on its own passage, so every turn is asked and checked like a lone sample."""
    if plan.kind == "chunk_qa" and strategy.turns_per_context > 1:
        return [build_request(plan, strategy, template, [p], rw) for p in passages]
    return [build_request(plan, strategy, template, passages, rw)]


def build_request(
    plan: SamplePlan,
    strategy: RewriterStrategy,
    template: PromptTemplate,
    passages: list[Passage],
    rw: RewriterConfig,
) -> ChatRequest:
    values: dict[str, Any] = {}
    if plan.kind == "multi_hop":
        values["passages"] = [p.text for p in passages]
    elif passages:
        values["passage"] = passages[0].text
    if plan.kind == "session_state":
        values["turns"] = strategy.turns
    if plan.conversation is not None:
        values["conversation"] = json.dumps(
            [{"role": r, "content": c} for r, c in plan.conversation.turns], ensure_ascii=False
        )
    messages = template.render(**values)
    items = {"messages": len(plan.conversation.turns)} if plan.conversation is not None else {}
    if plan.kind == "session_state":
        items = {"turns": strategy.turns}
    return ChatRequest.build(
        template.name,
        template.version,
        messages,
        sampling_params(rw, plan.seed),
        template.response_format(rw.json_mode, items),
    )


# --- answers -> drafts ----------------------------------------------------------------------------------


def _check_quote(q: str, rw: RewriterConfig) -> str:
    if len(normalize_quote(q)) < rw.min_quote_chars:
        raise Rejection("quote_too_short", f"evidence {q!r} is shorter than {rw.min_quote_chars} characters")
    return q


# Labels that exist only in the prompt the model was shown ("passage 2", "chunk #3", "excerpt [1]"): the
# training sample has no such labels, so a question naming one cannot be answered from it (issue 17.3).
_PROMPT_LABEL = re.compile(
    r"\b(?:passage|chunk|excerpt|snippet|segment)s?\s*(?:#|no\.?|number|id)?\s*[\[(]?\s*\d+",
    re.IGNORECASE,
)


def _not_leaking(question: str, answer: str, quotes: list[str]) -> None:
    """A question that already contains its answer or its evidence needs no context at all; one that
    names a prompt-internal label ("passage 2") refers to something the sample does not show."""
    label = _PROMPT_LABEL.search(question)
    if label:
        raise Rejection(
            "prompt_label_in_question",
            f"the question refers to {label.group(0)!r}, a label of the prompt that the sample does not have",
        )
    qn = normalize_quote(question)
    for q in quotes:
        if normalize_quote(q) and normalize_quote(q) in qn:
            raise Rejection("answer_in_question", "the question quotes its own evidence")
    an = normalize_quote(answer)
    if len(an) >= 4 and an in qn:
        raise Rejection("answer_in_question", f"the question contains its answer {answer!r}")


# Answer support: most content words of a QA answer must occur in its evidence quotes or its question.
# An answer that brings words of its own states facts the quoted evidence does not give (a model that
# answers from memory, or about another passage); the quote alone is checked against the context.
ANSWER_SUPPORT = 0.5
_WORD = re.compile(r"[^\W_]+")
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "nor",
        "so",
        "yet",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "by",
        "with",
        "without",
        "about",
        "into",
        "onto",
        "over",
        "under",
        "as",
        "than",
        "then",
        "that",
        "this",
        "these",
        "those",
        "there",
        "here",
        "it",
        "its",
        "it's",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "do",
        "does",
        "did",
        "done",
        "has",
        "have",
        "had",
        "having",
        "not",
        "no",
        "yes",
        "i",
        "you",
        "he",
        "she",
        "we",
        "they",
        "them",
        "him",
        "her",
        "his",
        "hers",
        "their",
        "theirs",
        "our",
        "ours",
        "your",
        "yours",
        "my",
        "me",
        "us",
        "who",
        "whom",
        "whose",
        "which",
        "what",
        "when",
        "where",
        "why",
        "how",
        "all",
        "any",
        "both",
        "each",
        "few",
        "more",
        "most",
        "other",
        "some",
        "such",
        "only",
        "own",
        "same",
        "too",
        "very",
        "can",
        "will",
        "just",
        "should",
        "would",
        "could",
        "may",
        "might",
        "must",
        "shall",
        "also",
        "says",
        "said",
        "say",
        "according",
        "text",
        "document",
        "passage",
        "states",
        "stated",
    ]
)


def content_words(text: str) -> list[str]:
    """Lower-cased words of a text that carry content: not stop words, longer than one letter."""
    return [
        w
        for w in (m.lower() for m in _WORD.findall(text))
        if w not in _STOPWORDS and (len(w) > 1 or w.isdigit())
    ]


def answer_support(answer: str, sources: list[str]) -> tuple[float, list[str]] | None:
    """The share of the answer's content words found among the sources' words, and the words not
    found; None for an answer without content words ("Yes.", "No.")."""
    words = content_words(answer)
    if not words:
        return None
    have = set(content_words(" ".join(sources)))
    missing = [w for w in words if w not in have]
    return 1 - len(missing) / len(words), missing


def _supported(answer: str, sources: list[str]) -> None:
    found = answer_support(answer, sources)
    if found is not None and found[0] < ANSWER_SUPPORT:
        share, missing = found
        raise Rejection(
            "answer_unsupported",
            f"{share:.0%} of the answer's content words are in its evidence or question "
            f"({ANSWER_SUPPORT:.0%} needed); not found: {', '.join(dict.fromkeys(missing))[:200]}",
        )


def _chunk_qa(obj: dict[str, Any], rw: RewriterConfig) -> Draft:
    question = text_field(obj, "question")
    answer = text_field(obj, "answer")
    ev = obj.get("evidence")
    quotes = (
        [ev] if isinstance(ev, str) else [e for e in ev if isinstance(e, str)] if isinstance(ev, list) else []
    )
    if not quotes or not any(q.strip() for q in quotes):
        raise ParseFailure("missing_field", "field 'evidence' is missing or empty")
    quotes = [_check_quote(q, rw) for q in quotes if q.strip()]
    _not_leaking(question, answer, quotes)
    _supported(answer, [*quotes, question])
    return Draft(
        turns=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        quotes=[DraftQuote(q, None) for q in quotes],
        questions=[DraftQuestion(0, [answer], "exact", list(range(len(quotes))))],
        dedup_key=question_key(question),
    )


def _multi_hop(obj: dict[str, Any], rw: RewriterConfig, n_passages: int) -> Draft:
    question = text_field(obj, "question")
    answer = text_field(obj, "answer")
    ev = obj.get("evidence")
    if not isinstance(ev, list) or not ev:
        raise ParseFailure("missing_field", "field 'evidence' must be a list of {passage, quote}")
    quotes: list[DraftQuote] = []
    for e in ev:
        if not isinstance(e, dict) or not isinstance(e.get("quote"), str):
            raise ParseFailure("missing_field", f"evidence item {e!r:.80} lacks a string 'quote'")
        try:
            k = int(e.get("passage")) - 1  # type: ignore[arg-type]
        except (TypeError, ValueError):
            k = -1
        if not 0 <= k < n_passages:
            raise Rejection(
                "bad_passage_reference", f"evidence names passage {e.get('passage')!r} of {n_passages}"
            )
        quotes.append(DraftQuote(_check_quote(e["quote"], rw), k))
    covered = {q.passage for q in quotes}
    if len(covered) < n_passages:
        missing = sorted(set(range(n_passages)) - covered)
        raise Rejection("hop_missing", f"no evidence from passage(s) {[m + 1 for m in missing]}")
    _not_leaking(question, answer, [q.text for q in quotes])
    return Draft(
        turns=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        quotes=quotes,
        questions=[DraftQuestion(0, [answer], "exact", list(range(len(quotes))))],
        dedup_key=question_key(question),
    )


def _contains(haystack: str, needle: str) -> bool:
    n = normalize_quote(needle)
    return bool(n) and n in normalize_quote(haystack)


def _session_state(obj: dict[str, Any], rw: RewriterConfig) -> Draft:
    quote = _check_quote(text_field(obj, "evidence"), rw)
    original = text_field(obj, "original_value")
    new = text_field(obj, "new_value")
    subject = str(obj.get("subject") or "")
    raw_turns = obj.get("turns")
    if not isinstance(raw_turns, list) or not all(
        isinstance(t, dict) and isinstance(t.get("user"), str) and isinstance(t.get("assistant"), str)
        for t in raw_turns
    ):
        raise ParseFailure("missing_field", "field 'turns' must be a list of {user, assistant} strings")
    if len(raw_turns) < 3:
        raise Rejection("too_few_turns", f"{len(raw_turns)} turns, at least 3 are needed")
    if normalize_quote(original) == normalize_quote(new):
        raise Rejection("value_unchanged", f"new value {new!r} equals the original")
    if not _contains(quote, original):
        raise Rejection("value_not_in_evidence", f"original value {original!r} is not in the quoted evidence")
    # the turn that changes the value: the first user turn after the first that states the new value
    change = next((i for i, t in enumerate(raw_turns[1:-1], 1) if _contains(t["user"], new)), None)
    if change is None:
        raise Rejection("change_not_stated", f"no user turn before the last states the new value {new!r}")
    last = raw_turns[-1]
    if not (_contains(last["assistant"], new) and _contains(last["assistant"], original)):
        raise Rejection(
            "final_answer_incomplete", "the last answer must give both the original and the new value"
        )
    turns: list[dict[str, str]] = []
    for t in raw_turns:
        turns += [
            {"role": "user", "content": t["user"].strip()},
            {"role": "assistant", "content": t["assistant"].strip()},
        ]
    if any(not m["content"] for m in turns):
        raise Rejection("empty_turn", "a turn has no text")
    n = len(turns)
    return Draft(
        turns=turns,
        quotes=[DraftQuote(quote, None)],
        turn_evidence=[DraftTurnEvidence(2 * change, new, "state_change")],
        questions=[
            DraftQuestion(0, [original], "exact", [0]),
            DraftQuestion(n - 2, [original, new], "set", [0], [0]),
        ],
        dedup_key=question_key(turns[0]["content"] + " || " + turns[-2]["content"]),
        info={"subject": subject, "original_value": original, "new_value": new, "change_turn": change},
    )


# A rephrased message is compared with the input message it rewrites: a model that copies the
# template's example ("...") or drops most of a turn has not rephrased it. Ratios are of character
# counts plus a slack, so that short turns ("Thanks!") may change freely.
PLACEHOLDER = re.compile(
    r"[\W_]*|n/?a|none|null|todo|tbd|placeholder|same as (?:above|before)|\(?unchanged\)?"
    r"|\[[^\]]{0,40}\]|<[^>]{0,40}>",
    re.IGNORECASE,
)
LENGTH_RATIO = (0.2, 5.0)  # bounds of (len(new) + slack) / (len(input) + slack), per message
LENGTH_SLACK = 40


def _check_rephrase(turns: list[dict[str, str]], source: list[tuple[str, str]], grounded: bool) -> None:
    """Reject a rephrase whose messages are placeholders or far longer or shorter than the input's."""
    for i, t in enumerate(turns):
        if PLACEHOLDER.fullmatch(t["content"].strip()):
            raise Rejection("placeholder_turn", f"message {i} is a placeholder: {t['content'][:40]!r}")
    lo, hi = LENGTH_RATIO
    for i, (t, (_, original)) in enumerate(zip(turns, source, strict=True)):
        if grounded and i < 2:
            continue  # the grounded template rewrites the first exchange around the passage
        ratio = (len(t["content"]) + LENGTH_SLACK) / (len(original) + LENGTH_SLACK)
        if not lo <= ratio <= hi:
            raise Rejection(
                "length_ratio",
                f"message {i} has {len(t['content'])} characters for an input of {len(original)} "
                f"(ratio {ratio:.2f}, allowed {lo}-{hi})",
            )


def _rephrase(obj: dict[str, Any], rw: RewriterConfig, plan: SamplePlan, grounded: bool) -> Draft:
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs
    ):
        raise ParseFailure("missing_field", "field 'messages' must be a list of {role, content}")
    turns = [{"role": str(m.get("role", "")).lower(), "content": m["content"].strip()} for m in msgs]
    want = len(plan.conversation.turns) if plan.conversation else 0
    roles = [t["role"] for t in turns]
    if roles != ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]:
        raise Rejection("bad_roles", f"roles must alternate user/assistant from user, got {roles[:8]}")
    if len(turns) != want:
        raise Rejection("turns_changed", f"{len(turns)} messages instead of the input's {want}")
    if any(not t["content"] for t in turns):
        raise Rejection("empty_turn", "a turn has no text")
    if plan.conversation is not None:
        _check_rephrase(turns, list(plan.conversation.turns), grounded)
    quotes: list[DraftQuote] = []
    if grounded:
        quotes = [DraftQuote(_check_quote(text_field(obj, "evidence"), rw), None)]
        _not_leaking(turns[0]["content"], turns[1]["content"], [q.text for q in quotes])
    return Draft(
        turns=turns,
        quotes=quotes,
        questions=[DraftQuestion(0, [turns[1]["content"]], "exact", list(range(len(quotes))))],
        dedup_key=question_key(turns[0]["content"]),
        info={"input": plan.conversation.ref if plan.conversation else None},
    )


def interpret(plan: SamplePlan, obj: dict[str, Any], rw: RewriterConfig, n_passages: int) -> Draft:
    """The draft sample in a parsed answer; raises Rejection or ParseFailure."""
    if plan.kind == "chunk_qa":
        return _chunk_qa(obj, rw)
    if plan.kind == "multi_hop":
        return _multi_hop(obj, rw, n_passages)
    if plan.kind == "session_state":
        return _session_state(obj, rw)
    return _rephrase(obj, rw, plan, grounded=plan.grounded)
