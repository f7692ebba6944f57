"""Procedural generators: answers follow from the context alone, exact lengths, positions, seeds, scoring, stage."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.core.tokenizer import load_tokenizer
from pipeline.stages.procedural import sample_seed
from pipeline.synth.chat import Haystack, load_template
from pipeline.synth.procedural import GENERATORS
from pipeline.synth.procedural.base import Draft
from pipeline.synth.procedural.sample import BuiltSample, build_sample
from pipeline.synth.procedural.score import grade, items, score_table
from schemas.config import ConfigError
from schemas.procedural import (
    AggregationTask,
    HashChainTask,
    MultiNeedleTask,
    ProceduralConfig,
    VariableTrackingTask,
)
from tests.conftest import DATA, make_config

TASKS: dict[str, Any] = {
    "hash_cot": HashChainTask(chains=4, hops=5, queries=2),
    "hash_skip": HashChainTask(chains=3, hops=4, completion="skip", alphabet="abcdefghijklmnopqrstuvwxyz"),
    "hash_two_hop": HashChainTask(chains=2, hops=5, completion="two_hop"),
    "needle_classic": MultiNeedleTask(num_keys=5, values_per_key=3, queries=2, style="classic"),
    "needle_stealth": MultiNeedleTask(num_keys=4, values_per_key=1, queries=2, style="stealth"),
    "needle_uuid": MultiNeedleTask(num_keys=3, values_per_key=2, style="classic", value_kind="uuid"),
    "variables": VariableTrackingTask(chains=2, hops=4, distractors=3),
    "aggregation": AggregationTask(top_k=4, frequent_count=6, rare_items=10, rare_count=2),
}


def sample_docs() -> dict[str, str]:
    """doc_id -> text of the bundled sample's prose sources (wiki, books, bible)."""
    docs: dict[str, str] = {}
    for p in sorted((DATA / "sample" / "wiki").glob("*.jsonl.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            for line in f:
                o = json.loads(line)
                docs[o["id"]] = o["text"]
    with open(DATA / "sample" / "books" / "books.jsonl.zst", "rb") as fb:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fb), encoding="utf-8"):
            o = json.loads(line)
            docs[o["id"]] = o["text"]
    t = pq.read_table(DATA / "sample" / "bible" / "kjv.parquet")
    docs.update(zip(t.column("id").to_pylist(), t.column("text").to_pylist(), strict=True))
    return docs


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return load_tokenizer("quicktok:llama3")


@pytest.fixture(scope="module")
def hay(tok):  # type: ignore[no-untyped-def]
    code = (DATA / "sample" / "code" / "jsonpkg" / "decoder.py").read_text()
    docs = sample_docs()
    books = [t for k, t in docs.items() if not k.startswith(("wiki", "kjv")) and len(t) > 100_000]
    wiki = [t for k, t in docs.items() if len(t) < 100_000][:1500]
    return Haystack.from_documents(tok, [code, *wiki, *books])


def make(
    tok: Any,
    hay: Haystack,
    params: Any,
    seed: int = 7,
    target: int = 16384,
    counts: str = "full_chat",
    index: int = 0,
    start: int = 0,
) -> tuple[Draft, BuiltSample]:
    gen = GENERATORS[params.task]
    draft = gen.draft(params, np.random.default_rng(seed), index, (0.0, 1.0))
    built = build_sample(
        draft,
        hay,
        load_template("llama3", tok),
        target,
        counts,  # type: ignore[arg-type]
        "Answer from the document.",
        f"s{seed}",
        seed,
        {"steps": ["test@1"]},
        start_token=start,
    )
    return draft, built


def _context(b: BuiltSample) -> str:
    return b.chat.messages[b.chat.context_message]["content"]


def _without(text: str, spans: list[tuple[int, int]]) -> str:
    out, pos = [], 0
    for a, e in sorted(spans):
        out.append(text[pos:a])
        pos = e
    out.append(text[pos:])
    return "".join(out)


def _same(got: list[str], expected: list[str], match: str) -> bool:
    return got == expected if match == "ordered" else sorted(got) == sorted(expected)


@pytest.mark.parametrize("name", list(TASKS))
def test_answer_follows_from_the_context_and_only_from_it(tok, hay, name: str) -> None:  # type: ignore[no-untyped-def]
    params = TASKS[name]
    gen = GENERATORS[params.task]
    draft, built = make(tok, hay, params, start=5000)
    ctx = _context(built)
    ev = built.record["evidence"]
    for q, rec in zip(draft.queries, built.record["questions"], strict=True):
        # a reader that only sees the context text finds exactly the reference answer
        assert _same(gen.solve(ctx, q.question, draft.params), q.expected, q.match)
        # ... and nothing once the evidence the question needs is cut out of the context
        spans = [(ev[i]["char_start"], ev[i]["char_end"]) for i in rec["evidence"]]
        cut = _without(ctx, spans)
        got = gen.solve(cut, q.question, draft.params)
        assert not _same(got, q.expected, q.match)
        if params.task in ("hash_chain", "multi_needle"):
            # the random values appear nowhere else: they cannot be guessed from the rest of the text
            asked = q.expected[1:] if params.task == "hash_chain" else q.expected
            assert not any(v in cut for v in asked)
    # removing a single piece of evidence also changes the answer where every piece matters
    q0, rec0 = draft.queries[0], built.record["questions"][0]
    one = ev[rec0["evidence"][len(rec0["evidence"]) // 2]]
    if params.task == "aggregation":
        # drop every entry of one frequent item: it falls out of the top k
        item = q0.expected[0]
        spans = [
            (e["char_start"], e["char_end"])
            for e in ev
            if ctx[e["char_start"] : e["char_end"]].strip().endswith(item)
        ]
        assert not _same(gen.solve(_without(ctx, spans), q0.question, draft.params), q0.expected, "set")
    elif params.task != "multi_needle" or len(rec0["evidence"]) > 1:
        cut1 = _without(ctx, [(one["char_start"], one["char_end"])])
        assert not _same(gen.solve(cut1, q0.question, draft.params), q0.expected, q0.match)


@pytest.mark.parametrize("name", ["hash_cot", "needle_stealth", "variables", "aggregation"])
def test_positions_match_the_text(tok, hay, name: str) -> None:  # type: ignore[no-untyped-def]
    draft, built = make(tok, hay, TASKS[name], seed=3, target=12000)
    r = built.record
    ids = np.asarray(r["input_ids"])
    for e in r["evidence"]:
        text = r["messages"][e["message_index"]]["content"][e["char_start"] : e["char_end"]]
        assert tok.decode(ids[e["token_start"] : e["token_end"]]) == text
        assert (
            abs(e["depth"] - (e["token_start"] - built.chat.context_token_span[0]) / r["context_tokens"])
            < 1e-6
        )
    # every needle text is one of the draft's, at a depth near the one asked for
    texts = sorted(n.text for n in draft.needles)
    placed = sorted(
        r["messages"][e["message_index"]]["content"][e["char_start"] : e["char_end"]].strip()
        for e in r["evidence"]
    )
    assert placed == texts
    for p, n in zip(built.chat.pieces, draft.needles, strict=True):
        assert abs(p.depth - n.depth) < 0.08
    for q in r["questions"]:
        assert tok.decode(ids[q["token_start"] : q["token_end"]]) == q["text"]
        first = min(r["evidence"][i]["token_start"] for i in q["evidence"])
        assert q["dependency_distance"] == q["token_start"] - first > 0
    assert r["dependency_distance"] == max(q["dependency_distance"] for q in r["questions"])
    # multi-turn: one user turn per question, each followed by its reference answer
    users = [m for m in r["messages"] if m["role"] == "user"]
    answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
    assert len(users) == len(draft.queries) and answers == [q.answer for q in draft.queries]


def test_depths_spread_evenly(tok, hay) -> None:  # type: ignore[no-untyped-def]
    params = VariableTrackingTask(chains=1, hops=9, distractors=4)
    _, built = make(tok, hay, params, target=20000)
    depths = np.sort([e["depth"] for e in built.record["evidence"]])
    gaps = np.diff(depths)
    assert depths[0] < 0.05 and depths[-1] > 0.95 and gaps.max() < 2.5 / len(depths)
    # single needles wander over the whole window from one sample to the next
    one = MultiNeedleTask(num_keys=1, style="classic")
    d = [
        make(tok, hay, one, seed=s, index=s, target=4096)[1].record["evidence"][0]["depth"] for s in range(8)
    ]
    assert min(d) < 0.2 and max(d) > 0.8


@pytest.mark.parametrize("target", [4096, 30001, 65536, 262144])
def test_exact_token_lengths(tok, hay, target: int) -> None:  # type: ignore[no-untyped-def]
    tpl = load_template("llama3", tok)
    for counts in ("full_chat", "without_answers", "context_only"):
        _, built = make(tok, hay, TASKS["needle_classic"], seed=11, target=target, counts=counts)
        r = built.record
        assert r["length"] == target and r["length_counts"] == counts
        n = len(r["input_ids"])
        if counts == "full_chat":
            assert n == target
        elif counts == "context_only":
            assert r["context_tokens"] == target
        else:
            answers = sum(len(tpl.render([m]).ids) - 1 for m in r["messages"] if m["role"] == "assistant")
            assert n - answers == target
        # the stored ids are what tokenizing the stored messages gives
        assert np.array_equal(tpl.render(r["messages"]).ids, r["input_ids"])
        if target < 100_000:
            continue
        break  # one policy is enough at 256K


def test_reproducible_from_the_seed(tok, hay) -> None:  # type: ignore[no-untyped-def]
    for params in (TASKS["hash_cot"], TASKS["needle_stealth"], TASKS["aggregation"]):
        _, a = make(tok, hay, params, seed=99)
        _, b = make(tok, hay, params, seed=99)
        _, c = make(tok, hay, params, seed=100)
        assert np.array_equal(a.record["input_ids"], b.record["input_ids"])
        assert a.record["messages"] == b.record["messages"] and a.record["evidence"] == b.record["evidence"]
        assert a.record["messages"] != c.record["messages"]
    assert sample_seed(1, "hash_chain", 4096, 0) == sample_seed(1, "hash_chain", 4096, 0)
    assert sample_seed(1, "hash_chain", 4096, 0) != sample_seed(1, "hash_chain", 4096, 1)


def test_stealth_needles_sit_inside_prose(tok, hay) -> None:  # type: ignore[no-untyped-def]
    _, built = make(tok, hay, MultiNeedleTask(num_keys=6, style="stealth"), start=300_000)
    ctx = _context(built)
    inline = [e for e in built.record["evidence"] if e["label"] == "needle/inline"]
    assert len(inline) >= 4  # the books are prose: most find a sentence boundary
    for e in inline:
        assert ctx[e["char_start"]] == " " and ctx[e["char_start"] - 1] in ".!?"
        assert "\n" not in ctx[e["char_start"] : e["char_end"]]


# --- scorer -------------------------------------------------------------------------------------------


def test_grading_right_and_wrong_answers() -> None:
    assert grade("4417", ["4417"], "exact").correct
    assert grade("Answer: 4417.", ["4417"], "exact").correct
    assert not grade("4471", ["4417"], "exact").correct
    assert grade("beta, alpha", ["alpha", "beta"], "set").correct
    assert grade("- alpha\n- beta", ["alpha", "beta"], "set").correct
    extra = grade("alpha, beta, gamma", ["alpha", "beta"], "set")
    assert not extra.correct and extra.score == pytest.approx(2 / 3)
    assert not grade("alpha", ["alpha", "beta"], "set").correct
    assert not grade("alpha, alpha", ["alpha"], "set").correct
    assert grade("a1 → b2 → c3", ["a1", "b2", "c3"], "ordered").correct
    swapped = grade("a1 → c3 → b2", ["a1", "b2", "c3"], "ordered")
    # per-item credit: the longest common subsequence keeps two of three (issue 12.17)
    assert not swapped.correct and swapped.score == pytest.approx(2 / 3)
    assert not grade(None, ["x"], "exact").correct
    assert items("1. apple\n2. pear and plum") == ["apple", "pear", "plum"]


def test_scoring_an_eval_table(tok, hay) -> None:  # type: ignore[no-untyped-def]
    import pyarrow as pa

    from schemas.records import EVAL_SCHEMA

    rows = []
    for seed, name in enumerate(("hash_cot", "needle_classic", "variables")):
        _, built = make(tok, hay, TASKS[name], seed=seed, target=4096)
        rows += built.eval_records
    table = pa.Table.from_pylist(rows, schema=EVAL_SCHEMA)
    right = {r["eval_id"]: (" → " if r["match"] == "ordered" else ", ").join(r["expected"]) for r in rows}
    rep = score_table(table, right)
    assert rep.overall.correct == len(rows) and rep.missing == 0
    wrong = dict(right)
    first = rows[0]["eval_id"]
    wrong[first] = " → ".join(reversed(rows[0]["expected"]))
    del wrong[rows[-1]["eval_id"]]
    wrong["nope/q0"] = "x"
    rep = score_table(table, wrong)
    assert rep.overall.correct == len(rows) - 2 and rep.missing == 1 and rep.unknown == 1
    assert not rep.grades[first].correct
    assert rep.as_dict()["by_task"]["hash_chain"]["accuracy"] < 1.0


# --- config -------------------------------------------------------------------------------------------


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"procedural.tasks.0.hash_chain.*queries"):
        make_config(
            tmp_path,
            procedural={"enabled": True, "tasks": [{"task": "hash_chain", "chains": 2, "queries": 3}]},
        )
    with pytest.raises(ConfigError, match=r"procedural.tasks.0"):
        make_config(tmp_path, procedural={"tasks": [{"task": "sorting"}]})
    with pytest.raises(ConfigError, match=r"hops_typo"):
        make_config(tmp_path, procedural={"tasks": [{"task": "hash_chain", "hops_typo": 3}]})
    with pytest.raises(ConfigError, match="distinct"):
        make_config(tmp_path, procedural={"tasks": [{"task": "aggregation"}, {"task": "aggregation"}]})
    ok = ProceduralConfig(
        tasks=[{"task": "aggregation"}, {"task": "aggregation", "name": "agg_big", "top_k": 8}]
    )
    assert [t.label for t in ok.tasks] == ["aggregation", "agg_big"]


@pytest.mark.slow
def test_one_million_token_sample(tok) -> None:  # type: ignore[no-untyped-def]
    big = Haystack.from_documents(tok, list(sample_docs().values()))
    assert len(big) > 1_100_000
    params = HashChainTask(chains=16, hops=8, queries=3)
    draft, built = make(tok, big, params, seed=21, target=1_048_576)
    r = built.record
    assert len(r["input_ids"]) == r["length"] == 1_048_576
    ids = np.asarray(r["input_ids"])
    ctx = _context(built)
    for e in r["evidence"]:
        assert tok.decode(ids[e["token_start"] : e["token_end"]]) == ctx[e["char_start"] : e["char_end"]]
    gen = GENERATORS["hash_chain"]
    for q in draft.queries:
        assert gen.solve(ctx, q.question, draft.params) == q.expected
    assert max(q["dependency_distance"] for q in r["questions"]) > 900_000


def test_preflight_catches_procedural_problems_before_work(tmp_path: Path) -> None:
    from pipeline.build import preflight

    cfg = make_config(tmp_path / "a", procedural={"enabled": True, "chat_template": "chatml"})
    with pytest.raises(ConfigError, match=r"procedural.chat_template.*chatml"):
        preflight(cfg)
    big = {"task": "aggregation", "top_k": 20, "frequent_count": 40, "rare_items": 100, "rare_count": 5}
    cfg = make_config(tmp_path / "b", procedural={"enabled": True, "target_lengths": [2048], "tasks": [big]})
    with pytest.raises(ConfigError, match=r"procedural.tasks.0 \(aggregation\).*2048"):
        preflight(cfg)
    assert not (tmp_path / "b").exists()
    preflight(make_config(tmp_path / "c", procedural={"enabled": True, "target_lengths": [4096]}))
