"""Progress of long stages: bars on a terminal, throttled lines in logs.

Two levels. A stage function (prepare_shard, write_shard) takes an optional `UnitProgress`
callback and calls it with running counts of the one unit it works on (records and tokens read so
far, rows written). The orchestrator (run_build, the flow) owns a `Reporter` and advances it once per
finished unit, so the same bars work whether units run in threads here or on Dask workers elsewhere.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

UnitProgress = Callable[[Mapping[str, int]], None]
LogFn = Callable[[str], Any]


def human(n: float) -> str:
    """1234567 -> '1.23M': short counts for progress lines."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def format_counts(counts: Mapping[str, int]) -> str:
    return " ".join(f"{k}={human(v)}" for k, v in counts.items())


class Reporter:
    """Counts finished units per stage. This base class shows nothing (library use, tests)."""

    def start(self, stage: str, total: int, unit: str) -> None:
        """A stage begins with `total` units of work."""

    def advance(self, stage: str, n: int = 1, label: str | None = None, **counts: int) -> None:
        """`n` more units of `stage` are done (`label` names it); `counts` add to the stage's totals."""

    def unit(self, stage: str, label: str) -> UnitProgress | None:
        """A callback for live progress inside one unit running in this process, if shown at all."""
        return None

    def close(self) -> None:
        """Finish every bar or line."""


class _Totals:
    """Per-stage unit counts and summed counters, shared by the reporters below."""

    def __init__(self) -> None:
        self.total: dict[str, int] = {}
        self.unit_name: dict[str, str] = {}
        self.done: dict[str, int] = {}
        self.sums: dict[str, dict[str, int]] = {}

    def start(self, stage: str, total: int, unit: str) -> None:
        self.total[stage], self.unit_name[stage], self.done[stage] = total, unit, 0
        self.sums[stage] = {}

    def add(self, stage: str, n: int, counts: Mapping[str, int]) -> None:
        self.done[stage] = self.done.get(stage, 0) + n
        sums = self.sums.setdefault(stage, {})
        for k, v in counts.items():
            sums[k] = sums.get(k, 0) + v


class LogReporter(Reporter):
    """One line per finished unit (`prepare: 3/5 shards, tokens=1.2M`): for Prefect and plain logs."""

    def __init__(self, log: LogFn) -> None:
        self.log = log
        self.t = _Totals()
        self._lock = threading.Lock()

    def start(self, stage: str, total: int, unit: str) -> None:
        with self._lock:
            self.t.start(stage, total, unit)

    def advance(self, stage: str, n: int = 1, label: str | None = None, **counts: int) -> None:
        with self._lock:
            self.t.add(stage, n, counts)
            done, total = self.t.done[stage], self.t.total.get(stage, 0)
            extra = format_counts(self.t.sums[stage])
            unit = self.t.unit_name.get(stage, "units")
        what = f" ({label})" if label else ""
        self.log(f"{stage}: {done}/{total} {unit}{what}" + (f", {extra}" if extra else ""))


class BarReporter(Reporter):
    """tqdm bars on the terminal, one per stage; hidden when the stream is not a terminal.

    `force=True` shows them anyway (tests, or a log file that should keep them).
    """

    def __init__(self, file: TextIO | None = None, force: bool = False) -> None:
        self.file = file or sys.stderr
        self.disable: bool | None = False if force else None  # None: tqdm hides bars off a terminal
        self.t = _Totals()
        self._bars: dict[str, Any] = {}
        self._live: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def start(self, stage: str, total: int, unit: str) -> None:
        from tqdm import tqdm

        with self._lock:
            for bar in self._bars.values():  # stages run one after another
                bar.close()
            self.t.start(stage, total, unit)
            self._live[stage] = {}
            self._bars[stage] = tqdm(
                total=total,
                desc=f"{stage:<8}",
                unit=f" {unit}",
                file=self.file,
                disable=self.disable,
                leave=True,
            )

    def advance(self, stage: str, n: int = 1, label: str | None = None, **counts: int) -> None:
        with self._lock:
            self.t.add(stage, n, counts)
            if label is not None:
                self._live.get(stage, {}).pop(label, None)
            bar = self._bars.get(stage)
            if bar is not None:
                bar.update(n)
                bar.set_postfix_str(format_counts(self.t.sums[stage]), refresh=True)
                if self.t.done[stage] >= self.t.total.get(stage, 0):
                    bar.close()  # finished bars print once and stop taking a terminal line
                    del self._bars[stage]

    def unit(self, stage: str, label: str) -> UnitProgress | None:
        def show(counts: Mapping[str, int]) -> None:
            with self._lock:
                bar = self._bars.get(stage)
                if bar is None:
                    return
                live = self._live.setdefault(stage, {})
                live[label] = format_counts(counts)
                done = format_counts(self.t.sums[stage])
                running = "; ".join(f"{k} {v}" for k, v in live.items())
                bar.set_postfix_str(f"{done} | {running}" if done else running, refresh=True)

        return show

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()


def throttled(log: LogFn, label: str, every: float = 10.0) -> UnitProgress:
    """A UnitProgress that logs `label: records=.. tokens=..` at most every `every` seconds."""
    last = [time.monotonic()]

    def report(counts: Mapping[str, int]) -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            log(f"{label}: {format_counts(counts)}")

    return report


def both(*callbacks: UnitProgress | None) -> UnitProgress | None:
    """Call every given callback (None ones are skipped); None if there are none."""
    live = [c for c in callbacks if c is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def call(counts: Mapping[str, int]) -> None:
        for c in live:
            c(counts)

    return call


_active: Reporter | None = None


def active_reporter() -> Reporter | None:
    """The reporter a command line installed for the run in this process, if any."""
    return _active


@contextlib.contextmanager
def use_reporter(reporter: Reporter) -> Iterator[Reporter]:
    """Install `reporter` for runs started in this process (the flow picks it up), then close it."""
    global _active
    previous, _active = _active, reporter
    try:
        yield reporter
    finally:
        _active = previous
        reporter.close()
