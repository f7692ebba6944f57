"""RULER parity (issue 16.2): every task of the bundled data/ruler.yaml, checked by readers written here.

The readers below parse the context text themselves (they share no code with the generators' `solve`):
needle lines, variable assignments, log entries and word counts. Each task's haystack is checked to be
what RULER's task uses (noise sentences, needles only, entries only, made-up words only, or prose).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.core.tokenizer import load_tokenizer
from pipeline.synth.chat import Haystack, load_template
from pipeline.synth.procedural import GENERATORS
from pipeline.synth.procedural.noise import NOISE
from pipeline.synth.procedural.sample import BuiltSample, build_sample
from schemas.config import parse_config
from tests.conftest import DATA
from tests.test_procedural import sample_docs

RULER_TASKS = [
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
]


def ruler_config(out: Path) -> Any:
    data = yaml.safe_load((DATA / "ruler.yaml").read_text())
    data["output"] = {**data.get("output", {}), "dir": str(out)}
    return parse_config(data, base_dir=DATA)


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return load_tokenizer("quicktok:llama3")


@pytest.fixture(scope="module")
def hay(tok):  # type: ignore[no-untyped-def]
    docs = sample_docs()
    return Haystack.from_documents(tok, [t for k, t in docs.items() if k.startswith("enwiki")][:800])


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cfg = ruler_config(tmp_path_factory.mktemp("ruler"))
    return {t.label: t for t in cfg.procedural.tasks}


def build(tok: Any, hay: Haystack, params: Any, seed: int, target: int = 8192) -> tuple[Any, BuiltSample]:
    draft = GENERATORS[params.task].draft(params, np.random.default_rng(seed), seed, (0.0, 0.8))
    built = build_sample(
        draft,
        hay,
        load_template("llama3", tok),
        target,
        "full_chat",
        "Answer from the document.",
        f"r{seed}",
        seed,
        {"steps": ["test@1"]},
        start_token=1000 * seed,
    )
    return draft, built


def body(draft: Any, built: BuiltSample) -> list[str]:
    """The context's non-blank lines, without the instruction and the first question."""
    ctx = built.chat.messages[built.chat.context_message]["content"]
    inner = ctx[len(draft.instruction) : len(ctx) - len(draft.queries[0].question)]
    return [ln for ln in inner.split("\n") if ln.strip()]


# --- readers written for this test ---------------------------------------------------------------------

NEEDLE = re.compile(r"^(?:The|One of the) special magic (number|word)s? for (\S+) is: (\S+)\.$")


def read_needles(lines: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for ln in lines:
        m = NEEDLE.match(ln)
        if m:
            found[m.group(2)].append(m.group(3))
    return found


def asked_key(question: str) -> str:
    words = question.split()
    return words[words.index("for") + 1]


def read_variables(lines: list[str], value: str) -> list[str]:
    bound: dict[str, str] = {}
    for ln in lines:
        parts = ln.split(" = ")
        if len(parts) == 2 and parts[0].startswith("VAR "):
            name, rhs = parts[0][4:], parts[1]
            if rhs.startswith("VAR "):
                if rhs[4:] in bound:
                    bound[name] = bound[rhs[4:]]
            elif rhs.isdigit():
                bound[name] = rhs
    return sorted(n for n, v in bound.items() if v == value)


def is_noise(line: str) -> bool:
    rest = line
    while rest:
        hit = next((s for s in NOISE if rest.startswith(s)), None)
        if hit is None:
            return False
        rest = rest[len(hit) :].lstrip()
    return True


@pytest.mark.parametrize("name", RULER_TASKS)
def test_every_ruler_task_is_answerable_by_an_independent_reader(tok, hay, tasks, name: str) -> None:  # type: ignore[no-untyped-def]
    params = tasks[name]
    for seed in (1, 2):
        draft, built = build(tok, hay, params, seed)
        assert built.record["length"] == 8192
        lines = body(draft, built)
        for q in draft.queries:
            if params.task == "multi_needle":
                found = read_needles(lines)
                got = found.get(asked_key(q.question), [])
                assert sorted(got) == sorted(q.expected)
                assert len(got) == params.values_per_key
                kinds = {"uuid": r"[0-9a-f-]{36}", "number": r"\d{7}", "word": r"[a-z]+(?:-[a-z]+)?"}
                assert all(re.fullmatch(kinds[params.value_kind], v) for v in got)
                assert re.fullmatch(kinds[params.key_kind], asked_key(q.question))
                needles = sum(1 for ln in lines if NEEDLE.match(ln))
                if params.haystack == "needles":  # RULER's multikey_2/3: nothing but needles
                    assert needles == len(lines) and len(found) > 50
                elif params.haystack == "noise":
                    assert all(is_noise(ln) for ln in lines if not NEEDLE.match(ln))
                else:  # essay haystack: mostly prose
                    assert needles < 0.05 * len(lines)
                    assert not any(is_noise(ln) for ln in lines)
            elif params.task == "variable_tracking":
                value = re.findall(r"\d+", q.question)[0]
                assert read_variables(lines, value) == sorted(q.expected)
                assert len(q.expected) == params.hops + 1
                assert all(is_noise(ln) or ln.startswith("VAR ") for ln in lines)
            elif params.task == "aggregation":
                entries = [ln.removeprefix("Logged item: ") for ln in lines if ln.startswith("Logged item: ")]
                assert len(entries) == len(lines)  # CWE: the context is the word list alone
                ranked = Counter(entries).most_common()
                k = params.top_k
                assert ranked[k - 1][1] > ranked[k][1]
                assert sorted(w for w, _ in ranked[:k]) == sorted(q.expected)
                assert ranked[0][1] == params.frequent_count and ranked[k][1] <= params.rare_count
            elif params.task == "frequent_words":
                words = " ".join(lines).split()
                assert all(re.fullmatch(r"[a-z]+", w) for w in words)
                ranked = Counter(words).most_common()
                k = params.top_k
                assert ranked[k - 1][1] > ranked[k][1]
                assert sorted(w for w, _ in ranked[:k]) == sorted(q.expected)
                # Zipf-like: frequencies fall with rank, the top word far ahead
                counts = [c for _, c in ranked]
                assert counts[0] > 2 * counts[1] and counts[1] > counts[2] and len(counts) > 30
            else:
                raise AssertionError(f"no reader for {params.task}")


def test_ruler_config_covers_the_suite_and_passes_preflight(tmp_path: Path) -> None:
    from pipeline.build import preflight

    cfg = ruler_config(tmp_path / "out")
    assert [t.label for t in cfg.procedural.tasks] == [*RULER_TASKS, "qa_1", "qa_2"]  # QA: test_ruler_qa.py
    preflight(cfg)


def test_existing_params_stay_as_they_were() -> None:
    from schemas.procedural import AggregationTask, MultiNeedleTask, VariableTrackingTask

    assert "haystack" not in MultiNeedleTask().params() and "key_kind" not in MultiNeedleTask().params()
    assert "haystack" not in VariableTrackingTask().params()
    assert "haystack" not in AggregationTask().params()
    with pytest.raises(ValueError, match="style: classic"):
        MultiNeedleTask(style="stealth", haystack="noise")
