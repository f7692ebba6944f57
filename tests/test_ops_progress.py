"""Progress while waiting: long waits say what they do, log lines never land inside a bar, no telemetry."""

from __future__ import annotations

import io
import logging
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from pipeline.core.progress import BarReporter, waiting
from tests.conftest import ROOT
from tests.opskit import base_env


def screen_lines(raw: str) -> list[str]:
    """What a terminal shows for `raw`: `\\r` returns to column 0 and later text overwrites."""
    shown = []
    for line in raw.split("\n"):
        cells: list[str] = []
        col = 0
        for ch in line:
            if ch == "\r":
                col = 0
                continue
            if col < len(cells):
                cells[col] = ch
            else:
                cells.append(ch)
            col += 1
        shown.append("".join(cells).rstrip())
    return shown


def test_log_lines_are_written_above_the_bars_not_into_them() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    buf = io.StringIO()
    logger = logging.getLogger("longloom.test-bars")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = PrefectConsoleHandler(stream=buf)  # the handler Prefect prints INFO lines with
    handler.setFormatter(logging.Formatter("INFO | %(message)s"))
    logger.addHandler(handler)
    try:
        bars = BarReporter(file=buf, force=True)
        bars.start("prepare", 4, "shards")
        bars.advance("prepare", label="a", tokens=1000)
        for i in range(3):
            logger.info("shard %d: 1510 records", i)
            bars.advance("prepare", label=f"b{i}", tokens=10)
        bars.close()
        logger.info("after the bars")
    finally:
        logger.removeHandler(handler)
    shown = screen_lines(buf.getvalue())
    for i in range(3):
        assert f"INFO | shard {i}: 1510 records" in shown, shown
    assert "INFO | after the bars" in shown
    assert not any("prepare" in line and "INFO" in line for line in shown), shown
    assert "emit" not in handler.__dict__  # the handler is restored after the bars close


def test_a_long_wait_says_what_it_is_doing_and_a_short_one_says_nothing() -> None:
    out = io.StringIO()  # not a terminal: plain lines
    with waiting("distilling", file=out, after=0.2, every=0.3) as w:
        w.step("tokens 0-4096")
        time.sleep(0.9)
        w.step("saving")
        time.sleep(0.4)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("longloom: distilling: tokens 0-4096 (")
    assert any(": saving (" in line for line in lines)
    assert len(lines) >= 3 and lines[-1].startswith("longloom: distilling: done in ")
    quiet = io.StringIO()
    with waiting("quick", file=quiet, after=2.0):
        time.sleep(0.05)
    assert quiet.getvalue() == ""


def test_no_telemetry_notice_on_a_terminal(tmp_path: Path) -> None:
    """Prefect prints its telemetry notice on a terminal unless DO_NOT_TRACK is set: a real pty."""
    env = base_env(PREFECT_HOME=str(tmp_path / "home"))
    for key in ("DO_NOT_TRACK", "CI", "GITHUB_ACTIONS", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        env.pop(key, None)
    code = "import flows.build"
    main, child = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdin=child, stdout=child, stderr=child
    )
    os.close(child)
    chunks = []
    while True:
        ready, _, _ = select.select([main], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    p.wait(timeout=60)
    os.close(main)
    text = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0, text
    assert "anonymous usage data" not in text
