"""Adversarial and conflicting evidence (issue 16.3), checked by a reader written here.

The reader parses the context's lines itself (no generator code): needle sentences with their key and
value in context order, and hash links. It checks each answer, that the distractors are really there and
really adversarial (keys sharing a word, values contradicting, hashes sharing a prefix), and that the
sample's evidence labels record every distractor it holds.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from pipeline.core.tokenizer import load_tokenizer
from pipeline.synth.chat import Haystack
from schemas.procedural import AdversarialTask, ProceduralConfig
from tests.test_procedural import sample_docs
from tests.test_ruler import body, build

STATED = re.compile(
    r"^(?:Correction: )?[Tt]he special magic number for (\S+) (?:is|has changed; it is now): (\d+)\.$"
)
LINK = re.compile(r"^(\S+) → (\S+)$")


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return load_tokenizer("quicktok:llama3")


@pytest.fixture(scope="module")
def hay(tok):  # type: ignore[no-untyped-def]
    return Haystack.from_documents(tok, [t for k, t in sample_docs().items() if k.startswith("enwiki")][:600])


def statements(lines: list[str]) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for ln in lines if (m := STATED.match(ln))]


def labels(built: Any) -> list[str]:
    return [e["label"] for e in built.record["evidence"]]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_near_miss_keys(tok, hay, seed: int) -> None:  # type: ignore[no-untyped-def]
    draft, built = build(tok, hay, AdversarialTask(kind="near_miss", distractors=6), seed, target=4096)
    assert built.record["length"] == 4096
    q = draft.queries[0]
    key = re.search(r"number for (\S+) mentioned", q.question).group(1)  # type: ignore[union-attr]
    found = statements(body(draft, built))
    assert [v for k, v in found if k == key] == q.expected
    others = [k for k, _ in found if k != key]
    assert len(others) == 6
    a, n = key.split("-")
    # every distractor key shares exactly one word with the asked key, and both kinds occur
    assert all((k.split("-")[0] == a) != (k.split("-")[1] == n) for k in others)
    assert {k.split("-")[0] == a for k in others} == {True, False}
    assert sorted(labels(built)) == ["distractor:near_miss"] * 6 + ["needle"]


@pytest.mark.parametrize("kind", ["update_latest", "update_original"])
@pytest.mark.parametrize("seed", [1, 2])
def test_contradicting_updates(tok, hay, kind: str, seed: int) -> None:  # type: ignore[no-untyped-def]
    draft, built = build(tok, hay, AdversarialTask(kind=kind, distractors=3), seed, target=4096)
    q = draft.queries[0]
    found = statements(body(draft, built))
    assert len({k for k, _ in found}) == 1 and len({v for _, v in found}) == 4  # one key, four values
    values = [v for _, v in found]  # in the order a reader meets them
    assert q.expected == [values[-1] if kind == "update_latest" else values[0]]
    lines = body(draft, built)
    first = next(ln for ln in lines if STATED.match(ln))
    assert not first.startswith("Correction")  # the original statement comes first in the context
    ev = built.record["evidence"]
    assert [e["label"] for e in sorted(ev, key=lambda e: e["token_start"])] == (
        ["distractor:conflicting_update"] * 3 + ["update"]
        if kind == "update_latest"
        else ["update"] + ["distractor:conflicting_update"] * 3
    )
    # the question the other variant asks would have another answer: the two variants differ
    assert values[0] != values[-1]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_prefix_sharing_decoy_chains(tok, hay, seed: int) -> None:  # type: ignore[no-untyped-def]
    params = AdversarialTask(kind="prefix_chain", hops=5, distractors=4, shared_prefix=10)
    draft, built = build(tok, hay, params, seed, target=4096)
    lines = body(draft, built)
    links = [(m.group(1), m.group(2)) for ln in lines if (m := LINK.match(ln))]
    nxt = dict(links)
    assert len(nxt) == len(links)  # every hash has at most one outgoing link
    start = re.search(r"start at (\S+)\.", draft.queries[0].question).group(1)  # type: ignore[union-attr]
    chain = [start]
    while chain[-1] in nxt:
        chain.append(nxt[chain[-1]])
    assert chain == draft.queries[0].expected and len(chain) == 6
    # decoys: hashes not on the chain that share the first 10 characters with the chain's hash one step on
    # the same position, and a naive reader matching 10-character prefixes finds ambiguity
    off = [(a, b) for a, b in links if a not in chain]
    assert len(off) >= 4
    by_prefix = {h[:10]: i for i, h in enumerate(chain)}
    for a, b in off:
        assert a[:10] in by_prefix and b[:10] in by_prefix and by_prefix[b[:10]] == by_prefix[a[:10]] + 1
    assert labels(built).count("hash_pair") == 5
    assert labels(built).count("distractor:prefix_chain") == len(off)


def test_adversarial_config_and_knob_checks() -> None:
    cfg = ProceduralConfig(enabled=True, tasks=[{"task": "adversarial", "kind": "update_original"}])
    assert cfg.tasks[0].task == "adversarial"
    with pytest.raises(ValueError, match="too small"):
        AdversarialTask(kind="prefix_chain", hash_length=10, shared_prefix=8)
