"""Export of the evaluation rows (issue 16.5): RULER JSONL and an lm-evaluation-harness task, and
`longloom score` reading predictions in either tool's format.

Round trip: export -> fake predictions written the way each tool writes them -> score; the report must
equal the report of the same predictions given in Longloom's own format.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.core.tokenizer import load_tokenizer
from pipeline.synth.chat import Haystack
from pipeline.synth.procedural.score import read_predictions, score_table
from schemas.procedural import AggregationTask, HashChainTask, MultiNeedleTask, VariableTrackingTask
from schemas.records import EVAL_SCHEMA
from tests.test_procedural import make, sample_docs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run output folder holding only an evaluation export of a few tasks (two with several questions)."""
    tok = load_tokenizer("quicktok:llama3")
    wiki = [t for k, t in sample_docs().items() if k.startswith("enwiki")][:400]
    hay = Haystack.from_documents(tok, wiki)
    rows: list[dict[str, Any]] = []
    for seed, (label, params) in enumerate(
        [
            ("hops", HashChainTask(chains=3, hops=3, queries=2)),
            ("niah_multivalue", MultiNeedleTask(style="classic", values_per_key=3)),
            ("vt", VariableTrackingTask(chains=2)),
            ("cwe", AggregationTask()),
        ]
    ):
        built = make(tok, hay, params, seed=seed, target=2048)[1]
        for r in built.eval_records:  # sample ids as the stage names them: <label>-<length>-<index>
            r["eval_id"] = r["eval_id"].replace(f"s{seed}/", f"{label}-2048-{seed:05d}/")
            r["sample_id"] = f"{label}-2048-{seed:05d}"
        rows += built.eval_records
    out = tmp_path_factory.mktemp("export") / "out"
    (out / "data" / "procedural_eval").mkdir(parents=True)
    # stored in an order other than eval_id order: the export must not depend on it
    table = pa.Table.from_pylist(rows[::-1], schema=EVAL_SCHEMA)
    pq.write_table(table, out / "data" / "procedural_eval" / "train-00000-of-00001.parquet")
    return out


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True
    )


def table_of(out: Path) -> pa.Table:
    return pq.read_table(out / "data" / "procedural_eval")


def fake_predictions(table: pa.Table) -> dict[str, str]:
    """Right, partly right, wrong, upper-cased and missing answers, decided by the row (no scorer code)."""
    preds: dict[str, str] = {}
    for i, r in enumerate(sorted(table.to_pylist(), key=lambda r: r["eval_id"])):
        exp = r["expected"]
        kind = i % 5
        if kind == 0:
            preds[r["eval_id"]] = "The answer is: " + ", ".join(exp)
        elif kind == 1:
            preds[r["eval_id"]] = ", ".join(exp[: max(1, len(exp) // 2)]) + ", bogus"
        elif kind == 2:
            preds[r["eval_id"]] = "I could not find it."
        elif kind == 3:
            preds[r["eval_id"]] = ", ".join(exp).upper()
        # kind 4: no prediction at all
    return preds


def read_jsonl(p: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]


def test_ruler_export_rows_and_round_trip(run_out: Path, tmp_path: Path) -> None:
    res = cli("export-eval", str(run_out), str(tmp_path / "ruler"), "--format", "ruler")
    assert res.returncode == 0, res.stderr
    table = table_of(run_out)
    by_id = {r["eval_id"]: r for r in table.to_pylist()}
    files = sorted((tmp_path / "ruler").glob("*/validation.jsonl"))
    assert [f.parent.name for f in files] == ["cwe", "hops", "niah_multivalue", "vt"]  # RULER's layout
    exported = [r for f in files for r in read_jsonl(f)]
    assert sorted(r["index"] for r in exported) == list(range(table.num_rows))
    for r in exported:
        src = by_id[r["eval_id"]]
        assert set(r) >= {"index", "input", "outputs", "length"}
        assert r["outputs"] == src["expected"] and r["length"] == src["prompt_tokens"]
        assert r["others"] == {"eval_id": r["eval_id"]}
        # the input ends with the question asked, and holds every user turn of the prompt
        assert r["input"].endswith(src["prompt"][-1]["content"])
        assert all(m["content"] in r["input"] for m in src["prompt"] if m["role"] == "user")
        assert r["system"] == "Answer from the document." and r["system"] not in r["input"]
    preds = fake_predictions(table)
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"eval_id": k, "prediction": v}) + "\n" for k, v in preds.items()))
    expected = score_table(table, read_predictions(own)).as_dict()
    assert expected["missing_predictions"] > 0 and 0 < expected["overall"]["accuracy"] < 1
    # RULER's prediction files: one per task, rows as call_api writes them (pred + the input row's fields)
    pred_dir = tmp_path / "ruler_pred"
    pred_dir.mkdir()
    for f in files:
        rows = [
            {k: r[k] for k in ("index", "input", "outputs", "others", "length")}
            | {"pred": preds[r["eval_id"]]}
            for r in read_jsonl(f)
            if r["eval_id"] in preds
        ]
        (pred_dir / f"{f.parent.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert score_table(table, read_predictions(pred_dir, table)).as_dict() == expected
    # without `others`: the global index alone names the row
    bare = tmp_path / "bare.jsonl"
    bare.write_text(
        "".join(
            json.dumps({"index": r["index"], "pred": preds[r["eval_id"]]}) + "\n"
            for r in exported
            if r["eval_id"] in preds
        )
    )
    assert score_table(table, read_predictions(bare, table)).as_dict() == expected
    res = cli("score", str(run_out), str(pred_dir))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == json.loads(json.dumps(expected))


def test_lm_eval_task_and_samples_round_trip(run_out: Path, tmp_path: Path) -> None:
    dest = tmp_path / "lm"
    res = cli("export-eval", str(run_out), str(dest), "--format", "lm-eval")
    assert res.returncode == 0, res.stderr
    table = table_of(run_out)

    class Loader(yaml.SafeLoader):
        pass

    def function(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[str, str]:
        assert isinstance(node, yaml.ScalarNode)
        return ("function", str(loader.construct_scalar(node)))

    Loader.add_constructor("!function", function)
    task = yaml.load((dest / "longloom_procedural_eval.yaml").read_text(), Loader=Loader)
    assert task["output_type"] == "generate_until" and task["dataset_path"] == "json"
    data = Path(task["dataset_kwargs"]["data_files"][task["test_split"]])
    assert data.is_file() and data.parent == dest.resolve()
    assert task["process_results"] == ("function", "utils.process_results")
    assert [m["metric"] for m in task["metric_list"]] == ["ruler_string_match_all", "ruler_string_match_part"]
    docs = read_jsonl(data)
    assert len(docs) == table.num_rows
    assert "{{input}}" in task["doc_to_text"] and all(d["input"] for d in docs)
    assert task["generation_kwargs"]["max_gen_toks"] >= max(len(d["answer"]) for d in docs)

    preds = fake_predictions(table)
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"eval_id": k, "prediction": v}) + "\n" for k, v in preds.items()))
    expected = score_table(table, read_predictions(own)).as_dict()
    # the harness's --log_samples file: the dataset row in `doc`, the model's text in resps/filtered_resps
    out = tmp_path / "lm_out" / "some__model"
    out.mkdir(parents=True)
    lines = []
    for i, d in enumerate(docs):
        if d["eval_id"] not in preds:
            continue
        p = preds[d["eval_id"]]
        lines.append(
            {
                "doc_id": i,
                "doc": d,
                "target": d["answer"],
                "arguments": {"gen_args_0": {"arg_0": d["input"], "arg_1": task["generation_kwargs"]}},
                "resps": [[p]],
                "filtered_resps": [p],
                "filter": "none",
                "metrics": ["ruler_string_match_all", "ruler_string_match_part"],
            }
        )
    samples = out / "samples_longloom_procedural_eval_2026-11-29T21-30-00.jsonl"
    samples.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    (out / "results_2026-11-29T21-30-00.json").write_text("{}")  # not a .jsonl: ignored
    assert score_table(table, read_predictions(tmp_path / "lm_out", table)).as_dict() == expected
    # the metric function the harness would call agrees with the scorer's RULER metrics, row by row
    spec = importlib.util.spec_from_file_location("lm_utils", dest / "utils.py")
    assert spec is not None and spec.loader is not None
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    rep = score_table(table, read_predictions(samples, table))
    for d in docs:
        if d["eval_id"] in preds:
            m = utils.process_results(d, [preds[d["eval_id"]]])
            g = rep.grades[d["eval_id"]]
            assert m["ruler_string_match_all"] == pytest.approx(g.ruler_all)
            assert m["ruler_string_match_part"] == g.ruler_part


def test_bad_prediction_lines_name_the_file_and_line(run_out: Path, tmp_path: Path) -> None:
    table = table_of(run_out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0, "pred": "x"}\n{"pred": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*RULER prediction"):
        read_predictions(bad, table)
    res = cli("export-eval", str(tmp_path / "nowhere"), "--format", "ruler")
    assert res.returncode == 2 and "no evaluation export" in res.stderr
