"""`longloom server`: a real `prefect server` child, its URLs from --host/--port, and its shutdown."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.opskit import base_env, free_port, kill_group, wait_for


def test_server_urls_follow_host_and_port() -> None:
    from flows.deploy import server_urls

    assert server_urls("127.0.0.1", 4321) == ("http://127.0.0.1:4321/api", "http://127.0.0.1:4321/api")
    api, ui = server_urls("0.0.0.0", 4322)
    assert api == "http://127.0.0.1:4322/api"  # this machine reaches a wildcard server on loopback
    assert ui == f"http://{socket.getfqdn()}:4322/api"  # a browser elsewhere needs a name
    assert server_urls("::1", 80)[0] == "http://[::1]:80/api"


def _port_free(port: int) -> bool:
    """No process listens on the port. SO_REUSEADDR lets the bind ignore connections the stopped server
    left in TIME_WAIT (our own health checks), which hold the port number but no listener."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


@pytest.mark.slow
def test_server_on_another_port_serves_a_ui_that_calls_it_and_stops_with_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(PREFECT_HOME=str(tmp_path / "home"))
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_UI_API_URL", None)
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    p = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "server", "--host", "0.0.0.0", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    children: list[psutil.Process] = []
    try:

        def healthy() -> bool:
            assert p.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            url = f"http://127.0.0.1:{port}/api/health"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
            return False

        wait_for(healthy, 240, "the Prefect server to become healthy", every=0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as r:
            ui = json.loads(r.read())
        # the UI in a browser calls this server, by a name other machines can resolve, on this port
        assert ui["api_url"] == f"http://{socket.getfqdn()}:{port}/api"

        children += psutil.Process(p.pid).children(recursive=True)
        assert children, "longloom server started no child"
        p.send_signal(signal.SIGTERM)  # only the longloom process: as `kill PID` or systemd's stop
        assert p.wait(timeout=60) is not None
        _gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running after SIGTERM: {[c.cmdline() for c in alive]}"
        wait_for(lambda: _port_free(port), 10, f"port {port} to be released")
    finally:
        kill_group(p)
        for c in children:
            with contextlib.suppress(psutil.Error):
                c.kill()
        p.wait()
        log.close()
