"""Many-shot in-context learning: k labelled examples in the context, then the label of a held-out item.

The labelled dataset is the user's: a JSONL (optionally gzip) or Parquet file, or a Hugging Face dataset,
with a text and a label column. One row is held out and asked about; k examples are drawn from the other
rows, either in the dataset's label proportions (`balance: natural`) or as evenly over the labels as the
rows allow (`balance: balanced`), and laid out shuffled or grouped by label. Each example is a needle
labelled `example:<label>` in the sample's evidence, so the label balance and the example order (by token
position) are recorded with the sample; the rest of the context, if any, is the run's text.
"""

from __future__ import annotations

import gzip
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.synth.procedural.base import Draft, Needle, Query, spread
from schemas.procedural import ICLTask


def _one_line(s: str, limit: int) -> str:
    s = re.sub(r"\s+", " ", s).strip()
    if len(s) > limit:
        cut = s.rfind(" ", 0, limit)
        s = s[: cut if cut > limit // 2 else limit]
    return s


@lru_cache(maxsize=8)
def _rows(path: str, dataset: str | None, split: str, mtime: float) -> tuple[tuple[str, dict[str, Any]], ...]:
    """(where, row) for every row of the file or dataset; cached per file version."""
    if dataset is not None:
        import datasets

        ds = datasets.load_dataset(dataset, split=split)
        return tuple((f"{dataset}[{split}] row {i}", dict(r)) for i, r in enumerate(ds))
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return tuple((f"{path} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist()))
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


def load_labelled(p: ICLTask) -> list[tuple[str, str]]:
    """(text, label) of every row; a row without a usable text or label is an error naming it."""
    if p.dataset is not None:
        rows = _rows("", p.dataset, p.split, 0.0)
    else:
        assert p.path is not None
        path = Path(p.path)
        if not path.is_absolute():
            path = Path(p.base_dir or ".") / path
        if not path.is_file():
            raise ValueError(f"icl: dataset file {path} not found (paths are relative to the config file)")
        rows = _rows(str(path), None, p.split, path.stat().st_mtime)
    out = []
    for where, r in rows:
        text, label = r.get(p.text_field), r.get(p.label_field)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: {p.text_field!r} must be a non-empty string (set text_field)")
        if label is None or isinstance(label, (list, dict)) or not str(label).strip():
            raise ValueError(f"{where}: {p.label_field!r} must be a string or number (set label_field)")
        out.append((_one_line(text, p.max_example_chars), _one_line(str(label), 100)))
    if len({lab for _, lab in out}) < 2:
        raise ValueError("icl: the dataset needs at least two labels")
    if len(out) < p.shots + 1:
        raise ValueError(
            f"icl: {p.shots} shots and a held-out item need {p.shots + 1} rows, the dataset has {len(out)}"
        )
    return out


def _pick(p: ICLTask, rng: np.random.Generator, rows: list[tuple[str, str]], held: int) -> list[int]:
    rest = [i for i in range(len(rows)) if i != held and rows[i][0] != rows[held][0]]
    if len(rest) < p.shots:
        raise ValueError(f"icl: only {len(rest)} rows besides the held-out item; lower shots")
    if p.balance == "natural":
        return rng.choice(rest, size=p.shots, replace=False).tolist()
    by_label: dict[str, list[int]] = {}
    for i in rng.permutation(rest).tolist():
        by_label.setdefault(rows[i][1], []).append(i)
    picked: list[int] = []
    # round robin over the labels until k: as even as the rows of each label allow
    while len(picked) < p.shots:
        for lab in sorted(by_label):
            if by_label[lab] and len(picked) < p.shots:
                picked.append(by_label[lab].pop())
    return picked


class ManyShotICL:
    task = "icl"
    step = "icl@1"

    def draft(
        self, params: ICLTask, rng: np.random.Generator, index: int, depth_range: tuple[float, float]
    ) -> Draft:
        p = params
        rows = load_labelled(p)
        labels = sorted({lab for _, lab in rows})
        held = int(rng.integers(len(rows)))
        picked = _pick(p, rng, rows, held)
        if p.order == "grouped":
            picked = sorted(picked, key=lambda i: (rows[i][1], i))
        else:
            picked = [picked[i] for i in rng.permutation(len(picked)).tolist()]
        # examples in their order from the start of the depth range on (spread keeps that order)
        slots = spread(len(picked), depth_range, float(rng.random()))
        needles = [
            Needle(f"Input: {rows[i][0]} | Label: {rows[i][1]}", slots[j], f"example:{rows[i][1]}")
            for j, i in enumerate(picked)
        ]
        text, label = rows[held]
        query = Query(
            question=f"Input: {text}\nWhich label does this input have? Answer with one of: {', '.join(labels)}.",
            answer=label,
            expected=[label],
            match="exact",
            evidence=list(range(len(picked))),
        )
        instruction = (
            "Below are labelled examples, one per line as `Input: <text> | Label: <label>`. Learn the labelling "
            "from them; a new input to label follows.\n\n"
        )
        counts = {lab: sum(rows[i][1] == lab for i in picked) for lab in labels}
        return Draft(
            self.task, self.step, p.params(), instruction, needles, [query], {"label_counts": counts}
        )

    def solve(self, context: str, question: str, params: dict[str, Any]) -> list[str]:
        # an exact copy of the input among the examples is the only rule-based answer; the generator never
        # makes one (the held-out text is excluded), so there is nothing to read off
        m = re.match(r"Input: (.*)\n", question)
        if not m:
            return []
        return re.findall(rf"(?m)^Input: {re.escape(m.group(1))} \| Label: (.+)$", context)
