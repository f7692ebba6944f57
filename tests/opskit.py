"""Helpers for the operations tests (resume, schedules, Dask): real processes, configs on disk, digests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from tests.conftest import DATA, ROOT, sample_dict

# Small shards and row groups, so a kill can land between shards and inside one.
SMALL_OUTPUT = {"shard_tokens": 131072, "row_group_tokens": 32768}


# Ports for the servers tests start. A port found free by binding port 0 and closing the socket can
# be taken by another process before the server binds it; with pytest-xdist the other test processes
# do exactly that. So each xdist worker hands out ports from its own block, below Linux's ephemeral
# range (32768 and up, where port-0 binds land), walking through the block so that two servers one
# test starts never get the same port either. The start inside the block is random so that two
# sessions on one machine (two checkouts) rarely meet.
PORT_BLOCK = 1000
PORT_BASE = 20000
_port_cursor = random.randrange(PORT_BLOCK)


def _worker_slot() -> int:
    """0 without xdist, 1 + N on worker gwN (a dozen blocks fit below the ephemeral range)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return 1 + int(worker[2:]) % 12 if worker.startswith("gw") and worker[2:].isdigit() else 0


def free_port() -> int:
    """A loopback port nobody listens on now, from this test process's own block (see above)."""
    global _port_cursor
    base = PORT_BASE + _worker_slot() * PORT_BLOCK
    for _ in range(PORT_BLOCK):
        _port_cursor = (_port_cursor + 1) % PORT_BLOCK
        port = base + _port_cursor
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {base}-{base + PORT_BLOCK - 1}")


def write_config(folder: Path, out: Path, **overrides: Any) -> Path:
    """The sample config with absolute input paths and `out` as output, saved as folder/c.yaml."""
    cfg = sample_dict()
    for s in cfg["sources"]:
        s["paths"] = [str(DATA / p) for p in s["paths"]]
    cfg["output"] = {**cfg["output"], **SMALL_OUTPUT, "dir": str(out)}
    return save_config(folder, cfg, overrides)


def save_config(folder: Path, cfg: dict[str, Any], overrides: dict[str, Any]) -> Path:
    """`cfg` with `overrides` merged into its sections (a dict value updates the section), as folder/c.yaml."""
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LONGLOOM_FAULT"}
    env.update(
        PYTHONPATH=str(ROOT),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: dict[str, str] | None = None, fault: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`python -m flows.cli ARGS` in its own process group; stray children are killed afterwards."""
    env = dict(env or base_env())
    if fault:
        env["LONGLOOM_FAULT"] = fault
    return run_group([sys.executable, "-m", "flows.cli", *args], env, timeout)


def run_group(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    p = subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        kill_group(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def kill_group(p: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Signal the process group `p` leads (it and anything it started), ignoring a group that is gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


def normalized_manifest(out: Path) -> dict[str, Any]:
    """The manifest minus what says how and where a run was started (command line, output folder, runner)."""
    m = json.loads((out / "manifest.json").read_text())
    m.pop("command")
    m["config"]["output"].pop("dir", None)  # no longer in the manifest (issue 11.15)
    for k in ("task_runner", "workers", "dask_address", "retries", "retry_delay_seconds"):
        m["config"]["run"].pop(k, None)
    return m


def output_digest(out: Path) -> dict[str, Any]:
    """sha256 of every published file (shards, audit tables, README) plus the normalized manifest."""
    from pipeline.core.parquet_io import sha256_file

    files = {
        str(p.relative_to(out)): sha256_file(p)
        for p in sorted(out.rglob("*"))
        if p.is_file()
        and ".longloom" not in p.parts
        and p.name not in ("manifest.json", "report.json", "report.md", "README.md")
    }
    # the card quotes the command line that started the run; everything else in it must match
    command = json.loads((out / "manifest.json").read_text())["command"]
    card = (out / "README.md").read_text(encoding="utf-8").replace(command, "<command>")
    files["README.md"] = hashlib.sha256(card.encode()).hexdigest()
    return {"files": files, "manifest": normalized_manifest(out)}


def temporaries(out: Path) -> list[Path]:
    return sorted(out.rglob(".tmp-*")) if out.exists() else []


def assert_readers_see_only_whole_files(out: Path) -> None:
    """Every visible Parquet file opens (a half-written one has no footer); readers skip `.tmp-*`."""
    import pyarrow.dataset as ds

    for p in sorted(out.glob("[!.]*/**/*.parquet")):
        if not p.name.startswith("."):
            pq.ParquetFile(p).metadata  # noqa: B018 (raises on a truncated file)
    for folder in sorted((out / "data").glob("*")) if (out / "data").exists() else []:
        ds.dataset(folder, format="parquet").count_rows()
    if (out / "manifest.json").exists():
        json.loads((out / "manifest.json").read_text())


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """A real `prefect server start` on a free loopback port with its own PREFECT_HOME (SQLite).

    Yields the environment a client process needs to use it. A server that exits because its port was
    taken in the meantime is started again on another port (a few times), so a port clash with another
    process costs a restart, never a failed test.
    """
    for attempt in range(4):
        p, env = _start_prefect_server(home)
        try:
            _wait_healthy(p, env["PREFECT_API_URL"], home)
        except _PortTaken:
            _stop(p)
            if attempt == 3:
                raise RuntimeError(f"prefect server: port taken four times: {_server_log(home)}") from None
            continue
        except BaseException:
            _stop(p)
            raise
        break
    try:
        yield env
    finally:
        _stop(p)


class _PortTaken(Exception):
    """The server exited because another process listens on its port."""


def _server_log(home: Path) -> str:
    return (home / "server.log").read_text(errors="replace")[-3000:]


def _start_prefect_server(home: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = base_env(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api,
        # create scheduled runs within seconds of a deployment appearing, not once a minute
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
        PREFECT_RUNNER_POLL_FREQUENCY="2",
    )
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    with open(home / "server.log", "w") as log:  # the child keeps its own handle
        p = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return p, env


def _wait_healthy(p: subprocess.Popen[bytes], api: str, home: Path, timeout: float = 240) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if p.poll() is not None:
            log = _server_log(home)
            if "already in use" in log.lower() or "errno 98" in log.lower():
                raise _PortTaken()
            raise RuntimeError(f"prefect server exited: {log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{api}/health", timeout=2) as r:
            if r.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"prefect server did not become healthy in {timeout:.0f} s: {_server_log(home)}"
            )
        time.sleep(0.5)


def _stop(p: subprocess.Popen[bytes]) -> None:
    kill_group(p, signal.SIGTERM)
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        kill_group(p)
        p.wait()


def api_post(env: dict[str, str], path: str, body: dict[str, Any]) -> Any:
    import urllib.request

    req = urllib.request.Request(
        env["PREFECT_API_URL"] + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=60) as r:  # a busy machine answers slowly
        return json.loads(r.read())


def api_get(env: dict[str, str], path: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(env["PREFECT_API_URL"] + path, timeout=60) as r:
        return json.loads(r.read())


def wait_for(predicate: Any, timeout: float, what: str, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
