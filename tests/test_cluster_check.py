"""`longloom cluster check` and `longloom cluster local` (issue 14.3) against real processes.

`cluster local --workers 1` starts a `dask scheduler` and a worker with the store's credentials in its
environment; the test adds a second `dask worker` without credentials. moto's server stands in for the
store and a small HTTP server for the Prefect API's health endpoint. The check must print a line per
worker, fail with exactly one line naming the worker without credentials, leave no probe object in
the store, print no secret, and fail on every worker when the API URL is wrong. Ctrl-C (SIGINT to the
process group, as a terminal sends it) stops `cluster local` and every process it started.
"""

from __future__ import annotations

import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.opskit import base_env, free_port, kill_group, run_cli
from tests.s3kit import ACCESS_KEY, SECRET_KEY, moto_server, s3_env, s3fs_for
from tests.secretscan import find_secrets


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == "/api/health"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"true" if ok else b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api() -> Iterator[str]:
    """An HTTP server answering the Prefect API's health check, as `PREFECT_API_URL`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by its new parent counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state == "Z"


def test_cluster_check_names_the_worker_without_credentials(tmp_path: Path, api: str) -> None:
    with moto_server(tmp_path / "moto.log") as endpoint:
        fs = s3fs_for(endpoint)
        fs.mkdir("probe-bucket")
        env = base_env(**s3_env(endpoint), TMPDIR=str(tmp_path))
        port = free_port()
        address = f"tcp://127.0.0.1:{port}"
        local = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "cluster", "local", "--workers", "1", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        no_creds = {**env, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
        no_creds["AWS_CONFIG_FILE"] = no_creds["AWS_SHARED_CREDENTIALS_FILE"]
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            no_creds.pop(k, None)
        extra: subprocess.Popen[bytes] | None = None
        try:
            assert local.stdout is not None
            said: list[str] = []
            deadline = time.monotonic() + 120
            while not (said and said[-1].startswith("ready:")):
                line = local.stdout.readline()
                assert line and time.monotonic() < deadline, "".join(said)
                said.append(line)
            pids = [int(p) for p in re.findall(r"pid (\d+)", "".join(said))]
            assert len(pids) == 2 and address in said[-1]  # the scheduler and one worker
            # keep reading what the cluster prints (its processes' logs share the pipe): a full pipe
            # would block them, and the parent's own "stopping" line, at Ctrl-C
            drain = threading.Thread(
                target=lambda: [said.append(ln) for ln in local.stdout or []], daemon=True
            )
            drain.start()
            extra = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    address,
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--name",
                    "nocreds",
                ],
                env=no_creds,
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            from distributed import Client

            with Client(address, timeout=60) as client:
                client.wait_for_workers(2, timeout=120)
                nocreds = next(
                    a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "nocreds"
                )

            check = ["cluster", "check", "--dask-address", address, "--output", "s3://probe-bucket/run"]
            r = run_cli(check, env={**env, "PREFECT_API_URL": api})
            assert r.returncode == 1, r.stdout + r.stderr
            lines = r.stdout.splitlines()
            assert len(lines) == 3 and lines[0].startswith("client ("), r.stdout  # client + 2 workers
            for line in lines:
                assert "longloom 0." in line and "python 3." in line and "distributed " in line
                assert "GB free" in line and f"api {api}: ok" in line
            problems = [ln for ln in r.stderr.splitlines() if ln.startswith("problem:")]
            assert len(problems) == 1, r.stderr
            assert problems[0].startswith(
                f"problem: worker {nocreds}: store s3://probe-bucket/run: no credentials"
            )
            assert sum("list/write/delete ok" in ln for ln in lines) == 2  # the client and the other worker
            fs.invalidate_cache()
            assert fs.find("probe-bucket") == []  # every probe object was deleted
            assert find_secrets([], [SECRET_KEY, ACCESS_KEY], {"stdout": r.stdout, "stderr": r.stderr}) == []

            # a wrong API URL: every worker says it cannot reach it, one line each
            closed = f"http://127.0.0.1:{free_port()}/api"
            r = run_cli(check[:4], env={**env, "PREFECT_API_URL": closed})
            assert r.returncode == 1
            problems = [ln for ln in r.stderr.splitlines() if ln.startswith("problem:")]
            assert len(problems) == 2 and all(f"Prefect API {closed} cannot reach it" in p for p in problems)
        finally:
            if extra is not None:
                kill_group(extra)
                extra.wait()
            # Ctrl-C at a terminal: SIGINT to the whole foreground process group
            os.killpg(local.pid, signal.SIGINT)
            try:
                local.wait(timeout=60)
            finally:
                kill_group(local)
        assert local.returncode == 0
        wait_until = time.monotonic() + 30
        while not all(gone(p) for p in pids) and time.monotonic() < wait_until:
            time.sleep(0.2)
        assert all(gone(p) for p in pids), [p for p in pids if not gone(p)]  # no orphans
