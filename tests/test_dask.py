"""Scale-out: the build flow on a real Dask cluster (a `dask scheduler` and two `dask worker` processes
on loopback) through prefect-dask, compared byte for byte with a local run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.opskit import free_port, kill_group, output_digest, run_cli, write_config


@pytest.mark.slow
def test_flow_on_a_dask_cluster_matches_a_local_run(
    tmp_path: Path, prefect_server: dict[str, str], small_shard_reference: dict[str, Any]
) -> None:
    from distributed import Client, get_task_stream

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # workers start in a folder of their own, without the config file: they get the config model
    workdir = tmp_path / "workers"
    workdir.mkdir()
    env = {**prefect_server}
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, log: str) -> None:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_" + args[0], *args[1:]],
                env=env,
                cwd=workdir,
                stdout=open(tmp_path / log, "w"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    try:
        start("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard", log="scheduler.log")
        for i in range(2):
            start("worker", address, "--nthreads", "1", "--no-dashboard", "--name", f"w{i}", log=f"w{i}.log")
        with Client(address, timeout=300) as client:
            client.wait_for_workers(2, timeout=300)
            cfg = write_config(tmp_path / "cluster", tmp_path / "cluster" / "out")
            with get_task_stream(client) as stream:
                done = run_cli(["build", str(cfg), "--dask-address", address], env=env)
            assert done.returncode == 0, done.stderr[-4000:]
            used = {t["worker"] for t in stream.data}
        assert len(used) == 2, f"tasks ran on {used}"  # both workers took shards
    finally:
        for p in procs:
            kill_group(p)
            p.wait()

    # the local run: `longloom build --no-prefect` of the same config in a folder of its own (conftest's
    # session reference, which test_resume compares its resumed runs with too)
    local = small_shard_reference["folder"]
    cluster = output_digest(tmp_path / "cluster" / "out")
    assert cluster["files"] == small_shard_reference["files"]
    assert cluster["manifest"] == small_shard_reference["manifest"]
    # runner, scheduler address, workers and output folder stay out of the manifest (issue 11.15): only
    # the command differs, by the config path each run was given
    raw = [json.loads((f / "out" / "manifest.json").read_text()) for f in (tmp_path / "cluster", local)]
    assert raw[0].pop("command").replace(str(tmp_path / "cluster"), str(local)) == raw[1].pop("command")
    assert raw[0] == raw[1]
