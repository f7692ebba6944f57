"""`longloom cluster`: check a Dask cluster before a build runs on it, or start one on this machine.

`check` runs one small function on every worker of a running scheduler (`Client.run`) and on the client,
and compares what matters for a build: the same Longloom (version and commit) and the same versions of
the packages that ship tasks and read files, the flow's Prefect API reachable from the worker, the
output store listable and writable with the credentials the worker finds in its own environment (a
probe object written, then deleted), and free space in the worker's scratch folder. It prints one
line per worker and one line per problem; no credential is printed (URLs go through `redact_url`,
errors through `storage.explain`).

`local` starts a `dask scheduler` and N `dask worker` processes on this machine to try the recipe, and
stops them all on Ctrl-C (or when it is terminated).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from pipeline.core import storage
from pipeline.core.helpers import die_with_parent
from schemas.redact import redact_url

# What must match between the client and the workers: tasks are pickled by reference to Longloom's
# modules and to these packages' classes (a different version can fail to unpickle, or run other code).
PACKAGES = (
    "prefect",
    "prefect-dask",
    "dask",
    "distributed",
    "cloudpickle",
    "pydantic",
    "numpy",
    "pyarrow",
    "fsspec",
    "s3fs",
)
MIN_FREE_BYTES = 1 << 30  # below 1 GiB of scratch a worker cannot hold a prepared shard's mirror
API_TIMEOUT = 5.0


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def _commit() -> str | None:
    from pipeline.build import longloom_commit

    return longloom_commit()


def _check_api(url: str | None) -> str | None:
    """None if the Prefect API at `url` answers its health check, else what went wrong (one phrase)."""
    if not url:
        return None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=API_TIMEOUT) as r:
            if r.status == 200:
                return None
            return f"answered HTTP {r.status}"
    except urllib.error.HTTPError as err:
        return f"answered HTTP {err.code}"
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"cannot reach it ({reason})"


def _check_store(output: str | None) -> str | None:
    """None if this process can list the output's bucket and write and delete a probe object under the
    output prefix with the credentials it finds, else what is missing (one phrase, no secret)."""
    if not output or not storage.is_remote(output):
        return None
    name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        storage.write_probe(f"{output.rstrip('/')}/.longloom/probes/{name}")
    except Exception as err:  # backends raise anything: one phrase
        return storage.explain(err)
    return None


def _free_scratch() -> tuple[str, int]:
    """This machine's scratch folder (mirrors, input cache) and the bytes free where it is (or would be)."""
    root = storage.scratch_root()
    where = root
    while not where.exists() and where.parent != where:
        where = where.parent
    return str(root), shutil.disk_usage(where).free


def probe(output: str | None, api_url: str | None) -> dict[str, Any]:
    """What `check` compares, measured in the process that runs it (a worker, or the client)."""
    scratch, free = _free_scratch()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "longloom": _version("longloom"),
        "commit": _commit(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "api": _check_api(api_url),
        "store": _check_store(output),
        "scratch": scratch,
        "free": free,
    }


@dataclass
class Report:
    """`check`'s answer: one line per process checked, one line per problem."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def compare(
    client: dict[str, Any], workers: dict[str, dict[str, Any]], output: str | None, api_url: str | None
) -> Report:
    """The lines and problems of `check` from the client's probe and each worker's (by address)."""
    rep = Report()
    shown_out = storage.shown(output) if output else None
    api = redact_url(api_url) if api_url else None

    def describe(who: str, p: dict[str, Any]) -> str:
        pk = p["packages"]
        parts = [
            f"{who} ({p['host']}, pid {p['pid']}): longloom {p['longloom']} @ {p['commit'] or 'no commit'}",
            f"python {p['python']}",
            ", ".join(f"{n} {pk[n]}" for n in PACKAGES),
        ]
        if api:
            parts.append(f"api {api}: {'ok' if p['api'] is None else 'FAILED'}")
        if shown_out and storage.is_remote(output or ""):
            parts.append(f"store {shown_out}: {'list/write/delete ok' if p['store'] is None else 'FAILED'}")
        parts.append(f"scratch {p['scratch']}: {_gb(p['free'])} free")
        return "; ".join(parts)

    rep.lines.append(describe("client", client))
    if not workers:
        rep.problems.append("the scheduler has no workers: start `dask worker <address>` on each machine")
    for addr, p in sorted(workers.items()):
        who = f"worker {addr}"
        rep.lines.append(describe(who, p))
        if (p["longloom"], p["commit"]) != (client["longloom"], client["commit"]):
            rep.problems.append(
                f"{who}: longloom {p['longloom']} @ {p['commit']}, the client has {client['longloom']} @ "
                f"{client['commit']}: install the same commit on every machine"
            )
        if p["python"].rsplit(".", 1)[0] != client["python"].rsplit(".", 1)[0]:
            rep.problems.append(f"{who}: python {p['python']}, the client has {client['python']}")
        differ = [n for n in PACKAGES if p["packages"][n] != client["packages"][n]]
        if differ:
            got = ", ".join(f"{n} {p['packages'][n]} (client {client['packages'][n]})" for n in differ)
            rep.problems.append(f"{who}: package versions differ from the client's: {got}")
        if p["api"] is not None:
            rep.problems.append(
                f"{who}: the Prefect API {api} {p['api']}: run `longloom server --host 0.0.0.0` and set "
                "PREFECT_API_URL to an address the workers can reach"
            )
        if p["store"] is not None:
            rep.problems.append(f"{who}: store {shown_out}: {p['store']}")
        if p["free"] < MIN_FREE_BYTES:
            rep.problems.append(
                f"{who}: {_gb(p['free'])} free in {p['scratch']}: set LONGLOOM_SCRATCH to a larger disk"
            )
    if client["store"] is not None:
        rep.problems.append(f"client: store {shown_out}: {client['store']}")
    return rep


def check(
    address: str, output: str | None = None, api_url: str | None = None, timeout: float = 30.0
) -> Report:
    """Probe every worker of the scheduler at `address` and this process; see the module docstring.

    `api_url`: the Prefect API the build's workers report to (the client's PREFECT_API_URL)."""
    from distributed import Client

    try:
        client = Client(address, timeout=timeout)
    except OSError as err:
        return Report(problems=[f"scheduler {redact_url(address)}: cannot connect ({err})"])
    with client:
        answers = client.run(probe, output, api_url, on_error="return")
    workers = {a: r for a, r in answers.items() if isinstance(r, dict)}
    rep = compare(probe(output, api_url), workers, output, api_url)
    for addr, failure in sorted(answers.items()):
        if not isinstance(failure, dict):  # e.g. a worker without this Longloom cannot import the probe
            what = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
            rep.problems.append(
                f"worker {addr}: the probe failed ({what}): install the same Longloom everywhere"
            )
    return rep


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Each child in a session of its own, so that Ctrl-C at the terminal reaches only `cluster local`, which
# stops the workers and then the scheduler (the whole group's SIGINT raced: a worker could exit before
# the parent saw the interrupt and looked like a crash); and each gets SIGTERM if `cluster local` dies,
# even by SIGKILL (Linux), so no orphan stays behind.
_OWN_SESSION: dict[str, Any] = {"start_new_session": True, "preexec_fn": die_with_parent}


@contextlib.contextmanager
def local_cluster(
    workers: int, port: int | None = None, host: str = "127.0.0.1", nthreads: int = 1
) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """A `dask scheduler` and `workers` `dask worker` processes on this machine; yields the scheduler's
    address and the processes. All are stopped on exit (terminated, then killed after 10 s)."""
    port = port or _free_port()
    address = f"tcp://{host}:{port}"
    dask = [sys.executable, "-m"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    *dask,
                    "distributed.cli.dask_scheduler",
                    "--host",
                    host,
                    "--port",
                    str(port),
                    "--no-dashboard",
                ],
                **_OWN_SESSION,
            )
        )
        for i in range(workers):
            procs.append(
                subprocess.Popen(
                    [
                        *dask,
                        "distributed.cli.dask_worker",
                        address,
                        "--nthreads",
                        str(nthreads),
                        "--no-dashboard",
                        "--name",
                        f"local-{i}",
                    ],
                    **_OWN_SESSION,
                )
            )
        yield address, procs
    finally:
        for p in reversed(procs):  # workers first, then the scheduler
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: `local` stops its processes."""
    raise KeyboardInterrupt


def run_local(workers: int, port: int | None = None) -> int:
    """`longloom cluster local`: start the cluster, print how to use it, wait for Ctrl-C."""
    signal.signal(signal.SIGTERM, _interrupt)
    with local_cluster(workers, port) as (address, procs):
        from distributed import Client

        with Client(address, timeout=120) as client:
            client.wait_for_workers(workers, timeout=120)
        print(f"scheduler {address} (pid {procs[0].pid})", flush=True)
        for p in procs[1:]:
            print(f"worker pid {p.pid}", flush=True)
        print(
            f"ready: longloom build CONFIG --dask-address {address}   (Ctrl-C stops the cluster)", flush=True
        )
        # Ctrl-C stops the cluster: set here, after the dask client, whose event loop may have replaced
        # the SIGINT handler (the loop below would then never see the interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        try:
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping the cluster", flush=True)
            return 0
        gone = [p.pid for p in procs if p.poll() is not None]
        print(f"error: process {gone[0]} of the cluster exited; stopping the others", file=sys.stderr)
        return 1
