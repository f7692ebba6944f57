"""The first stage's units started before Prefect is imported, then adopted by the flow as task runs.

`longloom build` spends its first seconds on work that does not need the Prefect API: importing
Prefect and `flows.build`, waiting for the API, creating the flow run. The first stage (prepare:
read, filter, tokenize each input shard) needs nothing of that, so `early_start()` starts its units
on plain threads right after preflight, holding the output folder's lock as the flow would. When the
flow reaches that stage the threads pick up no more units and the flow maps its task runs as usual;
each task run *adopts* its unit (`adopt()`): a unit no early thread picked up is run by the task
itself; a unit already running (or done) is waited for, and its result, log line and failure (retried
by the task like any other) are the task run's. So the flow run still has one task run per unit with
the unit's log line, and no more units run at once than the flow's own runner runs (`run.workers`).

Only for the thread runner on a local output folder: Dask workers build their own tokenizer in other
processes, and an output on an object store is mirrored by the tasks themselves.

This module must not import Prefect (that is the point); `tests/test_flow_early.py` checks it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from flows.api import temporary_server_pids
from pipeline.core import storage
from pipeline.core.helpers import forget_helpers, reap_orphans, record_helpers
from pipeline.core.progress import UnitProgress
from pipeline.core.workdir import WorkDir
from pipeline.stages.base import Inputs, RunContext, StageWork
from pipeline.stages.plan import enabled_stages
from schemas.config import BuildConfig

ENV = "LONGLOOM_EARLY_START"  # "0": run every unit as a task from the start (for A/B measurements)


class Relay:
    """A unit's progress callback that says nothing until a task run adopts the unit, then logs there."""

    def __init__(self) -> None:
        self.target: UnitProgress | None = None

    def __call__(self, counts: Any) -> None:
        target = self.target
        if target is not None:
            target(counts)


@dataclass
class _Unit:
    unit: Any
    relay: Relay = field(default_factory=Relay)
    future: Future[Any] | None = None  # set when an early thread picked the unit up
    taken: bool = False  # a task run took it back before any thread picked it up


@dataclass
class EarlyStart:
    """The first stage's units, running or queued on `threads` plain threads (see the module docstring)."""

    cfg: BuildConfig
    stage: str
    key: str
    job: StageWork
    units: list[_Unit]
    started: float = field(default_factory=time.perf_counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: bool = False
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, threads: int) -> None:
        for i in range(max(1, min(threads, len(self.units)))):
            t = threading.Thread(target=self._work, name=f"longloom-early-{i}", daemon=True)
            # daemon: a Ctrl-C ends the process without waiting for a shard to finish (its temporary
            # files are removed by the next run, as after a kill)
            t.start()
            self._threads.append(t)

    def _next(self) -> _Unit | None:
        with self._lock:
            if self._stop:
                return None
            for u in self.units:
                if u.future is None and not u.taken:
                    u.future = Future()
                    u.future.set_running_or_notify_cancel()
                    return u
        return None

    def _work(self) -> None:
        while (u := self._next()) is not None:
            assert u.future is not None
            try:
                u.future.set_result(self.job.run_unit(u.unit, u.relay))
            except BaseException as err:  # handed to the task run that adopts the unit
                u.future.set_exception(err)

    def adopt(self, key: str, unit: Any, progress: UnitProgress | None) -> Future[Any] | None:
        """The early run of `unit` for the stage keyed `key`, to wait for; None: the caller runs it.

        Each unit is handed out once: a retry of the task run that adopted it runs the unit itself."""
        if key != self.key:
            return None
        with self._lock:
            for u in self.units:
                if u.unit == unit and not u.taken:
                    u.taken = True
                    u.relay.target = progress
                    return u.future  # None if no thread picked it up: the task runs it
        return None

    def stop(self) -> None:
        """Hand out no more units (those running finish on their own)."""
        with self._lock:
            self._stop = True

    def wait_running(self) -> None:
        """Wait for the units threads have picked up (before the output folder's lock is released)."""
        for t in self._threads:
            t.join()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # stdout is the build's JSON result


_ACTIVE: dict[str, EarlyStart] = {}  # by output folder (`WorkDir.root`)


def enabled(cfg: BuildConfig) -> bool:
    return (
        os.environ.get(ENV, "1") != "0"
        and cfg.run.task_runner == "threads"
        and not storage.is_remote(cfg.output.dir)
    )


@contextlib.contextmanager
def early_start(cfg: BuildConfig, command: str | None, shards: list[Any]) -> Iterator[EarlyStart | None]:
    """Take the output folder's lock and start the first stage's units on threads (see the module
    docstring); the flow started inside the block adopts them (`active()`). Yields None (and does
    nothing) when early start does not apply."""
    stages = enabled_stages(cfg)
    if not enabled(cfg) or not stages or stages[0].name != "prepare":
        yield None
        return
    work = WorkDir(cfg)
    with work.lock(_say):
        reap_orphans(work.root, _say)  # a killed run's helpers go before anything is written
        # this run's temporary API, recorded from now on: a kill -9 from here leaves no unknown orphan
        record = record_helpers(work.root, temporary_server_pids())
        work.remove_temporaries()
        job = stages[0].bind(RunContext(cfg, command), Inputs(shards=shards))
        early = EarlyStart(cfg, stages[0].name, job.key, job, [_Unit(u) for u in job.units()])
        early.start(cfg.run.workers)
        _ACTIVE[str(work.root)] = early
        interrupted = True
        try:
            yield early
            interrupted = False
        except Exception:
            interrupted = False
            raise
        finally:
            _ACTIVE.pop(str(work.root), None)
            early.stop()
            if not interrupted:  # Ctrl-C: exit now, the process's end releases the lock
                early.wait_running()  # nothing is still writing when the lock goes
            forget_helpers(record)


def active(cfg: BuildConfig) -> EarlyStart | None:
    """The early start holding `cfg`'s output folder in this process, if any."""
    return _ACTIVE.get(str(WorkDir(cfg).root))
