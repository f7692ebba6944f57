"""Export the evaluation rows for tools users already have: RULER's JSONL and an lm-evaluation-harness task.

RULER (Hsieh et al. 2024) reads one `validation.jsonl` per task with `index`, `input`, `outputs` (the
reference answers) and `length` (prompt tokens); its prediction files repeat those fields and add `pred`.
The lm-evaluation-harness (EleutherAI) reads a task YAML; here a `generate_until` task over a local JSON
dataset, graded by RULER's two string-match metrics in a small `utils.py` written next to it. Its
`--log_samples` output (`samples_<task>_<date>.jsonl`) carries each row back in `doc`, with the model's
text in `resps` / `filtered_resps`.

Rows are exported in `eval_id` order and `index` counts over the whole export, so an index alone names
a row; each row also carries `eval_id` (and `others.eval_id`, the field RULER copies into its prediction
files) so `longloom score` maps predictions of either tool back to the evaluation rows.

A multi-turn question (a later question of a sample) becomes one text: the turns before it, each on its
own paragraph, as the chat had them. The system prompt is a field of its own (`system`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

Format = Literal["ruler", "lm-eval"]


def task_label(sample_id: str) -> str:
    """The config entry's label (e.g. niah_single_1) from a sample id `<label>-<length>-<index>`."""
    parts = sample_id.rsplit("-", 2)
    return parts[0] if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() else sample_id


def reference_text(expected: list[str], match: str) -> str:
    return (" → " if match == "ordered" else ", ").join(expected)


def export_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The evaluation rows in RULER's form (plus Longloom's fields), in eval_id order."""
    cols = ["eval_id", "sample_id", "task", "prompt", "expected", "match", "depth", "target_length"]
    cols.append("prompt_tokens")
    rows = sorted(table.select(cols).to_pylist(), key=lambda r: r["eval_id"])
    out = []
    for i, r in enumerate(rows):
        msgs = r["prompt"]
        system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
        text = "\n\n".join(m["content"] for m in msgs if m["role"] != "system")
        out.append(
            {
                "index": i,
                "input": text,
                "outputs": list(r["expected"]),
                "length": int(r["prompt_tokens"]),
                "answer_prefix": "",
                "others": {"eval_id": r["eval_id"]},
                "eval_id": r["eval_id"],
                "task": task_label(r["sample_id"]),
                "generator_task": r["task"],
                "match": r["match"],
                "answer": reference_text(list(r["expected"]), r["match"]),
                "system": system,
                "target_length": int(r["target_length"]),
                "depth": round(float(r["depth"]), 4),
            }
        )
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


# What lm-eval imports through `process_results: !function utils.process_results`. Written for Longloom;
# RULER's metrics: each reference, lowercased, looked for as a substring of the lowercased answer.
LM_EVAL_UTILS = '''"""RULER's string-match metrics for the Longloom export (written by `longloom export-eval`)."""


def process_results(doc, results):
    pred = (results[0] if results else "").lower()
    refs = [r.lower() for r in doc["outputs"]]
    found = [r in pred for r in refs]
    return {
        "ruler_string_match_all": sum(found) / len(refs) if refs else 0.0,
        "ruler_string_match_part": float(any(found)),
    }
'''


def lm_eval_yaml(name: str, data_file: Path, max_gen_toks: int) -> str:
    """The task YAML. Written as text: `!function` is a tag of lm-eval's own YAML loader."""
    data = json.dumps(str(data_file))
    return (
        f"# lm-evaluation-harness task for a Longloom evaluation export (`longloom export-eval`).\n"
        f"# Run: lm_eval --model ... --tasks {name} --include_path <this folder> --log_samples "
        f"--output_path <dir>\n"
        f"# then: longloom score <run output> <dir>  (reads the samples_{name}_*.jsonl files)\n"
        f"task: {name}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n"
        f"  data_files:\n"
        f"    test: {data}\n"
        f"test_split: test\n"
        f"output_type: generate_until\n"
        f'doc_to_text: "{{{{input}}}}"\n'
        f'doc_to_target: "{{{{answer}}}}"\n'
        f"process_results: !function utils.process_results\n"
        f"generation_kwargs:\n"
        f"  until: []\n"
        f"  max_gen_toks: {max_gen_toks}\n"
        f"  do_sample: false\n"
        f"  temperature: 0.0\n"
        f"metric_list:\n"
        f"  - metric: ruler_string_match_all\n"
        f"    aggregation: mean\n"
        f"    higher_is_better: true\n"
        f"  - metric: ruler_string_match_part\n"
        f"    aggregation: mean\n"
        f"    higher_is_better: true\n"
        f"metadata:\n"
        f"  version: 1.0\n"
    )


def export_eval(table: pa.Table, dest: str | Path, fmt: Format, name: str = "longloom_eval") -> list[Path]:
    """Write the export; returns the files written.

    ruler: `<dest>/<task>/validation.jsonl` per config entry (RULER's layout); lm-eval: `<dest>/<name>.yaml`,
    `<dest>/<name>.jsonl` and `<dest>/utils.py`.
    """
    dest = Path(dest)
    rows = export_rows(table)
    if not rows:
        raise ValueError("the evaluation export has no rows; nothing to export")
    written: list[Path] = []
    if fmt == "ruler":
        by_task: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_task.setdefault(r["task"], []).append(r)
        for task, rs in sorted(by_task.items()):
            p = dest / task / "validation.jsonl"
            _write_jsonl(p, rs)
            written.append(p)
    elif fmt == "lm-eval":
        data = dest / f"{name}.jsonl"
        _write_jsonl(data, rows)
        # a token holds at least one character: the longest reference in characters, plus a lead-in
        longest = max(len(r["answer"]) for r in rows) + 32
        (dest / "utils.py").write_text(LM_EVAL_UTILS, encoding="utf-8")
        y = dest / f"{name}.yaml"
        y.write_text(lm_eval_yaml(name, data.resolve(), max(64, longest)), encoding="utf-8")
        written += [y, data, dest / "utils.py"]
    else:
        raise ValueError(f"unknown export format {fmt!r}; expected ruler or lm-eval")
    return written
