"""Scheduled and on-demand deployment runs against a real Prefect server (`prefect server start`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.opskit import api_get, api_post, kill_group, output_digest, wait_for, write_config

DEPLOYMENT = "nightly-test"


@pytest.mark.slow
def test_cron_schedule_and_deployment_run_both_produce_output(
    tmp_path: Path, prefect_server: dict[str, str]
) -> None:
    scheduled_out, adhoc_out = tmp_path / "scheduled", tmp_path / "adhoc"
    cfg = write_config(tmp_path, scheduled_out, packing={"targets": [{"length": 32768}]})
    env = prefect_server
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", str(cfg), "--cron", "* * * * *", "--name", DEPLOYMENT],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        path = f"/deployments/name/longloom-build-file/{DEPLOYMENT}"
        wait_for(lambda: _exists(env, path), 300, "the deployment to be registered")
        deployment = api_get(env, path)
        assert deployment["schedules"][0]["schedule"]["cron"] == "* * * * *"
        # an ad-hoc run through the real CLI, with its output redirected by a parameter
        trigger = subprocess.run(
            [
                sys.executable,
                "-m",
                "prefect",
                "deployment",
                "run",
                f"longloom-build-file/{DEPLOYMENT}",
                "--param",
                f"output={adhoc_out}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert trigger.returncode == 0, trigger.stdout + trigger.stderr

        def runs() -> list[dict]:
            body = {"deployments": {"id": {"any_": [deployment["id"]]}}}
            return list(api_post(env, "/flow_runs/filter", body))

        def done(auto_scheduled: bool) -> bool:
            return any(
                r["auto_scheduled"] == auto_scheduled and r["state_type"] == "COMPLETED" for r in runs()
            )

        # the next minute boundary, plus the run itself
        wait_for(
            lambda: done(True) and done(False), 600, "a scheduled and an ad-hoc run to complete", every=2
        )
    finally:
        kill_group(serve)
        serve.wait()
        log.close()
    failed = [r["name"] for r in runs() if r["state_type"] in ("FAILED", "CRASHED")]
    assert not failed, (tmp_path / "serve.log").read_text()[-4000:]
    for out in (scheduled_out, adhoc_out):
        assert (out / "manifest.json").exists() and (out / "report.md").exists()
    a, b = output_digest(scheduled_out), output_digest(adhoc_out)
    assert a["files"] == b["files"] and any(p.startswith("data/pretrain_32768/") for p in a["files"])


def _exists(env: dict[str, str], path: str) -> bool:
    import urllib.error

    try:
        api_get(env, path)
    except urllib.error.HTTPError:
        return False
    return True
