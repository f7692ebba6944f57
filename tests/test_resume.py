"""Crash-safe resume and reproducibility: real runs killed with SIGKILL, rerun, compared byte for byte.

Kill points come from the test-only LONGLOOM_FAULT hook (the process SIGKILLs itself at a named
point: mid-read, mid-select, mid-shard, before the manifest; the Prefect flow also between prepared
shards) and from outside at random times. Each resumed output must equal an uninterrupted run's:
every shard, audit table and README by sha256, and the manifest (which holds no timings).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.build import run_build
from tests.conftest import DATA, ROOT, make_config
from tests.opskit import (
    assert_readers_see_only_whole_files,
    base_env,
    kill_group,
    output_digest,
    run_cli,
    run_group,
    temporaries,
    write_config,
)

KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def reference(small_shard_reference: dict[str, Any]) -> dict[str, Any]:
    """An uninterrupted `longloom build --no-prefect` of the small-shard sample config (conftest: one per
    session, shared with test_dask), with the run's seconds."""
    digest = small_shard_reference
    assert sum(p.startswith("data/pretrain_") for p in digest["files"]) == 10  # 5 shards per target length
    assert any(p.startswith("data/procedural/") for p in digest["files"])  # the synthesis stage resumes too
    return digest


def test_two_runs_in_different_folders_are_byte_identical(tmp_path: Path, reference: dict[str, Any]) -> None:
    cfg = write_config(tmp_path / "elsewhere", tmp_path / "elsewhere" / "out")
    done = run_cli(["build", str(cfg), "--no-prefect"])
    assert done.returncode == 0, done.stderr[-3000:]
    again = output_digest(tmp_path / "elsewhere" / "out")
    assert again["files"] == reference["files"]  # shards, audit tables, README
    assert again["manifest"] == reference["manifest"]


def same_output(out: Path, reference: dict[str, Any]) -> bool:
    digest = output_digest(out)
    return digest["files"] == reference["files"] and digest["manifest"] == reference["manifest"]


def test_sigkill_at_every_stage_then_rerun_gives_the_uninterrupted_output(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out)
    # each rerun resumes from the previous kill and dies further on: one kill inside each stage that
    # leaves partial work (mid-read, mid-select, mid-shard) and one before the manifest. A kill right
    # after a unit's record ("prepared", "written") leaves a subset of what a kill inside the next unit
    # leaves (committed records, no temporaries); with those two points too, the sequence executed no
    # further line or branch of pipeline/ (coverage.py in branch mode, killed processes included:
    # 7056 lines and 9907 branches either way), so they went; the Prefect test below still kills
    # between prepared shards.
    faults = ["read:2", "layout:1", "write:3", "finalize:1"]
    saw_partial_shard = False
    for fault in faults:
        done = run_cli(["build", str(cfg), "--no-prefect"], fault=fault)
        assert done.returncode == KILLED, (
            f"{fault}: expected SIGKILL, got {done.returncode}: {done.stderr[-2000:]}"
        )
        assert_readers_see_only_whole_files(out)
        if fault.startswith("write:"):
            # killed inside a shard: its bytes so far exist only under a temporary name
            partial = [p for p in temporaries(out) if p.parent.parent.name == "data"]
            saw_partial_shard = bool(partial)
    assert saw_partial_shard
    assert not (out / "manifest.json").exists()  # never got that far
    done = run_cli(["build", str(cfg), "--no-prefect"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_output(out, reference)
    assert not temporaries(out)
    report = json.loads((out / "report.json").read_text())
    write = next(s for s in report["stages"] if s["stage"] == "write")
    assert write["units"] == write["reused"] == 10  # every shard verified and kept, none rewritten


def test_sigkill_from_outside_at_random_times(tmp_path: Path, reference: dict[str, Any]) -> None:
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out)
    rng = random.Random(7)
    kills: list[float] = []
    for _ in range(4):
        # anywhere from start-up to the end of an uninterrupted run (timed on this machine, now)
        delay = rng.uniform(0.3, 0.95) * reference["seconds"]
        p = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "build", str(cfg), "--no-prefect"],
            env=base_env(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay)
        if p.poll() is None:
            kill_group(p)
            kills.append(round(delay, 2))
        p.wait()
        assert_readers_see_only_whole_files(out)
    assert kills, "every run finished before its kill; the delays are too long for this machine"
    done = run_cli(["build", str(cfg), "--no-prefect"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_output(out, reference), f"killed after {kills} s"
    assert not temporaries(out)


@pytest.mark.slow
def test_prefect_flow_killed_then_rerun(
    tmp_path: Path, reference: dict[str, Any], prefect_server: dict[str, str]
) -> None:
    """The Prefect flow (threads, a real server) killed between shards, mid-shard and before finalizing."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out)
    cmd = [sys.executable, "-m", "flows.build", str(cfg)]
    for fault in ["prepared:3", "write:2", "finalize:1"]:
        done = run_group(cmd, {**prefect_server, "LONGLOOM_FAULT": fault})
        assert done.returncode == KILLED, f"{fault}: {done.returncode}: {done.stderr[-2000:]}"
        assert_readers_see_only_whole_files(out)
    done = run_group(cmd, prefect_server)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_output(out, reference)
    assert not temporaries(out)


def test_stale_temporaries_are_ignored_by_readers_and_cleared(tmp_path: Path) -> None:
    import pyarrow.dataset as ds

    out = tmp_path / "out"
    cfg = make_config(out)
    first = run_build(cfg)
    shard = out / first.targets[0].shards[0].path
    junk = [
        shard.parent / f".tmp-99999-{shard.name}",
        out / ".longloom" / ".tmp-1-lock",
        out / ".tmp-5-manifest.json",
    ]
    for j in junk:
        j.write_bytes(b"half a file")
    assert ds.dataset(shard.parent, format="parquet").count_rows() == first.targets[0].rows
    import datasets

    loaded = datasets.load_dataset(
        str(out), first.targets[0].config_name, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert loaded.num_rows == first.targets[0].rows  # the half file is not read as more rows
    again = run_build(cfg)
    assert again.ok and not any(j.exists() for j in junk)


def test_changed_inputs_are_read_again_not_reused(tmp_path: Path) -> None:
    """A grown input file, and a new one that shifts shard numbering, invalidate the records they touch."""
    corpus = tmp_path / "wiki"
    shutil.copytree(DATA / "sample" / "wiki", corpus)
    sources = [
        {"name": "wiki", "kind": "jsonl", "paths": [str(corpus / "*.jsonl.gz")], "id_field": "id"},
    ]
    cfg = make_config(tmp_path / "out", sources=sources)
    first = run_build(cfg)
    before = first.sources["wiki"].records_read
    # a new file that sorts first: old shard ids now point at other files
    import gzip

    lines = [json.dumps({"id": f"new-{i}", "text": f"A fresh document number {i}. " * 40}) for i in range(30)]
    with gzip.open(corpus / "0000-new.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    second = run_build(cfg)
    assert second.sources["wiki"].records_read == before + 30
    assert second.ok
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    prepare = next(s for s in report["stages"] if s["stage"] == "prepare")
    select = next(s for s in report["stages"] if s["stage"] == "select")
    assert prepare["units"] == 3 and prepare["reused"] == 0 and select["reused"] == 0
    # a rerun on unchanged inputs reuses everything and changes nothing
    third = run_build(cfg)
    assert third.model_dump() == second.model_dump()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all(s["units"] == s["reused"] for s in report["stages"] if s["stage"] != "finalize")


def test_intermediates_of_an_older_format_are_redone_not_reused(tmp_path: Path) -> None:
    """A prepare record from before the token files existed (no `format`, no `tokens` file) is redone."""
    cfg = make_config(tmp_path / "out")
    first = run_build(cfg)
    records = sorted((tmp_path / "out" / ".longloom").glob("prepare-*/done/*.json"))
    assert records
    for rec in records:  # what a prepare@1 record looked like: the same, minus the new format marker
        old = json.loads(rec.read_text())
        del old["format"]
        del old["files"]["tokens"], old["sha256"]["tokens"]
        rec.write_text(json.dumps(old))
    second = run_build(cfg)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    prepare = next(s for s in report["stages"] if s["stage"] == "prepare")
    assert prepare["units"] == len(records) and prepare["reused"] == 0
    assert second.model_dump() == first.model_dump()
