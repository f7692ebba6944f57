"""Where evidence sits and how the context ends (issue 12, items 19-20), checked from the generated
samples' text with the tokenizer, not from the positions the generator records."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.core.tokenizer import load_tokenizer
from pipeline.synth.chat import Haystack, load_template
from pipeline.synth.procedural import GENERATORS
from pipeline.synth.procedural.sample import BuiltSample, build_sample
from schemas.procedural import (
    AggregationTask,
    HashChainTask,
    MultiNeedleTask,
    ProceduralConfig,
    VariableTrackingTask,
)
from tests.test_procedural import sample_docs

TASKS: list[Any] = [
    HashChainTask(chains=4, hops=4, queries=2),
    MultiNeedleTask(num_keys=6, values_per_key=1, queries=3, style="classic"),
    MultiNeedleTask(num_keys=4, values_per_key=2, queries=2, style="stealth"),
    VariableTrackingTask(chains=2, hops=4, distractors=3),
    AggregationTask(top_k=3, frequent_count=5, rare_items=6, rare_count=2),
]


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return load_tokenizer("quicktok:llama3")


@pytest.fixture(scope="module")
def hay(tok):  # type: ignore[no-untyped-def]
    docs = sample_docs()
    books = [t for k, t in docs.items() if not k.startswith(("wiki", "kjv")) and len(t) > 100_000]
    wiki = [t for t in docs.values() if len(t) < 100_000][:1500]
    return Haystack.from_documents(tok, [*wiki, *books])


def build(
    tok: Any, hay: Haystack, params: Any, seed: int, target: int, start: int = 0
) -> tuple[Any, BuiltSample]:
    depth_range = ProceduralConfig().depth_range  # the default, as a run without depth_range uses
    draft = GENERATORS[params.task].draft(params, np.random.default_rng(seed), seed, depth_range)
    built = build_sample(
        draft,
        hay,
        load_template("llama3", tok),
        target,
        "full_chat",
        None,
        f"s{seed}",
        seed,
        {"steps": ["test@1"]},
        start_token=start,
    )
    return draft, built


def _context(draft: Any, built: BuiltSample) -> str:
    """The context text of the first user message: between the instruction and the first question."""
    content = built.chat.messages[built.chat.context_message]["content"]
    assert content.startswith(draft.instruction) and content.endswith(draft.queries[0].question)
    return content[len(draft.instruction) : len(content) - len(draft.queries[0].question)]


def test_default_depth_range_leaves_the_tail_out(tok, hay) -> None:  # type: ignore[no-untyped-def]
    for seed in range(3):
        for params in TASKS:
            draft, built = build(tok, hay, params, seed, 8192)
            ctx = _context(draft, built)
            n_ctx = len(tok.encode(ctx))
            for needle in draft.needles:
                text = needle.text.strip()
                at = ctx.find(text)
                assert at >= 0, text
                # tokens after the needle's end, up to the question: at least 10% of the context
                after = len(tok.encode(ctx[at + len(text) :]))
                assert after >= 0.1 * n_ctx, (params.task, text, after, n_ctx)


@pytest.mark.parametrize("target", [4096, 8192, 16384])
def test_context_never_ends_mid_word(tok, hay, target: int) -> None:  # type: ignore[no-untyped-def]
    text = hay.text
    for seed in range(8):
        for params in TASKS:
            draft, built = build(tok, hay, params, seed, target, start=seed * 997)
            assert built.record["length"] == target == built.chat.length
            assert len(built.chat.rendered.ids) >= target - 64
            ctx = _context(draft, built).rstrip()
            tail = ctx[-40:]
            assert tail[-1:].strip(), "the context ends in whitespace only"
            # where the haystack text stops: the next haystack character is not part of the word
            hits, i = [], text.find(tail)
            while i >= 0:
                hits.append(i)
                i = text.find(tail, i + 1)
            assert hits, f"context tail not found in the haystack: {tail!r}"
            assert any(
                i + len(tail) >= len(text) or not (text[i + len(tail)].isalnum() and tail[-1].isalnum())
                for i in hits
            ), f"{params.task} seed {seed}: context ends mid-word: ...{tail!r}"
