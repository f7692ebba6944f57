"""The test kit is safe to run in parallel (pytest-xdist workers, other checkouts on the machine).

Ports for the servers tests start, the Prefect server helper when its port is taken after all, and the
file lock under which test caches are built.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests import opskit
from tests.conftest import ROOT


def ephemeral_range() -> tuple[int, int]:
    """Where the kernel picks a port for a bind to port 0 (Prefect's temporary API, Dask, test servers)."""
    lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(lo), int(hi)


def draws(worker: str, n: int) -> list[int]:
    """`n` ports handed out by free_port in a fresh process that is xdist worker `worker`, none bound."""
    code = (
        "import json, sys; from tests.opskit import free_port;"
        "print(json.dumps([free_port() for _ in range(int(sys.argv[1]))]))"
    )
    env = opskit.base_env(PYTEST_XDIST_WORKER=worker)
    done = subprocess.run(
        [sys.executable, "-c", code, str(n)], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return list(json.loads(done.stdout))


def test_free_ports_of_parallel_workers_never_meet() -> None:
    """A port found free is only reserved once the server binds it. Two workers must never be handed
    the same port in that gap, one worker never twice, and no port-0 bind may take it meanwhile."""
    n = 300
    gw0, gw1 = draws("gw0", n), draws("gw1", n)
    for ports in (gw0, gw1):
        assert len(set(ports)) == n, "a port was handed out twice before it was bound"
    assert not set(gw0) & set(gw1), "two workers were handed the same port"
    lo, hi = ephemeral_range()
    inside = [p for p in gw0 + gw1 if lo <= p <= hi]
    assert not inside, (
        f"ports in the kernel's ephemeral range {lo}-{hi}, where port-0 binds land: {inside[:5]}"
    )


def test_a_port_in_use_is_skipped() -> None:
    busy = opskit.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", busy))
        s.listen()
        seen = {opskit.free_port() for _ in range(opskit.PORT_BLOCK)}  # a whole walk through the block
    assert busy not in seen


@pytest.mark.slow
def test_prefect_server_starts_again_when_its_port_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process listens on the port the helper picked (it took it after the check): the helper
    starts the server on another port instead of failing the tests that need it."""
    real = opskit.free_port
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = int(taken.getsockname()[1])
    handed: list[int] = []

    def first_busy() -> int:
        handed.append(busy if not handed else real())
        return handed[-1]

    monkeypatch.setattr(opskit, "free_port", first_busy)
    try:
        with opskit.prefect_server(tmp_path) as env:
            assert len(handed) == 2 and env["PREFECT_API_URL"] == f"http://127.0.0.1:{handed[1]}/api"
            with urllib.request.urlopen(env["PREFECT_API_URL"] + "/health", timeout=10) as r:
                assert r.status == 200
    finally:
        taken.close()


def test_cache_entries_are_built_by_one_process_at_a_time(tmp_path: Path) -> None:
    """Three processes ask for a missing cache entry at once; it is built once, never half-read."""
    code = """
import sys, time
from pathlib import Path
from tests.token_reference import under_cache_lock

entry, log = Path(sys.argv[1]), Path(sys.argv[2])

@under_cache_lock("parallel-safety-test")
def build() -> str:
    if not entry.exists():
        with log.open("a") as f:
            f.write("built\\n")
        part = entry.with_name("part")
        part.write_text("half")
        time.sleep(1.0)  # a slow build: the others arrive meanwhile
        part.write_text("whole")
        part.rename(entry)
    return entry.read_text()

print(build())
"""
    entry, log = tmp_path / "entry", tmp_path / "log"
    env = opskit.base_env(LONGLOOM_TEST_CACHE=str(tmp_path / "cache"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(entry), str(log)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert outs == ["whole"] * 3
    assert log.read_text() == "built\n"
