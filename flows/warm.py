"""The warm build process: a process beside the kept Prefect server that has Prefect and Longloom
imported, from which each `longloom build` forks the process that runs its flow.

Why: a flow process started from nothing spends seconds of CPU before its first task run (importing
Prefect, `flows.build`, fastapi for the parameters, pandas and matplotlib for the card), and on a
2-core machine those seconds are taken from the stages (issue 19: 0.77x the in-process throughput).
A child forked from a process that imported all that starts the flow at once.

How (Linux; elsewhere, or with `LONGLOOM_WARM_BUILD=0`, builds run as before):

- Only in `keep` mode (see `flows.api`): the warm process lives as long as the kept server, is
  recorded beside it (`$PREFECT_HOME/longloom-warm.json`) and is ended by `longloom server stop`, or
  by itself when the kept server is gone. The temporary mode (CI, cron, tests) leaves nothing running.
- `longloom build` (the client) connects to it over a Unix socket, sends its arguments, working
  folder, umask and environment, and passes its stdin/stdout/stderr (SCM_RIGHTS); the warm process
  forks, and the child takes them over and runs the same `longloom build` as the client would have.
  Output goes straight to the client's terminal or pipes; the exit status comes back to the client.
- Ctrl-C (SIGINT), SIGTERM and SIGHUP of the client are forwarded to the child. A client killed by
  SIGKILL closes the socket; the child sees it, interrupts itself as a Ctrl-C would, and is killed
  after a grace period: nothing is left running for a client that is gone.
- The warm process is only used if it was started from the same code and environment as the
  client: a fingerprint of the interpreter, `sys.path`, the mtimes and sizes of Longloom's sources and
  of the folders holding installed packages, and the environment (hashed, never stored). Anything else
  replaces it with a new one (the first build after a change pays the imports once more).
- It forks only while it has a single Python thread (checked), so the child inherits no interpreter
  lock held by a thread that does not exist in it. Two libraries it imports start native threads
  (numpy's OpenBLAS pool, pyarrow's jemalloc background thread); both register fork handlers
  (`pthread_atfork`) that leave their state consistent in the child.

No library does this: `multiprocessing`'s forkserver serves Python callables of one parent, not
another command's terminal, environment and signals.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from flows.api import (
    ApiError,
    find_or_start_kept,
    home_lock,
    kept_server,
    limit_malloc_arenas,
    prefect_home,
    read_record,
    write_record,
)
from pipeline.core.helpers import end_processes, process_identity, same_process
from pipeline.core.progress import waiting

ENV = "LONGLOOM_WARM_BUILD"  # "0": every build imports Prefect itself (for A/B measurements)
RECORD_NAME = "longloom-warm.json"
CODE_ROOT = Path(__file__).resolve().parent.parent
# what a child imports anyway on a build (measured: modules new in `sys.modules` after a build that
# started from `import flows.build`); each is optional, a missing one is imported by the child if needed
PRELOAD = (
    "flows.build",
    "flows.early",
    "fastapi.encoders",  # Prefect's serialize_parameters
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.client.orchestration",
    "prefect.artifacts",
    "prefect.events.worker",
    "prefect.logging.handlers",
    "pandas",
    "matplotlib.pyplot",
    "pipeline.output.card",
    "pipeline.output.export",
    "tiktoken",
    "fastokens",
    "quicktok",
)
# the folders of `sys.path` that installers write packages into (pip, Debian's python3-* packages)
PACKAGE_FOLDERS = frozenset({"site-packages", "dist-packages"})
# set by a shell, a terminal or a login session, different in every window or tab, and read by none of
# the imports above (the child still gets them, with the rest of the command's environment): they do
# not make a new warm process
VOLATILE_ENV = frozenset(
    {"PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES", "WINDOWID", "TERM_SESSION_ID", "ITERM_SESSION_ID"}
    | {"KITTY_WINDOW_ID", "WT_SESSION", "TMUX", "TMUX_PANE", "STY", "SSH_CLIENT", "SSH_CONNECTION"}
    | {"SSH_TTY", "GPG_TTY", "XDG_SESSION_ID", "XDG_VTNR"}
)
Command = Callable[[list[str]], int]  # `flows.cli.main`, passed in: this module does not import the CLI
GRACE = 30.0  # seconds a child whose client is gone gets to stop after its interrupt
REQUEST_TIMEOUT = 5.0  # seconds the warm process waits for a connected client's request
GRACE_ENV = "LONGLOOM_WARM_GRACE"  # seconds instead of GRACE (the client's environment; tests lower it)
_IN_CHILD = False  # set in a forked child: its build runs here, it never hands over again
_finishing = threading.Event()  # set in a child once its build returned


class WarmError(RuntimeError):
    """The warm build process could not be started or reached."""


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get(ENV, "1") != "0" and not _IN_CHILD


def fingerprint(env: dict[str, str] | None = None) -> str:
    """What a warm process's imports depend on: interpreter, import path, sources, packages, env."""
    h = hashlib.sha256()
    h.update(sys.executable.encode())
    for entry in sys.path:
        h.update(b"\0path\0" + entry.encode())
        # a package (un)installed changes its folder's mtime. Only package folders count: a source
        # checkout or working folder on the path gets new entries all the time (an output folder, a
        # tool's cache, an editor's swap file), and each one replaced the warm process for nothing
        if Path(entry).name in PACKAGE_FOLDERS:
            with contextlib.suppress(OSError):
                h.update(struct.pack("<q", os.stat(entry).st_mtime_ns))
    for folder in ("flows", "pipeline", "schemas"):
        for path in sorted((CODE_ROOT / folder).rglob("*.py")):
            st = path.stat()
            h.update(f"\0{path}\0{st.st_mtime_ns}\0{st.st_size}".encode())
    for key, value in sorted((env if env is not None else os.environ).items()):
        if key not in VOLATILE_ENV:
            h.update(f"\0env\0{key}\0{value}".encode())
    return h.hexdigest()


def _socket_name(home: Path, fp: str) -> str:
    # Linux's abstract namespace: no file to leave behind and no path-length limit; who may connect is
    # checked on every connection (the peer's uid, SO_PEERCRED)
    key = hashlib.sha256(f"{home.resolve()}\0{fp}".encode()).hexdigest()[:24]
    return f"\0longloom-warm-{key}"


@dataclass
class Warm:
    pid: int
    address: str


def _stop(record: dict[str, Any], grace: float = 10.0) -> psutil.Process | None:
    proc = same_process(record)
    if proc is not None:
        end_processes([proc], grace)
    return proc


def stop(home: Path | None = None) -> str | None:
    """End the warm process recorded under the Prefect home (builds it runs go on); a line, or None."""
    home = home or prefect_home()
    record = read_record(home, RECORD_NAME)
    (home / RECORD_NAME).unlink(missing_ok=True)
    proc = _stop(record) if record else None
    return f"stopped the warm build process (pid {proc.pid})" if proc else None


def status(home: Path | None = None) -> str | None:
    """A line on the warm process recorded under the Prefect home, or None if none runs."""
    record = read_record(home or prefect_home(), RECORD_NAME)
    proc = same_process(record) if record else None
    if proc is None:
        return None
    with contextlib.suppress(psutil.Error):
        forks = len(proc.children())
        mib = proc.memory_info().rss / 2**20
        return f"warm build process: pid {proc.pid}, {mib:.0f} MiB, running {forks} build(s)"
    return None


def find_or_start(home: Path, timeout: float = 120.0) -> Warm:
    """The warm process for this client's fingerprint: the recorded one, or a new one (an older one
    with another fingerprint is stopped first), waited for until it listens."""
    fp = fingerprint()
    with home_lock(home):
        record = read_record(home, RECORD_NAME)
        if record and record.get("fingerprint") == fp and same_process(record) is not None:
            return Warm(int(record["pid"]), str(record["address"]))
        if record:
            _stop(record)
            (home / RECORD_NAME).unlink(missing_ok=True)
        address = _socket_name(home, fp)
        log = home / "longloom-warm.log"
        # -P: the client's folder is not put first on the warm process's import path (a user's own
        # `pipeline/` or `schemas/` there was imported instead of Longloom's); it gets the client's path
        cmd = [sys.executable, "-P", "-m", "flows.cli", "warm-process", str(home), address.lstrip("\0")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=os.getcwd(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of this build does not reach it
            )
        record = {**process_identity(psutil.Process(proc.pid)), "address": address, "fingerprint": fp}
        write_record(home, RECORD_NAME, record)
        with waiting("starting Longloom's warm build process (imports Prefect once for later builds)"):
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    (home / RECORD_NAME).unlink(missing_ok=True)
                    tail = " ".join(log.read_text(errors="replace").splitlines()[-3:])
                    raise WarmError(f"the warm build process exited ({tail}; log {log})")
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(address)
                    s.sendall(struct.pack("!I", 0))  # a probe: the warm process closes it unanswered
                    return Warm(proc.pid, address)
                if time.monotonic() > deadline:
                    _stop(record)
                    raise WarmError(
                        f"the warm build process did not listen within {timeout:.0f} s (log {log})"
                    )
                time.sleep(0.1)


# --- the client: `longloom build` handing its run over ------------------------------------------------


def _std_fds() -> list[int]:
    """fds 0, 1, 2 to pass on; a closed one is passed as /dev/null."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def hand_over(argv: list[str]) -> int | None:
    """Run `longloom <argv>` in a child of the warm process; its exit status, or None (a line said why)
    when this build should run here after all."""
    home = prefect_home()
    try:
        find_or_start_kept(home)  # first: its start-up overlaps the warm process's imports
        warm = find_or_start(home)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(warm.address)
    except (WarmError, ApiError, OSError) as err:
        print(f"longloom: running this build in this process: {err}", file=sys.stderr, flush=True)
        return None
    umask = os.umask(0)
    os.umask(umask)
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "umask": umask, "env": dict(os.environ)}).encode()
    with conn:
        try:
            socket.send_fds(conn, [struct.pack("!I", len(payload)) + payload], _std_fds())
            replies = conn.makefile("rb")
            first = replies.readline()
        except OSError:  # the warm process ended meanwhile (replaced by a client of another fingerprint)
            first = b""
        if not first:
            print(
                "longloom: the warm build process did not start the build; running it here", file=sys.stderr
            )
            return None
        child = int(json.loads(first)["pid"])

        forwarded: list[int] = []

        def forward(signum: int, frame: Any) -> None:
            forwarded.append(signum)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, forward)
        for line in replies:
            msg = json.loads(line)
            if "exit" in msg:
                return int(msg["exit"])
    if forwarded and forwarded[-1] != signal.SIGINT:
        # the child died of the SIGTERM/SIGHUP it was sent, without an exit status: so does the client,
        # as it would have run the build itself (its parent sees "killed by SIGTERM", not a status 1)
        signal.signal(forwarded[-1], signal.SIG_DFL)
        os.kill(os.getpid(), forwarded[-1])
    print(f"error: the build process (pid {child}) ended without an exit status", file=sys.stderr)
    return 1


# --- the warm process ------------------------------------------------------------------------------------


def serve(home: Path, address: str, command: Command) -> None:
    """Listen on `address`, fork a child per build that runs `command(argv)` (`flows.cli.main`); return
    when the kept server is gone or on SIGTERM."""
    limit_malloc_arenas()  # inherited by every child (see flows.api)
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)
    assert threading.active_count() == 1, [t.name for t in threading.enumerate()]  # fork-safe
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(16)
    server.settimeout(2.0)
    print(f"warm build process {os.getpid()} listening", flush=True)
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if kept_server(home) is None:  # `longloom server stop`, or the server died
                print("the kept Prefect server is gone: exiting", flush=True)
                return
            continue
        # a client sends its request at once; one that connects and stays silent (stopped, hung) must
        # not hold up every later build: it gets REQUEST_TIMEOUT seconds (a socket timeout is an OSError)
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError) as err:
            print(f"a connection was refused: {err}", flush=True)
            conn.close()
            continue
        conn.settimeout(None)
        if request is None:  # a probe
            conn.close()
            continue
        if os.fork() == 0:
            server.close()
            conn.settimeout(None)
            _child(conn, request, fds, command)  # never returns
        conn.close()
        for fd in fds:
            os.close(fd)


def _receive(conn: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid():
        raise ValueError(f"a process of uid {uid} may not run builds here")
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < 4:
        more = conn.recv(1 << 16)
        if not more:
            raise ValueError("the client went away")
        data += more
    (size,) = struct.unpack("!I", data[:4])
    if size == 0:
        return None, fds
    body = data[4:]
    while len(body) < size:
        more = conn.recv(size - len(body))
        if not more:
            raise ValueError("the client went away mid-request")
        body += more
    if len(fds) != 3:
        raise ValueError("the client passed no stdin/stdout/stderr")
    return json.loads(body), fds


def _grace() -> float:
    try:
        return float(os.environ.get(GRACE_ENV) or GRACE)
    except ValueError:
        return GRACE


def _watch_client(conn: socket.socket) -> None:
    """In the child: the client never sends after its request, so EOF means it is gone (killed)."""
    with contextlib.suppress(OSError):
        while conn.recv(1024):
            pass
    if _finishing.is_set():
        return
    os.kill(os.getpid(), signal.SIGINT)  # stop as a Ctrl-C would: temporaries removed, lock released
    time.sleep(_grace())
    os.kill(os.getpid(), signal.SIGKILL)


def _child(conn: socket.socket, request: dict[str, Any], fds: list[int], command: Command) -> None:
    """Become the client's build process: its fds, folder, umask, environment and signals; then run."""
    global _IN_CHILD
    _IN_CHILD = True
    rc = 1
    try:
        os.setpgid(0, 0)  # its own group: the warm process's signals stay its own
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # subprocess.wait needs its children's statuses
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, io.TextIOWrapper):  # decided when the warm process started: again
                stream.reconfigure(line_buffering=stream.isatty() or stream is sys.stderr)
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[ENV] = "0"  # and never again from what it starts
        argv = [str(a) for a in request["argv"]]
        sys.argv = ["longloom", *argv]
        # Prefect's settings and console logging, as an `import prefect` in this folder and environment
        from prefect.context import refresh_global_settings_context
        from prefect.logging.configuration import setup_logging

        refresh_global_settings_context()
        setup_logging(incremental=False)
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        threading.Thread(
            target=_watch_client, args=(conn,), name="longloom-client-watch", daemon=True
        ).start()
        rc = command(argv)
    except SystemExit as done:
        rc = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        rc = 130
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        try:
            _exit_status(conn, rc)
        finally:
            os._exit(rc)


def _exit_status(conn: socket.socket, rc: int) -> None:
    """The end of a child: what a normal exit runs, then the status to the client (who then leaves)."""
    import atexit

    _finishing.set()  # the client's EOF from here on is its normal goodbye
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()  # Prefect's last log and event flushes, as at a normal exit
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"exit": rc}).encode() + b"\n")
