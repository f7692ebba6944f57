"""Progress bars and log lines, the per-run report, and the operations commands of the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from pipeline.build import run_build
from pipeline.core.progress import BarReporter, LogReporter, throttled
from tests.conftest import ROOT, make_config


def test_bars_count_units_and_show_live_counts() -> None:
    buf = io.StringIO()
    bars = BarReporter(file=buf, force=True)
    bars.start("prepare", 3, "shards")
    live = bars.unit("prepare", "wiki-00000")
    assert live is not None
    live({"records": 1500, "tokens": 2_000_000})
    assert "wiki-00000 records=1.5k tokens=2M" in buf.getvalue()
    for _ in range(3):
        bars.advance("prepare", label="wiki-00000", tokens=1000)
    bars.close()
    text = buf.getvalue()
    assert "3/3" in text and "tokens=3k" in text


def test_log_reporter_and_throttled_unit_lines() -> None:
    lines: list[str] = []
    rep = LogReporter(lines.append)
    rep.start("write", 2, "shards")
    rep.advance("write", label="a", rows=4)
    rep.advance("write", label="b", rows=4)
    assert lines == ["write: 1/2 shards (a), rows=4", "write: 2/2 shards (b), rows=8"]
    seen: list[str] = []
    cb = throttled(seen.append, "wiki-00000", every=0.0)
    cb({"records": 10})
    assert seen == ["wiki-00000: records=10"]
    quiet = throttled(seen.append, "x", every=3600)
    quiet({"records": 1})
    assert len(seen) == 1


def test_run_report_beside_the_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = run_build(make_config(out))
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == [
        "prepare",
        "select",
        "write",
        "procedural",
        "finalize",
    ]  # the sample writes chat samples too
    assert all(s["seconds"] > 0 for s in stages.values())
    # stages chain: what one lets out, the next takes in
    assert stages["prepare"]["items_out"] == stages["select"]["items_in"]
    assert (
        stages["select"]["tokens_out"]
        == stages["write"]["tokens_in"]
        == sum(t.content_tokens for t in m.targets)
    )
    assert stages["write"]["items_out"] == sum(t.rows for t in m.targets)
    drops = {(d["source"], d["reason"]): d["records"] for d in report["drops"]}
    assert drops == {
        (s, r): n for s, c in m.sources.items() for r, n in {**c.filtered, **c.quarantined}.items()
    }
    assert report["reconciliation"] == {
        "ok": True,
        "passed": len(m.checks),
        "total": len(m.checks),
        "failed": [],
    }
    assert "## Drops by reason" in md and f"{len(m.checks)}/{len(m.checks)} checks pass" in md
    # timings live in the report only: the manifest stays the same run after run
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["seconds"] is None for s in manifest["stages"].values())
    assert manifest["stages"]["write"]["tokens_out"] == stages["write"]["tokens_out"]


def test_cli_lists_operations_commands_and_rejects_a_serve_without_schedule() -> None:
    helptext = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert "serve" in helptext and "server" in helptext
    bad = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve", str(ROOT / "data" / "sample.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "--cron" in bad.stderr
