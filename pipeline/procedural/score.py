"""Grade a model's answers to the evaluation export: exact, set or ordered match per question.

Predictions are JSONL lines `{"eval_id": ..., "prediction": ...}` (`id` / `answer` are accepted too).
Answers are compared after light normalisation (case, surrounding whitespace and punctuation, an
"Answer:" lead-in); set and ordered answers are split on commas, semicolons, line breaks, arrows and
" and ". Scores are reported per task, per target length and per depth bucket of the evidence.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

_LEAD = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:\-]?\s*", re.I)
_SPLIT = re.compile(r"\s*(?:,|;|\n|→|->|=>|\band\b)\s*", re.I)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


def normalize(s: str) -> str:
    s = _LEAD.sub("", s.strip())
    s = re.sub(r"\s+", " ", s).strip().lower()
    return s.strip(" .,;:!?\"'`*()[]{}")


def items(s: str) -> list[str]:
    """The list a model wrote, as normalised items, in order."""
    s = _LEAD.sub("", s.strip())
    out = []
    for part in _SPLIT.split(s):
        part = normalize(_BULLET.sub("", part))
        if part:
            out.append(part)
    return out


@dataclass(frozen=True)
class Grade:
    correct: bool
    score: float  # partial credit in [0, 1]


def grade(prediction: str | None, expected: list[str], match: str) -> Grade:
    """Grade one answer. exact: equals one of `expected`; set: the same items in any order; ordered:
    the same items in the same order. Partial credit: set -> overlap / max(sizes), ordered -> matching
    leading items / expected length."""
    if prediction is None:
        return Grade(False, 0.0)
    want = [normalize(e) for e in expected]
    if match == "exact":
        got = normalize(prediction)
        ok = got in want or (len(items(prediction)) == 1 and items(prediction)[0] in want)
        return Grade(ok, 1.0 if ok else 0.0)
    got_items = items(prediction)
    if match == "set":
        g, w = set(got_items), set(want)
        ok = g == w and len(got_items) == len(g)
        return Grade(ok, len(g & w) / max(len(g), len(w), 1))
    if match == "ordered":
        prefix = 0
        for a, b in zip(got_items, want, strict=False):
            if a != b:
                break
            prefix += 1
        ok = got_items == want
        return Grade(ok, prefix / max(len(want), 1) if not ok else 1.0)
    raise ValueError(f"unknown match kind {match!r}; expected exact, set or ordered")


@dataclass
class Bucket:
    n: int = 0
    correct: int = 0
    score: float = 0.0

    def add(self, g: Grade) -> None:
        self.n += 1
        self.correct += int(g.correct)
        self.score += g.score

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": round(self.correct / self.n, 4) if self.n else None,
            "mean_score": round(self.score / self.n, 4) if self.n else None,
        }


@dataclass
class ScoreReport:
    overall: Bucket = field(default_factory=Bucket)
    by_task: dict[str, Bucket] = field(default_factory=lambda: defaultdict(Bucket))
    by_length: dict[int, Bucket] = field(default_factory=lambda: defaultdict(Bucket))
    by_depth: dict[str, Bucket] = field(default_factory=lambda: defaultdict(Bucket))
    missing: int = 0  # questions without a prediction (graded wrong)
    unknown: int = 0  # predictions for ids not in the export (ignored)
    grades: dict[str, Grade] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.as_dict(),
            "by_task": {k: v.as_dict() for k, v in sorted(self.by_task.items())},
            "by_target_length": {str(k): v.as_dict() for k, v in sorted(self.by_length.items())},
            "by_depth": {k: v.as_dict() for k, v in sorted(self.by_depth.items())},
            "missing_predictions": self.missing,
            "unknown_predictions": self.unknown,
        }


def _depth_bucket(d: float) -> str:
    lo = min(int(d * 10), 9) / 10
    return f"{lo:.1f}-{lo + 0.1:.1f}"


def score_table(table: pa.Table, predictions: dict[str, str]) -> ScoreReport:
    """Grade every question of an EVAL_SCHEMA table against `predictions` (eval_id -> answer)."""
    rep = ScoreReport()
    cols = table.select(["eval_id", "task", "expected", "match", "depth", "target_length"]).to_pylist()
    seen = set()
    for r in cols:
        seen.add(r["eval_id"])
        pred = predictions.get(r["eval_id"])
        if pred is None:
            rep.missing += 1
        g = grade(pred, r["expected"], r["match"])
        rep.grades[r["eval_id"]] = g
        for b in (
            rep.overall,
            rep.by_task[r["task"]],
            rep.by_length[int(r["target_length"])],
            rep.by_depth[_depth_bucket(float(r["depth"]))],
        ):
            b.add(g)
    rep.unknown = sum(1 for k in predictions if k not in seen)
    return rep


def read_predictions(path: str | Path) -> dict[str, str]:
    """eval_id -> prediction from a JSONL file; a malformed line is an error naming the line."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                key = obj.get("eval_id", obj.get("id"))
                val = obj.get("prediction", obj.get("answer"))
            except (json.JSONDecodeError, AttributeError) as err:
                raise ValueError(f"{path}:{n}: not a JSON object ({err})") from None
            if not isinstance(key, str) or not isinstance(val, str):
                raise ValueError(
                    f'{path}:{n}: expected {{"eval_id": str, "prediction": str}}, got keys {sorted(obj)}'
                )
            out[key] = val
    return out


def load_eval(source: str | Path, config: str = "procedural_eval") -> pa.Table:
    """The evaluation export: a Longloom output folder (its `config` folder) or Parquet file(s)."""
    p = Path(source)
    if p.is_dir() and (p / "data" / config).is_dir():
        p = p / "data" / config
    if not p.exists():
        raise FileNotFoundError(f"{source}: no evaluation export here (looked for data/{config}/)")
    return ds.dataset(str(p), format="parquet").to_table()


def reference_predictions(table: pa.Table) -> dict[str, str]:
    """The reference answers as predictions (what a perfect model would write)."""
    return {
        r["eval_id"]: ", ".join(r["expected"]) if r["match"] != "ordered" else " → ".join(r["expected"])
        for r in table.select(["eval_id", "expected", "match"]).to_pylist()
    }
