"""The per-run report: time per stage, rows and tokens in and out of each stage, drops by reason, and
whether the counts reconcile. Stored beside the manifest as report.json and report.md.

Division of labour: manifest.json is the account of *what* was built, and is byte-identical for every
run of one config (so no timings in it); the report is the account of *this run*: when it started,
how long each stage took, how many units were redone and how many reused from an interrupted run.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core.parquet_io import atomic_path
from pipeline.core.results import PrepareResult, SelectResult
from schemas.manifest import Manifest, ShardEntry, StageReport

REPORT_FORMAT = "longloom-report@1"


def prepare_counts(prepared: list[PrepareResult]) -> StageReport:
    """Input records in, documents kept by the per-document filters out; tokens likewise."""
    return StageReport(
        items_in=sum(r.records_read for r in prepared),
        items_out=sum(r.kept for r in prepared),
        tokens_in=sum(r.tokens_read for r in prepared),
        tokens_out=sum(r.kept_tokens for r in prepared),
    )


def select_counts(prepared: list[PrepareResult], selected: SelectResult) -> StageReport:
    """Documents and tokens offered to selection, and what was laid out into rows."""
    return StageReport(
        items_in=sum(r.kept for r in prepared),
        items_out=sum(t.documents for t in selected.targets),
        tokens_in=sum(r.kept_tokens for r in prepared),
        tokens_out=sum(t.content_tokens for t in selected.targets),
    )


def write_counts(selected: SelectResult, entries: list[ShardEntry]) -> StageReport:
    """Rows planned in, rows written out; laid-out document tokens in, row tokens (with separators and padding) out."""
    return StageReport(
        items_in=sum(t.n_rows for t in selected.targets),
        items_out=sum(e.rows for e in entries),
        tokens_in=sum(t.content_tokens for t in selected.targets),
        tokens_out=sum(e.tokens for e in entries),
    )


@dataclass
class StageRun:
    """How one stage went in this run: wall time, units of work, units reused from an earlier run."""

    seconds: float = 0.0
    units: int = 0
    reused: int = 0


@dataclass
class RunClock:
    """Times the stages of one run."""

    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    stages: dict[str, StageRun] = field(default_factory=dict)
    _t0: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRun]:
        run = StageRun()
        t0 = time.perf_counter()
        try:
            yield run
        finally:
            run.seconds = round(time.perf_counter() - t0, 3)
            self.stages[name] = run

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self._t0, 3)


def build_report(
    manifest: Manifest, clock: RunClock, output_dir: str, runner: str, command: str | None = None
) -> dict[str, Any]:
    """The report as a JSON-ready dict, from the manifest (counts) and the clock (timings)."""
    stages = []
    for name, run in clock.stages.items():
        counts = manifest.stages.get(name, StageReport())
        stages.append(
            {
                "stage": name,
                **asdict(run),
                **counts.model_dump(exclude={"seconds", "notes"}),
            }
        )
    drops: list[dict[str, Any]] = []
    for source, c in manifest.sources.items():
        for reason, n in sorted(c.quarantined.items()):
            drops.append(
                {"source": source, "kind": "quarantined", "reason": reason, "records": n, "tokens": None}
            )
        for reason, n in sorted(c.filtered.items()):
            drops.append(
                {
                    "source": source,
                    "kind": "filtered",
                    "reason": reason,
                    "records": n,
                    "tokens": c.filtered_tokens.get(reason, 0),
                }
            )
        if c.dropped_tail_tokens:
            drops.append(
                {
                    "source": source,
                    "kind": "tokens cut",
                    "reason": "last_row_dropped",
                    "records": None,
                    "tokens": c.dropped_tail_tokens,
                }
            )
    packed = sum(c.packed_tokens for c in manifest.sources.values()) or 1
    sources = [
        {
            "source": name,
            "records_read": c.records_read,
            "documents": c.documents,
            "kept": c.kept,
            "packed_tokens": c.packed_tokens,
            "share": round(c.packed_tokens / packed, 4),
        }
        for name, c in manifest.sources.items()
    ]
    failed = [c.model_dump() for c in manifest.checks if not c.ok]
    return {
        "format": REPORT_FORMAT,
        "config_hash": manifest.config_hash,
        "output_dir": output_dir,
        "runner": runner,
        "command": command if command is not None else manifest.command,
        "started_at": clock.started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": clock.seconds,
        "stages": stages,
        "targets": [
            {
                "config": t.config_name,
                "rows": t.rows,
                "tokens": t.tokens,
                "content_tokens": t.content_tokens,
                "pad_tokens": t.pad_tokens,
                "shards": len(t.shards),
            }
            for t in manifest.targets
        ],
        "sources": sources,
        "drops": drops,
        "reconciliation": {
            "ok": manifest.ok,
            "passed": len(manifest.checks) - len(failed),
            "total": len(manifest.checks),
            "failed": failed,
        },
    }


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the same content as report.json, as tables a person reads at the end of a run."""
    rec = report["reconciliation"]
    lines = [
        f"# Longloom run report ({report['started_at']})",
        "",
        f"config `{report['config_hash']}` → `{report['output_dir']}`, runner {report['runner']}, "
        f"{report['seconds']:.1f} s in all",
        "",
        "## Stages",
        "",
    ]
    lines += _table(
        ["stage", "seconds", "units", "reused", "items in", "items out", "tokens in", "tokens out"],
        [
            [
                s["stage"],
                s["seconds"],
                s["units"],
                s["reused"],
                s["items_in"],
                s["items_out"],
                s["tokens_in"],
                s["tokens_out"],
            ]
            for s in report["stages"]
        ],
    )
    lines += [
        "",
        "Items: prepare = input records → documents kept; select = documents → documents laid out; "
        "write = rows planned → rows written.",
        "",
        "## Output",
        "",
    ]
    lines += _table(
        ["config", "rows", "tokens", "document tokens", "padding", "shards"],
        [
            [t["config"], t["rows"], t["tokens"], t["content_tokens"], t["pad_tokens"], t["shards"]]
            for t in report["targets"]
        ],
    )
    lines += ["", "## Sources", ""]
    lines += _table(
        ["source", "records read", "documents", "kept", "tokens in rows", "share of rows"],
        [
            [
                s["source"],
                s["records_read"],
                s["documents"],
                s["kept"],
                s["packed_tokens"],
                f"{100 * s['share']:.1f}%",
            ]
            for s in report["sources"]
        ],
    )
    lines += ["", "## Drops by reason", ""]
    if report["drops"]:
        lines += _table(
            ["source", "kind", "reason", "records", "tokens"],
            [[d["source"], d["kind"], d["reason"], d["records"], d["tokens"]] for d in report["drops"]],
        )
    else:
        lines.append("nothing dropped")
    lines += ["", "## Reconciliation", "", f"{rec['passed']}/{rec['total']} checks pass"]
    lines += [f"- FAILED {c['name']}: {c['detail']}" for c in rec["failed"]]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> str:
    """Write report.json and report.md beside the manifest (atomically); return the markdown."""
    md = render_markdown(report)
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(md, encoding="utf-8")
    return md
