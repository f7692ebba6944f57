"""RULER's qa_1 / qa_2 (issue 16.2): gold paragraphs among distractor paragraphs, checked by a reader here.

The reader loads the bundled QA file itself, turns each cloze question back into a pattern (the blank
becomes a capture) and searches the context's lines: exactly one line per blank must hold the sentence,
its capture must be the expected answer, and every other line must be another row's paragraph.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.tokenizer import load_tokenizer
from pipeline.stages.procedural import bound_task
from pipeline.synth.chat import Haystack
from schemas.procedural import QATask
from tests.conftest import DATA
from tests.test_procedural import sample_docs
from tests.test_ruler import body, build, ruler_config


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return load_tokenizer("quicktok:llama3")


@pytest.fixture(scope="module")
def hay(tok):  # type: ignore[no-untyped-def]
    return Haystack.from_documents(tok, [t for k, t in sample_docs().items() if k.startswith("enwiki")][:50])


def read_file(name: str) -> list[dict[str, Any]]:
    with gzip.open(DATA / "qa" / name, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def blanks(question: str) -> list[re.Pattern[str]]:
    """One pattern per quoted cloze sentence of the question, the blank as a capture."""
    sentences = re.findall(r'fills the blank in: "(.+?)"(?:\?|;)', question)
    return [re.compile(re.escape(s).replace("____", r"(\S+?)") + r"(?=\s|$)") for s in sentences]


@pytest.mark.parametrize(("name", "gold"), [("qa_1", 1), ("qa_2", 2)])
def test_qa_answers_found_by_an_independent_reader(tok, hay, tmp_path: Path, name: str, gold: int) -> None:  # type: ignore[no-untyped-def]
    cfg = ruler_config(tmp_path / "out")
    task = bound_task(cfg, next(t for t in cfg.procedural.tasks if t.label == name))
    rows = read_file(Path(task.path).name)
    paragraphs = {
        " ".join(p.split())  # one paragraph per line, runs of whitespace as one space
        for r in rows
        for p in ([r["context"]] if isinstance(r["context"], str) else r["context"])
    }
    for seed in (1, 2, 3):
        draft, built = build(tok, hay, task, seed, target=8192)
        assert built.record["length"] == 8192
        q = draft.queries[0]
        lines = body(draft, built)
        pats = blanks(q.question)
        assert len(pats) == gold
        found = []
        gold_lines = set()
        for pat in pats:
            hits = [(i, m.group(1)) for i, ln in enumerate(lines) if (m := pat.search(ln))]
            assert len(hits) == 1, f"{len(hits)} lines hold the sentence"
            gold_lines.add(hits[0][0])
            found.append(hits[0][1].rstrip(".,;:"))
        assert found == q.expected
        # the rest: whole paragraphs of other rows, many of them (the context is full of distractors)
        others = [ln for i, ln in enumerate(lines) if i not in gold_lines]
        assert len(others) > 20 and all(ln in paragraphs for ln in others)
        assert all(not any(p.search(ln) for p in pats) for ln in others)
        assert [e["label"] for e in built.record["evidence"]] == ["gold_paragraph"] * gold


def test_qa_reads_a_hugging_face_dataset_with_squad_and_hotpot_shapes(tok, hay, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = read_file("wiki_cloze_qa1.jsonl.gz")[:60]
    folder = tmp_path / "hfqa"
    folder.mkdir()
    table = pa.table(
        {
            "q": [r["question"] for r in rows],
            "ans": [
                {"text": r["answers"], "answer_start": [r["context"].find(r["answers"][0])]} for r in rows
            ],
            "ctx": [{"title": [r["title"]], "sentences": [[r["context"]]]} for r in rows],
        }
    )
    pq.write_table(table, folder / "train.parquet")
    task = QATask(dataset=str(folder), question_field="q", answers_field="ans", context_field="ctx")
    draft, built = build(tok, hay, task, 4, target=4096)
    q = draft.queries[0]
    (pat,) = blanks(q.question)
    hits = [m.group(1) for ln in body(draft, built) if (m := pat.search(ln))]
    assert len(hits) == 1 and hits[0].rstrip(".,;:") == q.expected[0]


def test_bad_qa_rows_name_the_row_and_field(tok, hay, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"question": "q?", "answers": ["a"], "context": "c one"})
        + "\n"
        + json.dumps({"question": "q2?", "context": "c two"})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no field 'answers'"):
        build(tok, hay, QATask(path=str(bad)), 1, target=2048)
    with pytest.raises(ValueError, match="exactly one of"):
        QATask()
    assert "base_dir" not in QATask(path="x.jsonl", base_dir="/somewhere").params()
