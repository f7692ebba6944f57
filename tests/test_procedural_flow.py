"""The procedural stage inside real builds: the Prefect flow, the library path, reruns, lineage, loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from flows.build import run
from pipeline.build import run_build
from pipeline.core.tokenizer import load_tokenizer
from schemas.config import BuildConfig
from schemas.manifest import Manifest
from tests.conftest import ROOT, make_config
from tests.test_procedural import sample_docs

PROCEDURAL = {
    "enabled": True,
    "target_lengths": [4096, 20000],
    "samples_per_batch": 3,
    "tasks": [
        {"task": "hash_chain", "samples": 2, "queries": 2},
        {"task": "multi_needle", "samples": 2, "num_keys": 3, "values_per_key": 2},
        {"task": "variable_tracking", "samples": 1},
        {"task": "aggregation", "samples": 1},
    ],
}


def config(out: Path, **over: Any) -> BuildConfig:
    return make_config(out, procedural={**PROCEDURAL, **over})


def procedural_files(out: Path) -> dict[str, str]:
    m = Manifest.model_validate_json((out / "manifest.json").read_text())
    return {f.path: f.sha256 for files in m.extra_configs.values() for f in files}


@pytest.fixture(scope="module")
def library_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("proc") / "out"
    return out, run_build(config(out))


def test_flow_run_with_procedural_reconciles(tmp_path: Path, prefect_harness: None, library_run) -> None:  # type: ignore[no-untyped-def]
    result = run(config(tmp_path / "flow"))
    assert result["checks_ok"]
    m = Manifest.model_validate_json((tmp_path / "flow" / "manifest.json").read_text())
    proc = m.extra["procedural"]
    assert proc["ok"], proc["checks"]
    assert proc["samples"] == 2 * (2 + 2 + 1 + 1) and proc["questions"] == 2 * (2 * 2 + 2 + 1 + 1)
    assert set(m.extra_configs) == {"procedural", "procedural_eval"} and "procedural" in m.stages
    # the flow (batches as parallel tasks) makes byte-identical files to the in-process library run
    assert procedural_files(tmp_path / "flow") == procedural_files(library_run[0])


def test_library_run_outputs_and_distance_report(library_run) -> None:  # type: ignore[no-untyped-def]
    out, m = library_run
    proc = m.extra["procedural"]
    assert m.ok and proc["ok"]
    # the stage's own reconciliation is part of the manifest's checks (and of `checks_ok`)
    assert sum(c.name.startswith("procedural:") for c in m.checks) == len(proc["checks"]) == 5
    chat = ds.dataset(str(out / "data" / "procedural"), format="parquet").to_table()
    assert chat.num_rows == proc["samples"] == 12
    lengths = dict(zip(chat.column("sample_id").to_pylist(), chat.column("length").to_pylist(), strict=True))
    for sid, n in lengths.items():
        assert n == int(sid.split("-")[-2])
    ids = chat.column("input_ids").to_pylist()
    assert [len(x) for x in ids] == chat.column("target_length").to_pylist()
    for label in ("hash_chain", "multi_needle", "variable_tracking", "aggregation"):
        t = proc["tasks"][label]
        d = t["dependency_distance_tokens"]
        assert d["min"] > 0 and d["max"] < 20000 and sum(t["dependency_distance_histogram"]) == t["questions"]
    # the README lists the configs, and `datasets` loads each of them by name
    import datasets

    got = datasets.load_dataset(str(out), "procedural", split="train")
    ev = datasets.load_dataset(str(out), "procedural_eval", split="train")
    assert got.num_rows == 12 and ev.num_rows == proc["questions"]
    assert {"prompt", "expected", "task", "depth", "target_length"} <= set(ev.column_names)
    assert ev[0]["prompt"][-1]["role"] == "user"


def test_haystack_lineage_points_at_the_source_text(library_run) -> None:  # type: ignore[no-untyped-def]
    out, _ = library_run
    tok = load_tokenizer("fastokens:llama3")  # the sample config's tokenizer
    docs = sample_docs()
    chat = ds.dataset(str(out / "data" / "procedural"), format="parquet").to_table()
    rows = pq.read_table(next((out / "data").glob("pretrain_*/*.parquet")), columns=["row_id"]).column(
        "row_id"
    )
    checked = 0
    for r in chat.select(["input_ids", "haystack", "haystack_rows", "lineage"]).to_pylist():
        ids = np.asarray(r["input_ids"])
        assert r["haystack_rows"] and all(x.startswith("pretrain_") for x in r["haystack_rows"])
        assert r["lineage"]["steps"][-3:][0] == "procedural@1"
        for seg in r["haystack"]:
            if seg["doc_id"] not in docs:  # the code repository is one synthetic document
                continue
            src = docs[seg["doc_id"]][seg["char_start"] : seg["char_end"]]
            assert docs[seg["doc_id"]].encode()[seg["byte_start"] : seg["byte_end"]].decode() == src
            # the sample's tokens at the recorded span hold exactly that text
            got = tok.decode(ids[seg["row_token_start"] : seg["row_token_end"]])
            assert src in got and len(got) - len(src) <= 2
            checked += 1
    assert checked > 20 and len(rows) > 0


def test_rerun_reuses_and_repairs_procedural_files(library_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    first = run_build(config(out))
    files = procedural_files(out)
    assert files == procedural_files(library_run[0])
    victim = out / sorted(files)[0]
    victim.write_bytes(victim.read_bytes()[:50])
    again = run_build(config(out))
    assert again.ok and again.extra["procedural"]["ok"] and procedural_files(out) == files
    # a changed procedural section replaces the synthesized files instead of mixing them
    changed = run_build(config(out, target_lengths=[4096], eval_config_name=None))
    assert set(changed.extra_configs) == {"procedural"}
    assert not (out / "data" / "procedural_eval").exists()
    assert first.extra["procedural"]["samples"] == 12 and changed.extra["procedural"]["samples"] == 6


def test_score_command_grades_the_export(library_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out, _ = library_run
    ev = ds.dataset(str(out / "data" / "procedural_eval"), format="parquet").to_table().to_pylist()
    preds = tmp_path / "preds.jsonl"
    with open(preds, "w") as f:
        for i, r in enumerate(ev):
            right = (" → " if r["match"] == "ordered" else ", ").join(r["expected"])
            f.write(
                json.dumps({"eval_id": r["eval_id"], "prediction": right if i % 2 == 0 else "no idea"}) + "\n"
            )
    cmd = [sys.executable, "-m", "flows.cli", "score", str(out), str(preds)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads(res.stdout)
    assert report["overall"]["n"] == len(ev) and report["overall"]["accuracy"] == pytest.approx(
        sum(1 for i in range(len(ev)) if i % 2 == 0) / len(ev)
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"eval_id": "x"}\n')
    res = subprocess.run([*cmd[:-1], str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "bad.jsonl:1" in res.stderr


def test_haystack_reuses_row_ids_exactly(library_run) -> None:  # type: ignore[no-untyped-def]
    from pipeline.synth.chat import Haystack

    out, _ = library_run
    tok = load_tokenizer("fastokens:llama3")  # the sample config's tokenizer
    for f in sorted((out / "data").glob("pretrain_*/*.parquet")):
        rows = pq.read_table(f, columns=["row_id", "input_ids", "segments"]).to_pylist()
        for limit in (None, 3000, 40_000):
            h = Haystack.from_rows(tok, rows, max_tokens=limit)
            assert h.reused_ids and np.array_equal(h.ids, tok.encode(h.text))


def test_wrong_reused_ids_fall_back_to_a_full_tokenization(
    library_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import pipeline.synth.chat.haystack as chat

    real = chat._reuse_row_ids

    def broken(*args: Any, **kw: Any) -> np.ndarray:
        ids = real(*args, **kw)
        ids[len(ids) // 3 : len(ids) // 3 + 5] = 15339  # five wrong tokens a third of the way in
        return ids

    monkeypatch.setattr(chat, "_reuse_row_ids", broken)
    m = run_build(
        config(tmp_path / "out", target_lengths=[4096], tasks=[{"task": "hash_chain", "samples": 2}])
    )
    assert m.ok
    assert m.extra["procedural"]["target_lengths"]["4096"]["retokenized_haystacks"] >= 1
    assert procedural_files(tmp_path / "out")  # written, and checked against the text by finalize
