"""The Prefect API a build reports to, and the processes Longloom starts for it.

`longloom build` needs nothing started by hand. Without `PREFECT_API_URL` it uses one of two kinds of
local server, chosen by `LONGLOOM_PREFECT_SERVER` (or `longloom build --prefect-server`):

- `keep`: a local Prefect server (API and UI) started detached on first use and found again by later
  builds through `$PREFECT_HOME/longloom-server.json` (pid, start time, command line, URL); a record
  whose process is gone or is not that process any more is ignored and replaced. It outlives the
  build on purpose (later builds skip the start-up, the UI keeps the run history) and is stopped by
  `longloom server stop`. The default when the build runs at a terminal. Beside it runs the warm
  build process, from which such builds fork their flow process (`flows.warm`).
- `temporary`: a server for this build only, stopped when it ends; the default elsewhere (CI, cron,
  scripts, tests) so that nothing is left running.

Either way the server is started before the flow process imports Prefect and runs preflight, so its
start-up overlaps that work, and it is started as a `uvicorn`/`prefect server` command line: the flow
process never imports Prefect's server application (~80 MB and several seconds of imports).

The URL is set explicitly for the flow. Explicit matters for Dask: the URL travels with every task's
settings and is set in every worker process by a worker plugin, so workers report to the flow's
API (their task logs reach the flow run) instead of each starting a temporary server of their own.

A `kill -9` of the build leaves a temporary server orphaned. Its pid is recorded under the run's
lock (`.longloom/helpers/`), and the next run on the same output folder ends it before starting.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pipeline.core.helpers import forget_helpers, process_identity, reap_orphans, record_helpers, same_process
from pipeline.core.progress import waiting

MODE_ENV = "LONGLOOM_PREFECT_SERVER"
MODES = ("keep", "temporary")
RECORD_NAME = "longloom-server.json"
KEPT_PORT = 4200  # the port Prefect's UI and docs assume; another free port if it is taken


class ApiError(RuntimeError):
    """The Prefect server Longloom started did not come up."""


def prefect_home() -> Path:
    """Prefect's home folder (its database, profiles and our server record) as Prefect resolves it."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def configured_api_url() -> str | None:
    """PREFECT_API_URL as Prefect resolves it here (environment, profile, or a test harness)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def server_mode(requested: str | None = None) -> str:
    """`keep` or `temporary`: the request, else LONGLOOM_PREFECT_SERVER, else keep at a terminal."""
    mode = requested or os.environ.get(MODE_ENV, "").strip().lower()
    if not mode:
        return "keep" if sys.stdin.isatty() and sys.stderr.isatty() else "temporary"
    if mode not in MODES:
        from schemas.config import ConfigError

        raise ConfigError(f"{MODE_ENV}={mode!r}: use one of {', '.join(MODES)}")
    return mode


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers its health check at `api_url`."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, ValueError):
        return False


def _free_port(preferred: int | None = None) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred or 0))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A local Prefect API Longloom started (or found again); `proc` is set if this process owns it."""

    url: str
    pid: int
    kept: bool
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    started: float = field(default_factory=time.monotonic)

    def wait_healthy(self, timeout: float) -> None:
        what = "Prefect's local server" if self.kept else "Prefect's temporary API"
        restarts = 0 if self.kept else 1
        with waiting(f"starting {what} (a new database takes up to a minute or more)"):
            deadline = time.monotonic() + timeout
            while not healthy(self.url, timeout=1.0):
                gone = self.proc.poll() is not None if self.proc else not psutil.pid_exists(self.pid)
                if gone and restarts:
                    # once more: seen once in the test suite while a killed run's temporary API (still
                    # running until this run ends it) most likely held the shared database
                    restarts -= 1
                    _TEMPORARY.discard(self.pid)
                    fresh = start_temporary()
                    self.url, self.pid, self.proc = fresh.url, fresh.pid, fresh.proc
                    continue
                if gone or time.monotonic() > deadline:
                    tail = ""
                    if self.log and self.log.exists():
                        tail = " ".join(self.log.read_text(errors="replace").splitlines()[-3:])
                    why = "exited" if gone else f"did not answer within {timeout:.0f} s"
                    raise ApiError(
                        f"{what} at {self.url} {why}"
                        + (f" (log {self.log}: {tail})" if self.log else "")
                        + f"; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set {MODE_ENV}=temporary"
                    )
                time.sleep(0.25)

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _TEMPORARY.discard(self.pid)


_TEMPORARY: set[int] = set()  # pids of temporary servers this process started and has not stopped
_ACTIVE: list[Server] = []  # the server launched by an enclosing `api_server()`, if any


def _profile_api_url(home: Path) -> str | None:
    """PREFECT_API_URL of the active Prefect profile, read without importing Prefect (slow)."""
    import tomllib

    try:
        data = tomllib.loads((home / "profiles.toml").read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    url = (data.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL")
    return str(url) if url else None


def _server_env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "DO_NOT_TRACK": "1", **extra}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return env


def _prefect_path() -> str:
    """The folder holding the `prefect` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.origin is not None
    return str(Path(spec.origin).parent.parent)


def start_temporary() -> Server:
    """Start a temporary API for this process only, without importing Prefect's server app here."""
    port = _free_port()
    # as Prefect's own temporary server (SubprocessASGIServer): no UI, no background services
    env = _server_env(
        {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    )
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", _prefect_path()]
    cmd += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "error", "--lifespan", "on"]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    _TEMPORARY.add(proc.pid)
    return Server(url=f"http://127.0.0.1:{port}/api", pid=proc.pid, kept=False, proc=proc)


def read_record(home: Path | None = None, name: str = RECORD_NAME) -> dict[str, Any] | None:
    """A process record under the Prefect home (the kept server's, or `name`'s); None if unreadable."""
    path = (home or prefect_home()) / name
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def write_record(home: Path, name: str, record: dict[str, Any]) -> None:
    """Replace the record `name` under the Prefect home at once (readers see the old one or the new)."""
    tmp = home / f".{name}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, home / name)


def kept_server(home: Path | None = None) -> Server | None:
    """The kept server recorded under the Prefect home, if that very process still runs."""
    record = read_record(home)
    if record is None or same_process(record) is None:
        return None
    return Server(url=str(record["url"]), pid=int(record["pid"]), kept=True, log=Path(record.get("log", "")))


@contextlib.contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """Two builds starting at once find or start one server between them."""
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    with open(home / "longloom-server.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def find_or_start_kept(home: Path | None = None) -> Server:
    """The recorded kept server, or a new one started detached (own session: Ctrl-C of a build does
    not reach it) and recorded under the Prefect home. A stale record (dead pid) is replaced."""
    home = home or prefect_home()
    with home_lock(home):
        found = kept_server(home)
        if found is not None:
            return found
        port = _free_port(KEPT_PORT)
        log = home / "longloom-server.log"
        url = f"http://127.0.0.1:{port}/api"
        env = _server_env({"PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_UI_API_URL": url})
        # `prefect server start`, as `longloom server` runs it: API, UI and the scheduler services
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        record = {**process_identity(psutil.Process(proc.pid)), "url": url, "log": str(log)}
        write_record(home, RECORD_NAME, record)
        return Server(url=url, pid=proc.pid, kept=True, log=log)


def stop_kept(home: Path | None = None, grace: float = 20.0) -> str:
    """Stop the kept server recorded under the Prefect home; a line saying what happened."""
    home = home or prefect_home()
    with home_lock(home):
        record = read_record(home)
        proc = same_process(record) if record else None
        (home / RECORD_NAME).unlink(missing_ok=True)
    if proc is None:
        return "no Longloom-started Prefect server is running" + (
            " (removed a stale record)" if record else ""
        )
    assert record is not None
    procs = [proc]
    # its own session: the group holds `prefect server` and whatever it runs
    with contextlib.suppress(psutil.Error):
        procs = [proc, *proc.children(recursive=True)]
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, 15)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    if alive:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, 9)
        psutil.wait_procs(alive, timeout=grace)
    return f"stopped the Prefect server at {record['url']} (pid {record['pid']})"


def api_configured() -> bool:
    """Whether PREFECT_API_URL is set (environment or active profile): then Longloom starts no server."""
    return bool(os.environ.get("PREFECT_API_URL") or _profile_api_url(prefect_home()))


def launch(mode: str | None = None) -> Server | None:
    """Start (or find) the server the build will use, without waiting for it; None if one is configured."""
    if api_configured():
        return None
    return find_or_start_kept() if server_mode(mode) == "keep" else start_temporary()


@contextlib.contextmanager
def api_server(mode: str | None = None) -> Iterator[Server | None]:
    """Launch the build's server early (before preflight and imports) so its start-up overlaps them;
    `prefect_api()` inside the block waits for it. A temporary server is stopped when the block ends."""
    server = launch(mode)
    if server is None:
        yield None
        return
    _ACTIVE.append(server)
    try:
        yield server
    finally:
        _ACTIVE.remove(server)
        if not server.kept:
            server.stop()


@contextlib.contextmanager
def prefect_api() -> Iterator[tuple[str, int | None]]:
    """Yield (API URL, pid of a temporary server or None) for runs started inside the block.

    A configured PREFECT_API_URL is used as it is. Otherwise the server launched by an enclosing
    `api_server()` is used, or one is launched here (see the module docstring); it is waited for
    (progress shown) and set as PREFECT_API_URL for the block, for this process's clients and for
    everything the flow ships out.
    """
    url = configured_api_url()
    if url:
        yield url, None
        return
    with contextlib.ExitStack() as stack:
        server = _ACTIVE[-1] if _ACTIVE else stack.enter_context(api_server())
        assert server is not None
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 120)
        server.wait_healthy(timeout)
        from prefect.context import refresh_global_settings_context
        from prefect.settings import PREFECT_API_URL, temporary_settings

        previous = os.environ.get("PREFECT_API_URL")
        try:
            # the settings context covers this thread and what is shipped to task runners; the
            # environment covers Prefect's background threads (log and event workers) in this process
            os.environ["PREFECT_API_URL"] = server.url
            refresh_global_settings_context()
            with temporary_settings({PREFECT_API_URL: server.url}):
                yield server.url, None if server.kept else server.pid
        finally:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            # send the last logs and events while the server still listens (else: "Error logging to
            # API" and a minute of connection retries at exit)
            with waiting("sending the last logs to Prefect's API"):
                APILogWorker.drain_all(timeout=30)
                EventsWorker.drain_all(timeout=30)
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
            refresh_global_settings_context()


M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for threads started from now on; whether it took effect.

    Prefect runs each task in a thread, and glibc gives busy threads arenas of their own (up to 8 per
    core): the memory a finished task freed stays mapped in its arena and the flow process's RSS grows
    by ~120 MB over the in-process run on the bundled sample (741 against 622 MiB measured with
    MALLOC_ARENA_MAX=2; in-process 548 MiB). The same effect as that environment variable, set from
    here because the variable is read only when the process starts. No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def temporary_server_pids() -> list[int]:
    """Pids of temporary Prefect servers this process started (by `prefect_api` or Prefect itself)."""
    pids = [pid for pid in _TEMPORARY if psutil.pid_exists(pid)]
    module = sys.modules.get("prefect.server.api.server")
    if module is not None:
        servers = list(module.SubprocessASGIServer._instances.values())
        pids += [s.server_process.pid for s in servers if s.running and s.server_process is not None]
    return pids


@contextlib.contextmanager
def run_helpers(work_root: Path, log: Callable[[str], Any]) -> Iterator[None]:
    """Inside the run's lock: end what killed runs left, record this run's temporary server."""
    reap_orphans(work_root, log)
    record = record_helpers(work_root, temporary_server_pids())
    try:
        yield
    finally:
        forget_helpers(record)
