"""Progress of long stages: bars on a terminal, throttled lines in logs.

Two levels. A stage function (prepare_shard, write_shard) takes an optional `UnitProgress`
callback and calls it with running counts of the one unit it works on (records and tokens read so
far, rows written). The orchestrator (run_build, the flow) owns a `Reporter` and advances it once per
finished unit, so the same bars work whether units run in threads here or on Dask workers elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
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


class _LogsAboveBars:
    """While bars are shown, console log handlers write through tqdm's write mode.

    A log line written while a bar sits on the terminal's last line would land inside it (one garbled
    line seen with Prefect's INFO lines): tqdm's `external_write_mode` clears the bars, lets the line
    out, then redraws them. Handlers are wrapped in place and restored exactly on `restore`.
    """

    def __init__(self) -> None:
        self._wrapped: list[tuple[logging.Handler, Any]] = []

    def wrap(self) -> None:
        from tqdm import tqdm

        if self._wrapped:
            return
        loggers = [logging.getLogger()] + [
            lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
        ]
        seen: set[int] = set()
        for lg in loggers:
            for h in lg.handlers:
                if id(h) in seen or not isinstance(h, logging.StreamHandler):
                    continue
                if isinstance(h, logging.FileHandler):
                    continue
                seen.add(id(h))
                own = h.__dict__.get("emit")  # normally none: emit is the class's method
                emit = h.emit

                def through_tqdm(record: logging.LogRecord, _emit: Any = emit, _h: Any = h) -> None:
                    with tqdm.external_write_mode(file=_h.stream):
                        _emit(record)

                h.emit = through_tqdm  # type: ignore[method-assign]
                self._wrapped.append((h, own))

    def restore(self) -> None:
        for h, own in self._wrapped:
            if own is None:
                h.__dict__.pop("emit", None)
            else:
                h.emit = own  # type: ignore[method-assign]
        self._wrapped.clear()


class BarReporter(Reporter):
    """tqdm bars on the terminal, one per stage; hidden when the stream is not a terminal.

    `force=True` shows them anyway (tests, or a log file that should keep them). While bars are
    shown, console log lines are written above them, never into them.
    """

    def __init__(self, file: TextIO | None = None, force: bool = False) -> None:
        self.file = file or sys.stderr
        self.disable: bool | None = False if force else None  # None: tqdm hides bars off a terminal
        self.t = _Totals()
        self._bars: dict[str, Any] = {}
        self._live: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._logs = _LogsAboveBars()

    def start(self, stage: str, total: int, unit: str) -> None:
        from tqdm import tqdm

        # at the first bar, not earlier: Prefect configures its console handlers when a flow starts
        self._logs.wrap()
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
        self._logs.restore()


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


class Waiting:
    """A wait in progress: what it is, the current step, and how long it has taken (see `waiting`)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.detail = ""
        self.started = time.monotonic()

    def step(self, detail: str) -> None:
        """Say which part of the wait is running now (e.g. `token vectors 3/8`)."""
        self.detail = detail

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        return f"{self.what}" + (f": {self.detail}" if self.detail else "") + f" ({elapsed:.0f} s)"


@contextlib.contextmanager
def waiting(
    what: str, file: TextIO | None = None, after: float = 2.0, every: float = 10.0, force: bool = False
) -> Iterator[Waiting]:
    """Show that a long wait is in progress, if it lasts over `after` seconds.

    On a terminal: one line (a tqdm status line, so log lines written through tqdm's write mode never
    land inside it) updated every second with the step and elapsed time. Elsewhere (`force` off and
    not a terminal: CI, log files): a line when the wait passes `after` seconds, then every `every`
    seconds, then one saying it is done. Short waits show nothing.
    """
    from tqdm import tqdm

    stream = file or sys.stderr
    w = Waiting(what)
    done = threading.Event()

    def show() -> None:
        if done.wait(after):
            return
        bar = tqdm(
            total=None, file=stream, bar_format="{desc}", disable=None if not force else False, leave=True
        )
        if bar.disable:  # not a terminal: plain lines
            last = -every
            while not done.is_set():
                if time.monotonic() - w.started - last >= every - 0.05:
                    last = time.monotonic() - w.started
                    print(f"longloom: {w.line()}", file=stream, flush=True)
                done.wait(0.5)
            print(
                f"longloom: {w.what}: done in {time.monotonic() - w.started:.0f} s", file=stream, flush=True
            )
            return
        while not done.is_set():
            bar.set_description_str(w.line(), refresh=True)
            done.wait(1.0)
        bar.set_description_str(f"{w.what}: done in {time.monotonic() - w.started:.0f} s", refresh=True)
        bar.close()

    thread = threading.Thread(target=show, name="longloom-waiting", daemon=True)
    thread.start()
    try:
        yield w
    finally:
        done.set()
        thread.join()
