"""Question answering over gold paragraphs hidden among distractor paragraphs (RULER's qa_1 / qa_2).

RULER (Hsieh et al. 2024) builds its QA tasks from SQuAD (one gold paragraph) and HotpotQA (several)
by surrounding an item's gold paragraphs with paragraphs of other items until the context is full.
Here the QA dataset is the user's: a JSONL file (optionally gzip) or a Hugging Face dataset with a
question, its acceptable answers and its gold context per row. Field shapes accepted: answers as a
string, a list of strings, or SQuAD's `{"text": [...]}`; context as a string, a list of paragraphs, or
HotpotQA's `{"sentences": [[...], ...]}` (each entry one paragraph). With `answers: any` (SQuAD/HotpotQA)
any listed answer is right; with `answers: all` every one is asked for (the bundled two-paragraph set).

The context is dense: gold paragraphs as evidence at spread depths, every other line a distractor
paragraph drawn from other rows (never one of the gold ones), one paragraph per line.
"""

from __future__ import annotations

import gzip
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.synth.procedural.base import Draft, Needle, Query, join_items, spread
from pipeline.synth.procedural.dense import Filler
from schemas.procedural import QATask

INSTRUCTION = (
    "Answer the question using the documents below, one document per paragraph. Only give the answer, "
    "no other words.\n\n"
)


class QAItem:
    __slots__ = ("answers", "context", "question")

    def __init__(self, question: str, answers: list[str], context: list[str]) -> None:
        self.question = question
        self.answers = answers
        self.context = context


def _one_line(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def _item(row: dict[str, Any], p: QATask, where: str) -> QAItem:
    def field(name: str) -> Any:
        if name not in row or row[name] is None:
            raise ValueError(
                f"{where}: no field {name!r} (set the task's {name!r} field name to the right column)"
            )
        return row[name]

    q = field(p.question_field)
    a = field(p.answers_field)
    c = field(p.context_field)
    if isinstance(a, dict):
        a = a.get("text")
    answers = [a] if isinstance(a, str) else a
    if isinstance(c, dict):
        c = [" ".join(s) if isinstance(s, list) else s for s in c.get("sentences", [])]
    context = [c] if isinstance(c, str) else c
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"{where}: {p.question_field!r} must be a non-empty string")
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(x, str) and x.strip() for x in answers)
    ):
        raise ValueError(f"{where}: {p.answers_field!r} must be a string or a non-empty list of strings")
    if (
        not isinstance(context, list)
        or not context
        or not all(isinstance(x, str) and x.strip() for x in context)
    ):
        raise ValueError(f"{where}: {p.context_field!r} must be a string or a non-empty list of strings")
    return QAItem(_one_line(q), [x.strip() for x in answers], [_one_line(x) for x in context])


@lru_cache(maxsize=8)
def _rows(path: str, dataset: str | None, split: str, mtime: float) -> tuple[tuple[str, dict[str, Any]], ...]:
    """(where, row) of every row; cached per file version, since every sample of the task reads them."""
    if dataset is not None:
        import datasets

        ds = datasets.load_dataset(dataset, split=split)
        return tuple((f"{dataset}[{split}] row {i}", dict(r)) for i, r in enumerate(ds))
    opener: Any = gzip.open if path.endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not a JSON object ({err})") from None
    return tuple(out)


def load_items(p: QATask) -> list[QAItem]:
    """The dataset's rows as QA items; a row missing a field is an error naming the row and field."""
    if p.dataset is not None:
        rows = _rows("", p.dataset, p.split, 0.0)
    else:
        assert p.path is not None
        path = Path(p.path)
        if not path.is_absolute():
            path = Path(p.base_dir or ".") / path
        if not path.is_file():
            raise ValueError(f"qa: dataset file {path} not found (paths are relative to the config file)")
        rows = _rows(str(path), None, p.split, path.stat().st_mtime)
    items = [_item(r, p, where) for where, r in rows]
    if len(items) < 2:
        raise ValueError("qa: the dataset needs at least two rows (others' paragraphs are the distractors)")
    return items


class QA:
    task = "qa"
    step = "qa@1"

    def draft(
        self, params: QATask, rng: np.random.Generator, index: int, depth_range: tuple[float, float]
    ) -> Draft:
        p = params
        items = load_items(p)
        k = int(rng.integers(len(items)))
        item = items[k]
        gold = list(dict.fromkeys(item.context))
        slots = spread(len(gold), depth_range, float(rng.random()))
        order = rng.permutation(len(gold)).tolist()
        needles = [Needle(g, slots[order[i]], "gold_paragraph") for i, g in enumerate(gold)]
        any_answer = p.answers == "any"
        query = Query(
            question=f"Question: {item.question}",
            answer=item.answers[0] if any_answer else join_items(item.answers),
            expected=list(item.answers),
            match="exact" if any_answer else "set",
            evidence=list(range(len(gold))),
        )
        excluded = set(gold)
        pool = [c for j, it in enumerate(items) if j != k for c in it.context if c not in excluded]
        pool = list(dict.fromkeys(pool))
        if not pool:
            raise ValueError("qa: no distractor paragraphs (every row shares the asked row's context)")

        def distractors(frng: np.random.Generator, n: int) -> list[str]:
            # without replacement while the dataset lasts, so a paragraph repeats only in very long contexts
            picks = (
                frng.permutation(len(pool))[:n].tolist()
                if n <= len(pool)
                else frng.integers(0, len(pool), size=n).tolist()
            )
            return [pool[i] for i in picks]

        draft = Draft(self.task, self.step, p.params(), INSTRUCTION, needles, [query], {"item": k})
        draft.filler = Filler("distractor_paragraphs", int(rng.integers(2**63)), distractors)
        return draft

    def solve(self, context: str, question: str, params: dict[str, Any]) -> list[str]:
        return []  # open QA has no rule-based reader; the tests check the bundled cloze set's answers
