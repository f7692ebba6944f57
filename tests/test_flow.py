"""Real Prefect flow runs (test harness), and the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.build import build, run, task_runner_for
from pipeline.build import run_build
from schemas.config import BuildConfig
from schemas.manifest import Manifest
from tests.conftest import ROOT, make_config, sample_dict
from tests.opskit import api_post


def shard_hashes(out: Path) -> dict[str, str]:
    m = Manifest.model_validate_json((out / "manifest.json").read_text())
    return {s.path: s.sha256 for t in m.targets for s in t.shards}


def test_flow_run_matches_the_library_run_byte_for_byte(
    tmp_path: Path, prefect_harness: None, sample_build: tuple[BuildConfig, Manifest]
) -> None:
    flow_cfg = make_config(tmp_path / "flow")
    result = run(flow_cfg)
    assert result["checks_ok"]
    lib_cfg, lib = sample_build  # the same config, built in-process by conftest in a folder of its own
    assert result["rows"] == {t.config_name: t.rows for t in lib.targets}
    flow_hashes, lib_hashes = shard_hashes(tmp_path / "flow"), shard_hashes(Path(lib_cfg.output.dir))
    assert flow_hashes == lib_hashes and flow_hashes


def test_flow_state_and_task_runs(tmp_path: Path, prefect_harness: None) -> None:
    import asyncio

    from prefect.client.orchestration import get_client

    cfg = make_config(tmp_path / "out")
    state = build.with_options(task_runner=task_runner_for(cfg))(cfg, return_state=True)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id

    async def task_names() -> list[str]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            return [r.name for r in runs]

    names = asyncio.run(task_names())
    # one prepare task per input shard (2 wiki files, books, bible, code repo), never one per document
    assert sum(n.startswith("prepare-shard") for n in names) == 5
    assert sum(n.startswith("write-shard") for n in names) == 2
    assert any(n.startswith("finalize") for n in names)


def test_rerun_reuses_verified_work_and_redoes_tampered_shards(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "out")
    first = run_build(cfg)
    shard = tmp_path / "out" / first.targets[0].shards[0].path
    before = shard.read_bytes()
    shard.write_bytes(before[:100])  # damage a finished shard
    again = run_build(cfg)
    assert shard.read_bytes() == before
    assert again.ok and shard_hashes(tmp_path / "out") == {
        s.path: s.sha256 for t in first.targets for s in t.shards
    }


def test_changed_packing_config_does_not_reuse_stale_rows(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_build(make_config(out))
    packing = sample_dict()["packing"] | {"targets": [{"length": 8192}]}
    m = run_build(make_config(out, packing=packing))
    assert [t.target_length for t in m.targets] == [8192]
    assert not (out / "data" / "pretrain_16384").exists()  # the old config's shards are gone
    assert m.ok


def test_cli_help_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("build", "validate", "schema"):
        assert command in out.stdout


def test_cli_build_without_prefect_and_config_errors(tmp_path: Path) -> None:
    cfg = sample_dict()
    cfg["output"]["dir"] = str(tmp_path / "out")
    for s in cfg["sources"]:
        s["paths"] = [str(ROOT / "data" / p) for p in s["paths"]]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "build", str(path), "--no-prefect"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "checks pass" in done.stdout and (tmp_path / "out" / "manifest.json").exists()
    cfg["packing"]["last_row"] = "maybe"
    path.write_text(yaml.safe_dump(cfg))
    bad = subprocess.run(
        [sys.executable, "-m", "flows.cli", "build", str(path)], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "packing.last_row" in bad.stderr and "'drop' or 'pad'" in bad.stderr


@pytest.mark.slow
def test_python_m_flows_build_runs_the_flow(tmp_path: Path, prefect_server: dict[str, str]) -> None:
    # against the session's Prefect API: without one, Prefect's ephemeral mode would use (and migrate)
    # the default ~/.prefect, which parallel test processes and other checkouts share
    cfg = sample_dict()
    cfg["output"]["dir"] = str(tmp_path / "out")
    cfg["packing"]["targets"] = [{"length": 32768}]
    for s in cfg["sources"]:
        s["paths"] = [str(ROOT / "data" / p) for p in s["paths"]]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runs = {"flows": {"name": {"any_": ["longloom-build"]}}}
    before = api_post(prefect_server, "/flow_runs/count", runs)
    done = subprocess.run(
        [sys.executable, "-m", "flows.build", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=prefect_server,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reconciliation" in done.stdout + done.stderr
    assert (tmp_path / "out" / "data" / "pretrain_32768").exists()
    assert api_post(prefect_server, "/flow_runs/count", runs) == before + 1  # the run is in that API
