"""Scale-out: the build flow on a real Dask cluster (a `dask scheduler` and two `dask worker` processes
on loopback) through prefect-dask, compared byte for byte with a local run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.opskit import base_env, free_port, kill_group, output_digest, run_cli, write_config


@pytest.mark.slow
def test_flow_on_a_dask_cluster_matches_a_local_run(tmp_path: Path, prefect_server: dict[str, str]) -> None:
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
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
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

    local_cfg = write_config(tmp_path / "local", tmp_path / "local" / "out")
    local = run_cli(["build", str(local_cfg), "--no-prefect"], env=base_env())
    assert local.returncode == 0, local.stderr[-3000:]
    cluster, here = output_digest(tmp_path / "cluster" / "out"), output_digest(tmp_path / "local" / "out")
    assert cluster["files"] == here["files"]
    assert cluster["manifest"] == here["manifest"]
    # runner, scheduler address, workers and output folder stay out of the manifest (issue 11.15): only
    # the command differs, by the config path each run was given
    raw = [json.loads((tmp_path / f / "out" / "manifest.json").read_text()) for f in ("cluster", "local")]
    assert raw[0].pop("command").replace("/cluster/", "/local/") == raw[1].pop("command")
    assert raw[0] == raw[1]
