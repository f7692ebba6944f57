"""HashHop mode of `hash_chain` (issue 16.1): a context made of shuffled hash pairs only.

Checked with a reader written here (not the generator's `solve`): every answer follows by walking the
links from the question's start hash; the links fill the context; and the shortcuts HashHop is built
to defeat (the most frequent hash, the last hash in the context, the chain end nearest the start)
answer at chance.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
import pytest

from pipeline.core.tokenizer import load_tokenizer
from pipeline.synth.chat import Haystack, load_template
from pipeline.synth.procedural import GENERATORS
from pipeline.synth.procedural.sample import BuiltSample, build_sample
from schemas.procedural import HashChainTask
from tests.test_procedural import sample_docs


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return load_tokenizer("quicktok:llama3")


@pytest.fixture(scope="module")
def hay(tok):  # type: ignore[no-untyped-def]
    wiki = [t for k, t in sample_docs().items() if k.startswith("enwiki")][:600]
    return Haystack.from_documents(tok, wiki)


def build(
    tok: Any, hay: Haystack, p: HashChainTask, target: int, seed: int, counts: str = "full_chat"
) -> tuple[Any, BuiltSample]:
    draft = GENERATORS["hash_chain"].draft(p, np.random.default_rng(seed), 0, (0.0, 0.8))
    built = build_sample(
        draft,
        hay,
        load_template("llama3", tok),
        target,
        counts,  # type: ignore[arg-type]
        "Answer from the document.",
        f"hh{seed}",
        seed,
        {"steps": ["test@1"]},
    )
    return draft, built


def context(b: BuiltSample) -> str:
    return b.chat.messages[b.chat.context_message]["content"]


class Links:
    """The hash pairs of a context, read line by line (this test's own reader)."""

    def __init__(self, text: str, alphabet: str, length: int) -> None:
        ok = set(alphabet)

        def is_hash(s: str) -> bool:
            return len(s) == length and set(s) <= ok

        self.lines: list[str] = []
        self.pairs: list[tuple[str, str]] = []
        for line in text.split("\n"):
            parts = line.split(" → ")
            if len(parts) == 2 and is_hash(parts[0]) and is_hash(parts[1]):
                self.lines.append(line)
                self.pairs.append((parts[0], parts[1]))
        self.next: dict[str, str] = {}
        for a, b in self.pairs:
            assert a not in self.next, f"{a} links to two hashes: the chain is ambiguous"
            self.next[a] = b
        sources = set(self.next)
        self.ends = {b for _, b in self.pairs if b not in sources}
        self.line_of = {a: i for i, (a, _) in enumerate(self.pairs)}

    def walk(self, start: str) -> list[str]:
        chain = [start]
        while chain[-1] in self.next:
            chain.append(self.next[chain[-1]])
            assert len(chain) <= len(self.pairs) + 1, "cycle"
        return chain


def start_of(question: str, alphabet: str, length: int) -> str:
    m = re.search(rf"[{re.escape(alphabet)}]{{{length}}}", question)
    assert m, question
    return m.group(0)


def check_sample(tok: Any, draft: Any, built: BuiltSample, p: HashChainTask) -> dict[str, int]:
    """Answers, fill share and baselines of one sample; returns baseline hit counts."""
    r = built.record
    assert len(r["input_ids"]) == r["length"] == r["target_length"]
    ctx = context(built)
    body = ctx[len(draft.instruction) : len(ctx) - len(draft.queries[0].question)]
    links = Links(body, p.alphabet, p.hash_length)
    # every line of the context (but the blank end) is a link, unless prose was asked for
    lines = [ln for ln in body.split("\n") if ln.strip()]
    if p.prose_share == 0:
        assert len(lines) == len(links.lines)
    # links fill the context: their tokens over the context's tokens
    link_tokens = int(tok.count_batch([ln + "\n" for ln in links.lines]).sum())
    share = link_tokens / r["context_tokens"]
    assert share >= 0.95 * (1 - p.prose_share) - 0.01, share
    hits = Counter[str]()
    freq = Counter(h for pair in links.pairs for h in pair)
    last_hash = links.pairs[-1][1]
    for q in draft.queries:
        start = start_of(q.question, p.alphabet, p.hash_length)
        chain = links.walk(start)
        assert len(chain) == p.hops + 1
        want = chain if p.completion == "chain_of_thought" else [chain[-1]]
        assert q.expected == want
        end = chain[-1]
        # baselines: the most frequent hash, the last hash, the chain end whose line is nearest the start's
        if freq.most_common(1)[0][0] == end:
            hits["most_frequent"] += 1
        if last_hash == end:
            hits["last_hash"] += 1
        at = links.line_of[start]
        nearest = min(
            (i for i, (_, b) in enumerate(links.pairs) if b in links.ends and i != at),
            key=lambda i: (abs(i - at), i),
        )
        if links.pairs[nearest][1] == end:
            hits["nearest_end"] += 1
    return dict(hits)


@pytest.mark.parametrize(
    "hops,completion,alphabet,length",
    [
        (1, "skip", "0123456789abcdef", 16),
        (3, "chain_of_thought", "0123456789abcdef", 16),
        (6, "skip", "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", 8),
        (8, "chain_of_thought", "0123456789", 12),
    ],
)
def test_hashhop_64k_answers_fill_and_baselines(  # type: ignore[no-untyped-def]
    tok, hay, hops: int, completion: Any, alphabet: str, length: int
) -> None:
    p = HashChainTask(
        chains=6,
        hops=hops,
        queries=6,
        completion=completion,
        alphabet=alphabet,
        hash_length=length,
        haystack="hashes",
    )
    total: Counter[str] = Counter()
    queries = 0
    for seed in (1, 2, 3):
        draft, built = build(tok, hay, p, 65536, seed)
        assert built.record["length"] == 65536
        total.update(check_sample(tok, draft, built, p))
        queries += len(draft.queries)
        # the evidence of each question is exactly its chain's links, where the record says
        ctx = context(built)
        for rec in built.record["questions"]:
            ev = [built.record["evidence"][i] for i in rec["evidence"]]
            assert len(ev) == hops
            ids = np.asarray(built.record["input_ids"])
            for e in ev:
                assert (
                    tok.decode(ids[e["token_start"] : e["token_end"]]) == ctx[e["char_start"] : e["char_end"]]
                )
    # thousands of chain ends per context: any shortcut right more than once in 18 questions is not chance
    assert all(v <= 1 for v in total.values()), (dict(total), queries)


@pytest.mark.parametrize("counts", ["full_chat", "without_answers", "context_only"])
@pytest.mark.parametrize("target", [4096, 30001])
def test_hashhop_is_exactly_sized(tok, hay, counts: str, target: int) -> None:  # type: ignore[no-untyped-def]
    p = HashChainTask(chains=3, hops=2, queries=2, haystack="hashes")
    _draft, built = build(tok, hay, p, target, 5, counts)
    assert built.record["length"] == target
    ids = np.asarray(built.record["input_ids"])
    tmpl = load_template("llama3", tok)
    assert np.array_equal(tmpl.render(built.chat.messages).ids, ids)
    if counts == "context_only":
        assert built.record["context_tokens"] == target


def test_hashhop_with_prose_keeps_lineage(tok, hay) -> None:  # type: ignore[no-untyped-def]
    p = HashChainTask(chains=4, hops=3, queries=4, haystack="hashes", prose_share=0.4)
    draft, built = build(tok, hay, p, 32768, 9)
    ctx = context(built)
    check_sample(tok, draft, built, p)
    body = ctx[len(draft.instruction) :]
    prose = [ln for ln in body.split("\n") if ln.strip() and " → " not in ln][:-1]  # [-1]: the question
    prose_tokens = int(tok.count_batch([ln + "\n" for ln in prose]).sum())
    assert 0.38 <= prose_tokens / built.record["context_tokens"] <= 0.5
    # prose lines are recorded as haystack runs pointing at their text in the haystack
    segs = built.record["haystack"]
    assert len(segs) == len(prose)
    ids = np.asarray(built.record["input_ids"])
    for s, line in zip(segs, prose, strict=True):
        text = tok.decode(ids[s["row_token_start"] : s["row_token_end"]])
        assert text.strip() == line and line in hay.text
        assert s["char_end"] - s["char_start"] == len(line)
    # and they are spread through the context, not bunched at one end
    first, last = ctx.find(prose[0]), ctx.rfind(prose[-1])
    assert first < len(ctx) * 0.1 and last > len(ctx) * 0.85


def test_default_hash_chain_params_are_unchanged() -> None:
    assert set(HashChainTask().params()) == {
        "task",
        "hash_length",
        "alphabet",
        "chains",
        "hops",
        "queries",
        "completion",
    }
    with pytest.raises(ValueError, match="prose_share needs haystack"):
        HashChainTask(prose_share=0.2)


@pytest.mark.slow
def test_hashhop_one_million_tokens(tok, hay) -> None:  # type: ignore[no-untyped-def]
    p = HashChainTask(chains=16, hops=4, queries=16, haystack="hashes")
    draft, built = build(tok, hay, p, 1_048_576, 11)
    assert len(built.record["input_ids"]) == built.record["length"] == 1_048_576
    hits = check_sample(tok, draft, built, p)
    assert all(v <= 1 for v in hits.values()), hits
    assert max(q["dependency_distance"] for q in built.record["questions"]) > 500_000
