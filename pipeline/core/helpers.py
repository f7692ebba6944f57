"""Helper processes a run starts (Prefect's temporary API server): recorded, and reaped after a crash.

A `kill -9` of `longloom build` cannot stop the processes it started: Prefect's temporary API server
lives on, re-parented to PID 1, holding ~220 MB and a port. The run records such helpers under its
lock in `.longloom/helpers/<owner pid>.json`; the next run on the same output folder (with or without
Prefect) ends those whose owner is gone before it starts. Identity is pid + start time + command line,
so a pid reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil


def process_identity(p: psutil.Process) -> dict[str, Any]:
    """What identifies a running process across pid reuse: pid, start time, command line."""
    return {"pid": p.pid, "create_time": p.create_time(), "cmdline": p.cmdline()}


def same_process(entry: dict[str, Any]) -> psutil.Process | None:
    """The recorded process if it still runs (same pid, start time and command line), else None."""
    try:
        p = psutil.Process(int(entry["pid"]))
        if abs(p.create_time() - float(entry["create_time"])) < 0.01 and p.cmdline() == entry["cmdline"]:
            return p
    except (psutil.Error, KeyError, TypeError, ValueError):
        pass
    return None


def helpers_dir(work_root: Path) -> Path:
    return work_root / "helpers"


def record_helpers(work_root: Path, pids: list[int]) -> Path | None:
    """Record the helper processes (Prefect's temporary server) this process started for its run.

    Call while holding the run's lock. One file per owning process, so records never clash.
    """
    helpers = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            helpers.append(process_identity(psutil.Process(pid)))
    if not helpers:
        return None
    owner = process_identity(psutil.Process(os.getpid()))
    folder = helpers_dir(work_root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{owner['pid']}.json"
    tmp = folder / f".tmp-{owner['pid']}.json"
    tmp.write_text(json.dumps({"owner": owner, "helpers": helpers}, indent=2))
    os.replace(tmp, path)
    return path


def reap_orphans(work_root: Path, log: Callable[[str], Any], grace: float = 10.0) -> list[int]:
    """End helper processes that earlier runs on this folder recorded and left behind when killed.

    A helper is ended only if its owner is gone and it is still the very process recorded (pid, start
    time and command line match), so a reused pid is never hit. Call while holding the run's lock.
    """
    reaped: list[int] = []
    folder = helpers_dir(work_root)
    for path in sorted(folder.glob("[!.]*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            owner_alive = same_process(record["owner"]) is not None
            helpers = record["helpers"]
        except (OSError, ValueError, KeyError, TypeError):
            owner_alive, helpers = False, []  # a damaged record: nothing it names can be trusted
        if owner_alive:
            continue
        procs = [p for p in (same_process(h) for h in helpers) if p is not None]
        for p in procs:
            log(f"ending {' '.join(p.cmdline()[:3])}... (pid {p.pid}), left running by a killed run")
        end_processes(procs, grace)
        reaped += [p.pid for p in procs]
        path.unlink(missing_ok=True)
    return reaped


def end_processes(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM each, then SIGKILL those still running after `grace` seconds, and wait for them."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)


def forget_helpers(record: Path | None) -> None:
    """The run ended normally and stops its own helpers: drop its record."""
    if record is not None:
        record.unlink(missing_ok=True)


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the process that started it dies, even by SIGKILL
    (Linux; elsewhere nothing), so a helper is never left behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
