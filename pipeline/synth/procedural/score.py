"""Grade a model's answers to the evaluation export: exact, set or ordered match per question.

Predictions are JSONL lines `{"eval_id": ..., "prediction": ...}` (`id` / `answer` are accepted too),
or the prediction files of RULER and of the lm-evaluation-harness for an export made by
`pipeline.synth.procedural.export` (see `read_predictions`).
Answers are compared after light normalisation (surrounding whitespace and punctuation, an "Answer:"
lead-in); set and ordered answers are split on commas, semicolons, line breaks, arrows and " and ".
Case is ignored only for answers made of plain words: hashes, ids, codes and variable names compare
case-sensitively (a case-swapped hash is a different hash).

Partial credit (`mean_score`) is per item and cannot be gamed: each expected item counts once however
often it is repeated, extra items lower the score, and items the question itself gives (a chain's
start hash) earn nothing. Set answers score matched / max(expected, predicted) with multiplicity;
ordered answers score the longest common subsequence (of first mentions) / max(expected, predicted),
so one wrong hop costs one item instead of everything after it.

Beside these strict scores the report carries RULER's metrics (Hsieh et al. 2024, "RULER: What's
the Real Context Size of Your Long-Context Language Models?"), named as such and in percent as RULER
publishes them: `ruler_string_match_all` (share of the reference answers found, case-insensitively,
as substrings of the free-text prediction) and `ruler_string_match_part` (1 if any is found).
Scores are reported per task, per target length and per depth bucket of the evidence.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

_LEAD = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:\-]?\s*", re.I)
_SPLIT = re.compile(r"\s*(?:,|;|\n|→|->|=>|\band\b)\s*", re.I)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_WORDS = re.compile(r"[a-z]+(?:[ '-][a-z]+)*")

# Tasks whose answers are identifiers (hashes, codes, numbers, variable names): compared with case.
CASE_SENSITIVE_TASKS = {"hash_chain", "multi_needle", "variable_tracking", "adversarial"}


def case_sensitive(task: str, expected: list[str]) -> bool:
    """Whether answers of this question compare with case.

    Known identifier tasks always do; for other tasks, any expected item that is not plain lowercase
    words (a capital or a digit in it: an id, a code, a hash) makes the question case-sensitive.
    """
    if task in CASE_SENSITIVE_TASKS:
        return True
    return not all(_WORDS.fullmatch(e.strip().strip(".")) for e in expected)


def normalize(s: str, keep_case: bool = False) -> str:
    s = _LEAD.sub("", s.strip())
    s = re.sub(r"\s+", " ", s).strip()
    if not keep_case:
        s = s.lower()
    return s.strip(" .,;:!?\"'`*()[]{}")


def items(s: str, keep_case: bool = False) -> list[str]:
    """The list a model wrote, as normalised items, in order."""
    s = _LEAD.sub("", s.strip())
    out = []
    for part in _SPLIT.split(s):
        part = normalize(_BULLET.sub("", part), keep_case)
        if part:
            out.append(part)
    return out


@dataclass(frozen=True)
class Grade:
    correct: bool
    score: float  # partial credit in [0, 1]
    ruler_all: float = 0.0  # RULER string_match_all for this question, in [0, 1]
    ruler_part: float = 0.0  # RULER string_match_part for this question, 0 or 1


def ruler_string_match(prediction: str, expected: list[str]) -> tuple[float, float]:
    """RULER's two metrics for one question: share of references found in the prediction, any found.

    As in RULER's evaluation: each reference, lowercased, is looked for as a substring of the
    lowercased prediction.
    """
    if not expected:
        return 0.0, 0.0
    pred = prediction.lower()
    found = [r.lower() in pred for r in expected]
    return sum(found) / len(expected), float(any(found))


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def grade(
    prediction: str | None, expected: list[str], match: str, question: str = "", task: str = ""
) -> Grade:
    """Grade one answer. exact: equals one of `expected`; set: the same items in any order, each once;
    ordered: the same items in the same order. `question` names items the model is given (they earn
    no partial credit); `task` decides case-sensitivity (see `case_sensitive`)."""
    if match not in ("exact", "set", "ordered"):
        raise ValueError(f"unknown match kind {match!r}; expected exact, set or ordered")
    if prediction is None:
        return Grade(False, 0.0)
    r_all, r_part = ruler_string_match(prediction, expected)
    keep = case_sensitive(task, expected)
    want = [normalize(e, keep) for e in expected]
    if match == "exact":
        got = normalize(prediction, keep)
        one = items(prediction, keep)
        ok = got in want or (len(one) == 1 and one[0] in want)
        return Grade(ok, 1.0 if ok else 0.0, r_all, r_part)
    got_items = items(prediction, keep)
    ok = sorted(got_items) == sorted(want) if match == "set" else got_items == want
    # items given in the question are neither credited nor counted as extras
    asked = normalize(question, keep) if question else ""
    given = {w for w in want if w and re.search(rf"(?<!\w){re.escape(w)}(?!\w)", asked)}
    w_rest = [w for w in want if w not in given]
    g_rest = [g for g in got_items if g not in given]
    if not w_rest:
        return Grade(ok, 1.0 if ok else 0.0, r_all, r_part)
    # set: multiset overlap (a repeated item matches once); ordered: longest common subsequence of
    # the items' first mentions (repeating items must not let the subsequence pick a better order)
    if match == "set":
        hit = sum((Counter(g_rest) & Counter(w_rest)).values())
    else:
        hit = _lcs(list(dict.fromkeys(g_rest)), w_rest)
    score = 1.0 if ok else hit / max(len(w_rest), len(g_rest))
    return Grade(ok, score, r_all, r_part)


@dataclass
class Bucket:
    n: int = 0
    correct: int = 0
    score: float = 0.0
    ruler_all: float = 0.0
    ruler_part: float = 0.0

    def add(self, g: Grade) -> None:
        self.n += 1
        self.correct += int(g.correct)
        self.score += g.score
        self.ruler_all += g.ruler_all
        self.ruler_part += g.ruler_part

    def as_dict(self) -> dict[str, Any]:
        """Strict accuracy and per-item mean score in [0, 1]; RULER's metrics in percent, as RULER reports them."""
        return {
            "n": self.n,
            "accuracy": round(self.correct / self.n, 4) if self.n else None,
            "mean_score": round(self.score / self.n, 4) if self.n else None,
            "ruler_string_match_all": round(100 * self.ruler_all / self.n, 2) if self.n else None,
            "ruler_string_match_part": round(100 * self.ruler_part / self.n, 2) if self.n else None,
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


def question_text(prompt: list[dict[str, Any]]) -> str:
    """The question of an eval prompt: its last message, after the context if the context is there
    (the context ends with a blank line, and questions hold none)."""
    return str(prompt[-1]["content"]).rsplit("\n\n", 1)[-1] if prompt else ""


def _depth_bucket(d: float) -> str:
    lo = min(int(d * 10), 9) / 10
    return f"{lo:.1f}-{lo + 0.1:.1f}"


def score_table(table: pa.Table, predictions: dict[str, str]) -> ScoreReport:
    """Grade every question of an EVAL_SCHEMA table against `predictions` (eval_id -> answer)."""
    rep = ScoreReport()
    cols = table.select(
        ["eval_id", "task", "prompt", "expected", "match", "depth", "target_length"]
    ).to_pylist()
    seen = set()
    for r in cols:
        seen.add(r["eval_id"])
        pred = predictions.get(r["eval_id"])
        if pred is None:
            rep.missing += 1
        g = grade(pred, r["expected"], r["match"], question_text(r["prompt"]), r["task"])
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


def _prediction_of(obj: dict[str, Any], index_ids: list[str] | None) -> tuple[str, str] | None:
    """(eval_id, answer) of one prediction line in any of the three formats; None if it is not one."""
    if "resps" in obj or "filtered_resps" in obj:  # lm-evaluation-harness --log_samples
        doc = obj.get("doc")
        key = doc.get("eval_id") if isinstance(doc, dict) else None
        resp = obj.get("filtered_resps") or obj.get("resps") or []
        while isinstance(resp, list):  # [[text]] (resps) or [text] (filtered_resps)
            resp = resp[0] if resp else ""
        return (key, resp) if isinstance(key, str) and isinstance(resp, str) else None
    if "pred" in obj:  # RULER's prediction JSONL
        key = obj.get("eval_id")
        if key is None and isinstance(obj.get("others"), dict):
            key = obj["others"].get("eval_id")
        idx = obj.get("index")
        if key is None and index_ids is not None and isinstance(idx, int) and 0 <= idx < len(index_ids):
            key = index_ids[idx]
        return (key, obj["pred"]) if isinstance(key, str) and isinstance(obj["pred"], str) else None
    key = obj.get("eval_id", obj.get("id"))
    val = obj.get("prediction", obj.get("answer"))
    return (key, val) if isinstance(key, str) and isinstance(val, str) else None


def _prediction_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    # a folder: RULER's per-task files, or lm-eval's output folder (samples_*.jsonl, per model subfolder)
    files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
    samples = [p for p in files if p.name.startswith("samples_")]
    if not files:
        raise FileNotFoundError(f"{path}: no .jsonl prediction files in this folder")
    return samples or files


def read_predictions(path: str | Path, table: pa.Table | None = None) -> dict[str, str]:
    """eval_id -> prediction from JSONL: Longloom's `{"eval_id", "prediction"}`, RULER's prediction rows
    (`pred`, with `eval_id` / `others.eval_id`, or `index` into the export's eval_id order when `table` is
    given) or lm-eval's `samples_*.jsonl` (`doc.eval_id`, `filtered_resps`, else `resps`). A folder is read
    whole. A malformed line is an error naming the file and line."""
    index_ids = sorted(table.column("eval_id").to_pylist()) if table is not None else None
    out: dict[str, str] = {}
    for f_path in _prediction_files(Path(path)):
        with open(f_path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{f_path}:{n}: not a JSON object ({err})") from None
                got = _prediction_of(obj, index_ids) if isinstance(obj, dict) else None
                if got is None:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise ValueError(
                        f'{f_path}:{n}: expected {{"eval_id": str, "prediction": str}}, a RULER prediction '
                        f"(pred with eval_id, others.eval_id or index) or an lm-eval sample (doc.eval_id, "
                        f"resps); got keys {keys}"
                    )
                out[got[0]] = got[1]
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
