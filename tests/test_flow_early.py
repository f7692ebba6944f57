"""Prefect's fixed cost in `longloom build` (issue 19): the first stage's units start before Prefect is
imported, and the command's exit skips the interpreter's last full garbage collection.

Real command lines against the session's Prefect server: a small bootstrap runs `flows.cli.main` with
every stage unit's start and end recorded (time, thread, whether `flows.build` was imported yet), then
the flow run is read back through the API: its task runs, their states and run counts, its logs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.opskit import api_post, base_env, write_config

# `flows.cli.main(argv)` with each unit's start/end recorded to $UNIT_LOG; $FAIL_EARLY names a unit
# that fails when an early thread (not a task run) runs it
BOOT = r"""
import json, os, sys, threading, time
events = []
import flows.cli
from pipeline.stages.plan import STAGES
def wrap(cls):
    bind = cls.bind
    def bound(self, ctx, inputs):
        job = bind(self, ctx, inputs)
        run = job.run_unit
        def run_unit(unit, progress=None):
            label, thread = job.label(unit), threading.current_thread().name
            events.append({"stage": self.name, "unit": label, "thread": thread, "t": time.time(),
                           "flows_build_imported": "flows.build" in sys.modules})
            if label == os.environ.get("FAIL_EARLY") and thread.startswith("longloom-early"):
                raise RuntimeError("planted failure of an early unit")
            return run(unit, progress)
        job.run_unit = run_unit
        return job
    cls.bind = bound
for s in STAGES:
    if "bind" in type(s).__dict__:
        wrap(type(s))
try:
    code = flows.cli.main(sys.argv[1:])
finally:
    with open(os.environ["UNIT_LOG"], "w") as fh:
        json.dump(events, fh)
sys.exit(code)
"""


def build(
    tmp_path: Path, env: dict[str, str], **overrides: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run `longloom build` through the bootstrap; (unit events, its flow run as the API has it)."""
    config = write_config(tmp_path, tmp_path / "out", **overrides)
    log = tmp_path / "units.json"
    run_env = base_env(
        **{k: v for k, v in env.items() if k.startswith(("PREFECT_", "FAIL_"))}, UNIT_LOG=str(log)
    )
    res = subprocess.run(
        [sys.executable, "-c", BOOT, "build", str(config)],
        env=run_env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    runs = api_post(env, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 50})
    mine = [
        r
        for r in runs
        if r["parameters"].get("config", {}).get("output", {}).get("dir") == str(tmp_path / "out")
    ]
    assert len(mine) == 1, "one flow run per build"
    return json.loads(log.read_text()), mine[0]


def task_runs(env: dict[str, str], flow_run_id: str) -> list[dict[str, Any]]:
    return list(api_post(env, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}}))


def logs(env: dict[str, str], flow_run_id: str) -> list[str]:
    return [
        r["message"]
        for r in api_post(env, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}})
    ]


def started(flow_run: dict[str, Any]) -> float:
    return datetime.fromisoformat(flow_run["start_time"].replace("Z", "+00:00")).timestamp()


def test_flows_early_and_the_cli_import_no_prefect() -> None:
    code = "import sys, flows.cli, flows.early; print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=base_env(), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


@pytest.mark.slow
def test_prepare_units_start_before_the_flow_run_and_are_its_task_runs(
    tmp_path: Path, prefect_server: dict[str, str]
) -> None:
    events, flow_run = build(tmp_path, prefect_server)
    prepare = [e for e in events if e["stage"] == "prepare"]
    shards = sorted({e["unit"] for e in prepare})
    assert len(shards) == 5
    # every unit ran once, and the first ones before Prefect's flow module was even imported
    assert sorted(e["unit"] for e in prepare) == shards
    early = [e for e in prepare if e["thread"].startswith("longloom-early")]
    assert early and not early[0]["flows_build_imported"]
    assert min(e["t"] for e in prepare) < started(flow_run)
    # ... yet the flow run has one completed task run per unit, holding each unit's log line
    runs = task_runs(prefect_server, flow_run["id"])
    prep_runs = [r for r in runs if r["name"].startswith("prepare-shard")]
    assert len(prep_runs) == len(shards)
    assert {r["state_type"] for r in prep_runs} == {"COMPLETED"}
    messages = logs(prefect_server, flow_run["id"])
    for shard in shards:
        assert any(m.startswith(f"{shard}: ") and " records, " in m for m in messages), shard
    # the later stages ran as task runs, as before (no unit of them on an early thread)
    assert all(not e["thread"].startswith("longloom-early") for e in events if e["stage"] != "prepare")
    assert any(r["name"].startswith("write-shard") for r in runs)


@pytest.mark.slow
def test_a_failed_early_unit_is_retried_by_its_task_run(
    tmp_path: Path, prefect_server: dict[str, str]
) -> None:
    # the first shard is one the early threads surely pick up (they start with the first units)
    env = {**prefect_server, "FAIL_EARLY": "wiki-00000"}
    events, flow_run = build(tmp_path, env, run={"retries": 1, "retry_delay_seconds": 0})
    tries = [e for e in events if e["unit"] == "wiki-00000"]
    assert [e["thread"].startswith("longloom-early") for e in tries] == [True, False]
    runs = {r["name"]: r for r in task_runs(prefect_server, flow_run["id"])}
    (retried,) = [r for name, r in runs.items() if name.startswith("prepare-shard") and r["run_count"] == 2]
    assert retried["state_type"] == "COMPLETED"
    assert flow_run["state_type"] == "COMPLETED"


@pytest.mark.parametrize("as_command", [True, False])
def test_the_command_line_skips_the_last_garbage_collection_of_its_exit(
    tmp_path: Path, as_command: bool
) -> None:
    """`longloom ...` (argv from the command line) freezes what is alive when the command is done, so
    interpreter shutdown's full collection does not walk it (seconds after a Prefect build); a caller
    passing argv (a test, a script) keeps its garbage collector as it was."""
    config = write_config(tmp_path, tmp_path / "out")
    call = "flows.cli.main()" if as_command else f"flows.cli.main(['validate', {str(config)!r}])"
    code = (
        "import atexit, gc, sys\nimport flows.cli\n"
        f"sys.argv = ['longloom', 'validate', {str(config)!r}]\n"
        "atexit.register(lambda: print('frozen objects:', gc.get_freeze_count()))\n"
        f"sys.exit({call})\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=base_env(), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "valid; 5 input shards" in res.stdout
    frozen = int(res.stdout.split("frozen objects:")[1])
    assert (frozen > 10_000) if as_command else (frozen == 0)


def test_a_build_does_not_rebuild_the_flow_for_its_task_runner(
    tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow gets the config's task runner without `with_options`, whose new `Flow` regenerates the
    JSON schema of `BuildConfig` (the flow's parameter) on every build."""
    import prefect.flows

    from flows.build import build as build_flow
    from flows.build import run
    from tests.conftest import make_config

    made: list[Any] = []
    schema = prefect.flows.parameter_schema

    def counted(fn: Any) -> Any:
        made.append(fn)
        return schema(fn)

    monkeypatch.setattr(prefect.flows, "parameter_schema", counted)
    runner_before = build_flow.task_runner
    cfg = make_config(tmp_path / "out")
    result = run(cfg)
    assert result["checks_ok"] and result["rows"]
    assert made == [], "a Flow was constructed for this build"
    assert build_flow.task_runner is runner_before  # the module's flow is left as it was
