"""The Prefect API of a build: its temporary server after a crash, and Dask workers reporting to it.

Real processes throughout: `longloom build` killed by SIGKILL, a `dask scheduler` and two
`dask worker` processes with a Prefect home of their own (as on other machines), and the flow run's
logs read back through a real Prefect API.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.opskit import api_post, base_env, free_port, kill_group, prefect_server, run_cli, write_config


def env_without_api(home: Path) -> dict[str, str]:
    """A client or worker environment with its own Prefect home and no configured API (the default)."""
    env = base_env(PREFECT_HOME=str(home))
    for key in ("PREFECT_API_URL", "PREFECT_UI_API_URL"):
        env.pop(key, None)
    return env


def prefect_servers_of(home: Path) -> list[psutil.Process]:
    """Running Prefect API servers (temporary or not) whose PREFECT_HOME is `home`."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if ("uvicorn" in cmd or "prefect server" in cmd or "prefect.server" in cmd) and p.environ().get(
                "PREFECT_HOME"
            ) == str(home):
                found.append(p)
    return found


def end(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


@pytest.mark.slow
def test_temporary_api_left_by_a_killed_build_is_ended_by_the_next_run(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = env_without_api(home)
    cfg = write_config(tmp_path, tmp_path / "out")
    try:
        # a real SIGKILL of the main process (the fault hook kills it after the second input shard)
        log = tmp_path / "killed.log"
        with open(log, "w") as out:  # a file, not a pipe: an orphan holding the pipe would hang us
            killed = subprocess.run(
                [sys.executable, "-m", "flows.cli", "build", str(cfg)],
                env={**env, "LONGLOOM_FAULT": "prepared:2"},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=600,
            )
        assert killed.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        orphans = prefect_servers_of(home)
        assert orphans, "the killed build left no temporary API behind (nothing to test)"
        # (they outlived their owner: re-parented, like any orphan, to PID 1 or a subreaper)

        done = run_cli(["build", str(cfg)], env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        _, alive = psutil.wait_procs(orphans, timeout=30)
        assert not alive, f"still running: {[p.cmdline() for p in alive]}"
        assert "left running by a killed run" in done.stderr
        assert not prefect_servers_of(home)  # and the second run stopped its own on the way out
    finally:
        end(prefect_servers_of(home))


@pytest.mark.slow
def test_a_temporary_api_that_exits_while_starting_is_started_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A temporary API that dies during start-up (seen once while a killed run's server most likely
    held the shared database) is started again; a kept server that dies is reported, not restarted."""
    from flows.api import ApiError, Server, healthy

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a real server process that already exited
    dead.wait()
    server = Server(url="http://127.0.0.1:9/api", pid=dead.pid, kept=False, proc=dead)
    try:
        server.wait_healthy(180)
        assert server.pid != dead.pid and server.proc is not None and server.proc.poll() is None
        assert healthy(server.url)
    finally:
        server.stop()
    assert server.proc is not None and server.proc.poll() is not None  # stopped: the new one, not the dead
    kept = Server(url="http://127.0.0.1:9/api", pid=dead.pid, kept=True, proc=dead)
    with pytest.raises(ApiError, match="exited"):
        kept.wait_healthy(30)


@pytest.mark.slow
def test_dask_workers_report_to_the_flows_temporary_api_and_start_no_server(tmp_path: Path) -> None:
    client_home, worker_home = tmp_path / "client-home", tmp_path / "worker-home"
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    workdir = tmp_path / "workers"
    workdir.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, log: str) -> None:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_" + args[0], *args[1:]],
                env=env_without_api(worker_home),
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
        from distributed import Client

        with Client(address, timeout=300) as client:
            client.wait_for_workers(2, timeout=300)
        cfg = write_config(tmp_path / "run", tmp_path / "run" / "out")
        done = run_cli(["build", str(cfg), "--dask-address", address], env=env_without_api(client_home))
        assert done.returncode == 0, done.stderr[-4000:]
        # no worker (nor anything a worker started) ran a Prefect server
        for p in procs[1:]:
            tree = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            started = [c.cmdline() for c in tree if "uvicorn" in " ".join(c.cmdline())]
            assert not started, f"a worker started a Prefect server: {started}"
        assert not prefect_servers_of(worker_home)
    finally:
        for p in procs:
            kill_group(p)
            p.wait()
        end(prefect_servers_of(worker_home))

    # the workers' task logs are in the flow run, read through the client's Prefect API
    with prefect_server(client_home) as api:
        runs = api_post(api, "/flow_runs/filter", {"flows": {"name": {"any_": ["longloom-build"]}}})
        assert len(runs) == 1
        logs = api_post(
            api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [runs[0]["id"]]}}, "limit": 200}
        )
    prepared = [lg for lg in logs if lg["task_run_id"] and " records, " in lg["message"]]
    assert sorted(lg["message"].split(":")[0] for lg in prepared) == [
        "bible-00000",
        "books-00000",
        "code-00000",
        "wiki-00000",
        "wiki-00001",
    ]
