"""The local Prefect server builds keep running (issue 19.1) and the flow process's imports (19.2).

Real processes: `longloom build` twice with `LONGLOOM_PREFECT_SERVER=keep` and a Prefect home of
its own, a stale record left by a server that is gone, `longloom server stop`.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.opskit import base_env, run_cli, write_config


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = base_env(PREFECT_HOME=str(home), **extra)
    for key in ("PREFECT_API_URL", "PREFECT_UI_API_URL"):
        env.pop(key, None)
    return env


def servers_of(home: Path) -> list[psutil.Process]:
    """Running Prefect API servers (any kind) whose PREFECT_HOME is `home`."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if ("uvicorn" in cmd or "prefect server" in cmd) and p.environ().get("PREFECT_HOME") == str(home):
                found.append(p)
    return found


@pytest.mark.slow
def test_builds_keep_one_server_a_stale_record_is_replaced_and_server_stop_ends_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    # a record left by a server that is gone: a real process, ended, with its real identity
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    stale = {"pid": dead.pid, "create_time": psutil.Process(dead.pid).create_time()}
    stale |= {"cmdline": [sys.executable, "-c", "pass"], "url": "http://127.0.0.1:9/api"}
    dead.wait()
    (home / "longloom-server.json").write_text(json.dumps(stale))
    env = env_for(home, LONGLOOM_PREFECT_SERVER="keep")
    try:
        first = run_cli(["build", str(write_config(tmp_path, tmp_path / "o1"))], env)
        assert first.returncode == 0, first.stderr[-2000:]
        record = json.loads((home / "longloom-server.json").read_text())
        assert record["pid"] != stale["pid"] and record["url"] != stale["url"]
        kept = psutil.Process(record["pid"])
        assert kept.is_running(), "the kept server ended with the build"
        before = {p.pid for p in servers_of(home)}
        assert record["pid"] in before

        second = run_cli(["build", str(write_config(tmp_path, tmp_path / "o2"))], env)
        assert second.returncode == 0, second.stderr[-2000:]
        assert json.loads((home / "longloom-server.json").read_text())["pid"] == record["pid"]
        assert {p.pid for p in servers_of(home)} == before, "the second build started a server of its own"
        # both runs are in the kept server's database
        import urllib.request

        req = urllib.request.Request(
            record["url"] + "/flow_runs/filter", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            runs = json.load(resp)
        assert len([r for r in runs if r["state_type"] == "COMPLETED"]) == 2

        stop = run_cli(["server", "stop"], env)
        assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
        assert not (home / "longloom-server.json").exists()
        _, alive = psutil.wait_procs([kept], timeout=30)
        assert not alive and servers_of(home) == []
        again = run_cli(["server", "status"], env)
        assert again.returncode == 1 and "not running" in again.stdout
    finally:
        for p in servers_of(home):
            with contextlib.suppress(psutil.Error):
                p.kill()


@pytest.mark.slow
def test_flow_process_does_not_import_prefects_server_app(tmp_path: Path) -> None:
    """The temporary API runs as a command line: the flow process skips ~80 MB of server imports."""
    env = env_for(tmp_path / "home", LONGLOOM_PREFECT_SERVER="temporary")
    code = (
        "import sys\n"
        "from flows.api import prefect_api\n"
        "from prefect import flow\n"
        "@flow\n"
        "def f() -> int:\n    return 1\n"
        "with prefect_api() as (url, pid):\n    assert f() == 1 and pid is not None\n"
        "print('server app imported:', 'prefect.server.api.server' in sys.modules)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "server app imported: False" in res.stdout
    assert servers_of(tmp_path / "home") == []


ARENAS = """
import ctypes, sys, threading
sys.path.insert(0, {root!r})
if {limit}:
    from flows.api import limit_malloc_arenas
    assert limit_malloc_arenas()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
go = threading.Barrier(8)
def work() -> None:
    go.wait()  # all threads allocate at once: glibc hands contended threads arenas of their own
    [libc.malloc(4096) for _ in range(2000)]
    go.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
libc.fopen.restype = ctypes.c_void_p
fp = libc.fopen({path!r}.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc arenas")
@pytest.mark.parametrize("limit", [False, True])
def test_flow_process_caps_malloc_arenas_of_task_threads(tmp_path: Path, limit: bool) -> None:
    """Task threads share at most 2 glibc arenas (+ the main one) once `longloom build` capped them."""
    out = tmp_path / "info.xml"
    subprocess.run(
        [sys.executable, "-c", ARENAS.format(root=str(ROOT), limit=limit, path=str(out))], check=True
    )
    heaps = out.read_text().count("<heap nr=")
    if limit:
        assert heaps <= 2, out.read_text()[:400]
    else:  # the reference: without the cap glibc does create more arenas, so the cap is what matters
        assert heaps > 2


def test_build_command_caps_malloc_arenas_before_the_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.api
    from flows import cli

    calls: list[str] = []

    def capped() -> bool:
        calls.append("capped")
        return True

    def preflight(cfg: object) -> list[object]:
        calls.append("preflight")
        return []

    monkeypatch.setattr(flows.api, "limit_malloc_arenas", capped)
    monkeypatch.setattr("pipeline.build.preflight", preflight)
    monkeypatch.setattr(
        "flows.build.run", lambda cfg, command=None: {"checks_ok": True, "calls": list(calls)}
    )
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # configured: nothing is started
    assert cli.main(["build"]) == 0
    assert calls[:2] == ["capped", "preflight"]
