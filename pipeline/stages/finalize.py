"""Stage 4: merge audit tables, add up and reconcile every count, write the manifest and README.

Counts come from the stage records; the checks recount them independently from the files written
(audit rows per reason, recounted from each merged audit file; every output shard re-hashed), so a
bookkeeping bug shows up as a failed check.

The stage is units and a small merge (issue 14: no process reads every audit row or output byte): one
unit per published audit file (it reads only its slice of the per-shard files, planned from their
footers), one per group of SHARDS_PER_CHECK output shards (re-hashed), one for the optional stages'
outputs. The merge adds the units' small results, runs the checks and writes the manifest last."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.core.faults import crash_point
from pipeline.core.parquet_io import sha256_file, write_json_atomic
from pipeline.core.progress import UnitProgress
from pipeline.core.results import PrepareResult, SelectResult, group_by_target
from pipeline.core.tokenizer import separator_and_pad, tokenizer_for
from pipeline.core.workdir import WorkDir
from pipeline.output.audit import AuditPart, audit_counts, plan_audit, write_audit_part
from pipeline.output.card import write_card
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from schemas.config import BuildConfig, optional_off
from schemas.manifest import (
    Check,
    FileEntry,
    InputEntry,
    Manifest,
    ShardEntry,
    SourceCounts,
    StageReport,
    TargetSummary,
    TokenizerInfo,
)
from schemas.records import FILTERED_SCHEMA, QUARANTINE_SCHEMA

# Where and how a run executed, never what it produced: left out of the manifest so a run on Dask and
# one on threads (or in-process) write the same manifest. The run report records them.
_NOT_IN_MANIFEST: dict[str, Any] = {
    "base_dir": True,
    "output_named": True,
    "output": {"dir"},
    "run": {"task_runner", "workers", "dask_address", "retries", "retry_delay_seconds", "select_partitions"},
}
# Command-line options of `longloom build` that only choose where and how it runs (flag -> takes a value).
_EXECUTION_OPTIONS = {"--runner": True, "--dask-address": True, "--workers": True, "--no-prefect": False}


def identity_command(command: str) -> str:
    """`command` without the execution-only options (runner, scheduler address, workers, --no-prefect)."""
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: a command line typed by hand, keep it as it is
        return command
    kept: list[str] = []
    skip = False
    for w in words:
        if skip:
            skip = False
            continue
        flag, eq, _ = w.partition("=")
        if flag in _EXECUTION_OPTIONS:
            skip = _EXECUTION_OPTIONS[flag] and not eq
            continue
        kept.append(w)
    return command if len(kept) == len(words) else shlex.join(kept)


# --- the units: one per audit file, one per group of output shards, one for the optional stages -----------

# Output shards re-hashed by one unit: a unit reads at most this many shards (~GBs), and a target of
# thousands of shards is spread over workers.
SHARDS_PER_CHECK = 8
# audit tables finalize merges from the prepare and select stages' per-shard files (name -> schema)
AUDIT_TABLES = {"filtered": FILTERED_SCHEMA, "quarantine": QUARANTINE_SCHEMA}


@dataclass(frozen=True)
class AuditUnit:
    """Write one file of a merged audit table from its slice of the per-shard files."""

    part: AuditPart


@dataclass(frozen=True)
class ChecksumUnit:
    """Re-hash shards [start, stop) of target `target` (the "shard checksums" check)."""

    target: int
    start: int
    stop: int


@dataclass(frozen=True)
class ExtrasUnit:
    """What the optional stages hand finalize (their audit tables, statistics and extra configs)."""


FinalizeUnit = AuditUnit | ChecksumUnit | ExtrasUnit


@dataclass
class AuditFile:
    """An audit unit's result: the file's manifest entry and its rows per (source, reason), recounted
    from the file as published."""

    name: str
    index: int
    entry: FileEntry
    counts: dict[tuple[str, str], int]


@dataclass
class ChecksumResult:
    """A checksum unit's result: the shards whose bytes no longer match their write record."""

    target: int
    start: int
    bad: list[str]


@dataclass
class ExtrasResult:
    """The extras unit's result: the optional stages' statistics, extra configs and audit tables."""

    extra: dict[str, Any]
    extra_configs: dict[str, list[FileEntry]]
    audit_extra: dict[str, list[FileEntry]]


FinalizeResult = AuditFile | ChecksumResult | ExtrasResult


def audit_inputs(
    work: WorkDir, prepared: list[PrepareResult], selected: SelectResult
) -> dict[str, list[str]]:
    """The per-shard files each audit table merges, in order, relative to the output folder (a unit
    resolves them against its own process's output folder: a mirror on another machine)."""
    prep = work.prepare_dir.relative_to(work.out)
    sel = work.select_dir.relative_to(work.out)
    return {
        "filtered": [str(prep / r.files["filtered"]) for r in prepared] + [str(sel / selected.filtered_file)],
        "quarantine": [str(prep / r.files["quarantine"]) for r in prepared],
    }


def finalize_units(
    work: WorkDir, prepared: list[PrepareResult], selected: SelectResult, written: list[list[ShardEntry]]
) -> list[FinalizeUnit]:
    """Every unit of finalize: audit files (planned from the inputs' footers), shard groups, extras."""
    units: list[FinalizeUnit] = []
    for name, files in audit_inputs(work, prepared, selected).items():
        units += [AuditUnit(p) for p in plan_audit(work.out, name, files)]
    for ti, entries in enumerate(written):
        units += [
            ChecksumUnit(ti, a, min(len(entries), a + SHARDS_PER_CHECK))
            for a in range(0, len(entries), SHARDS_PER_CHECK)
        ]
    units.append(ExtrasUnit())
    return units


def write_audit_file(cfg: BuildConfig, work: WorkDir, part: AuditPart) -> AuditFile:
    """One audit file, written atomically from its slice only (a rerun rewrites the same bytes under
    the same name: nothing is duplicated), and its rows recounted from the file as published."""
    entry = write_audit_part(work.out, part, AUDIT_TABLES[part.name], cfg.output.compression_level)
    crash_point("finalize_audit")  # tests: die between audit units
    return AuditFile(part.name, part.index, entry, dict(audit_counts(work.out, [entry])))


def check_shards(work: WorkDir, entries: list[ShardEntry]) -> list[str]:
    """Paths of the shards whose sha256 differs from their write record (re-hashed from the files)."""
    return [e.path for e in entries if sha256_file(work.out / e.path) != e.sha256]


def finalize_merge(
    cfg: BuildConfig,
    work: WorkDir,
    prepared: list[PrepareResult],
    selected: SelectResult,
    written: list[list[ShardEntry]],
    stages: dict[str, StageReport],
    results: list[FinalizeResult],
    command: str | None = None,
) -> Manifest:
    """Assemble and write manifest.json (atomically) and the dataset card (README.md) from the units'
    results: audit file entries and their recounts, shard re-hashes, the optional stages' outputs.

    Optional stages hand in what they wrote (the extras unit): `extra_configs` (e.g. synthesized chat
    sets, files under data/<name>/), `audit_extra` (e.g. the `pruned` table under audit/<name>/) and
    `extra` (their statistics, keyed by stage name), so the manifest stays the one account of the run.
    """
    out = work.out
    # what the merge holds is small: one entry and one (source, reason) count table per audit file, the
    # paths of mismatched shards, the optional stages' statistics
    audit = sorted((r for r in results if isinstance(r, AuditFile)), key=lambda a: a.index)
    files = {name: [a for a in audit if a.name == name] for name in AUDIT_TABLES}
    recount: dict[str, Counter[tuple[str, str]]] = {name: Counter() for name in AUDIT_TABLES}
    for a in audit:
        recount[a.name].update(a.counts)
    checked = sorted((r for r in results if isinstance(r, ChecksumResult)), key=lambda r: (r.target, r.start))
    bad_paths = [[p for r in checked if r.target == ti for p in r.bad] for ti in range(len(written))]
    extras = next((r for r in results if isinstance(r, ExtrasResult)), ExtrasResult({}, {}, {}))

    counts: dict[str, SourceCounts] = {s.name: SourceCounts() for s in cfg.sources}
    for r in prepared:
        c = counts[r.source]
        c.records_read += r.records_read
        c.records_in_documents += r.records_in_documents
        for k, v in r.quarantined.items():
            c.quarantined[k] = c.quarantined.get(k, 0) + v
        c.documents += r.documents
        c.tokens_read += r.tokens_read
        for k, v in r.filtered.items():
            c.filtered[k] = c.filtered.get(k, 0) + v
        for k, v in r.filtered_tokens.items():
            c.filtered_tokens[k] = c.filtered_tokens.get(k, 0) + v
        c.kept += r.kept
        c.kept_tokens += r.kept_tokens
    for name, c in counts.items():
        for k, v in selected.filtered.get(name, {}).items():
            c.filtered[k] = c.filtered.get(k, 0) + v
            c.kept -= v
        for k, v in selected.filtered_tokens.get(name, {}).items():
            c.filtered_tokens[k] = c.filtered_tokens.get(k, 0) + v
            c.kept_tokens -= v
        c.packed_tokens = selected.packed_tokens.get(name, 0)
        c.dropped_tail_tokens = selected.dropped_tail_tokens.get(name, 0)

    targets = []
    for plan, entries in zip(selected.targets, written, strict=True):
        targets.append(
            TargetSummary(
                target_length=plan.target_length,
                config_name=plan.config_name,
                strategy=plan.strategy,
                rows=sum(e.rows for e in entries),
                tokens=sum(e.tokens for e in entries),
                content_tokens=sum(e.content_tokens for e in entries),
                pad_tokens=sum(e.pad_tokens for e in entries),
                documents=plan.documents,
                split_documents=plan.split_documents,
                needless_splits=plan.needless_splits,
                dropped_tail_tokens=plan.dropped_tail_tokens,
                shards=entries,
            )
        )

    checks = _checks(cfg, counts, targets, selected, recount["filtered"], recount["quarantine"], bad_paths)
    extra = extras.extra
    # optional stages reconcile their own outputs and report the results as extra[<stage>]["checks"]
    for stats in extra.values():
        if isinstance(stats, dict):
            checks += [Check.model_validate(c) for c in stats.get("checks", [])]
    tok = tokenizer_for(cfg)
    sep, pad = separator_and_pad(tok, cfg.packing.separator, cfg.packing.pad_token)
    manifest = Manifest(
        longloom_version=__version__,
        config_hash=work.config_hash,
        row_config_hashes=dict(work.row_keys),
        # an optional section that is off (long_dependency) is not recorded: older manifests stay identical
        config=cfg.model_dump(mode="json", exclude={**_NOT_IN_MANIFEST, **optional_off(cfg)}),
        seed=cfg.run.seed,
        command=identity_command(command or " ".join(["longloom", *sys.argv[1:]])),
        tokenizer=TokenizerInfo(
            name=tok.identity.name,
            vocab_hash=tok.identity.vocab_hash,
            n_vocab=tok.identity.n_vocab,
            separator=sep,
            separator_id=tok.special_token_id(sep),
            pad_token=pad,
            pad_id=tok.special_token_id(pad),
        ),
        inputs=[
            InputEntry(
                source=r.source,
                shard_id=r.shard_id,
                uri=r.uri,
                revision=r.revision,
                bytes=r.input_bytes,
                records=r.records_read,
            )
            for r in prepared
        ],
        sources=counts,
        targets=targets,
        audit={
            "filtered": [a.entry for a in files["filtered"]],
            "quarantine": [a.entry for a in files["quarantine"]],
            **extras.audit_extra,
        },
        extra_configs=extras.extra_configs,
        # timings differ run to run; they go to report.json so the manifest is reproducible
        stages={k: v.model_copy(update={"seconds": None}) for k, v in stages.items()},
        checks=checks,
        extra=extra,
    )
    crash_point("finalize")
    # account first, clean-up last: a crash in between leaves extra files, never a manifest or
    # README naming files that are gone; the rerun removes the leftovers
    write_json_atomic(out / "manifest.json", manifest.model_dump(mode="json"))
    write_card(out, manifest, cfg.card)
    _remove_stale(out, manifest)
    current = [d.name for d in stage_dirs(cfg, work)]
    write_json_atomic(
        work.root / CURRENT_STAGES_FILE, {"config_hash": work.config_hash, "stage_dirs": current}
    )
    if manifest.ok:  # a failed run keeps everything, for a look at what went wrong
        collect_garbage(work.out, delete=True, locked=True)
    return manifest


# --- intermediates of earlier configs (`longloom gc`) ----------------------------------------------------

CURRENT_STAGES_FILE = "current.json"  # under .longloom/: the stage folders the last finished run used
# stage folders are named <stage>-<hex key>[-<hex key>]; anything else under .longloom/ (the lock, the
# rewriter's response cache, which is meant to outlive config changes) is never collected
_STAGE_DIR = re.compile(r"^(prepare|select|procedural|rewriter|embed)-[0-9a-f]{8,64}(-[0-9a-f]{8,64})?$")


def stage_dirs(cfg: BuildConfig, work: WorkDir) -> list[Path]:
    """The folders under .longloom/ that the stage keys of this config point at."""
    dirs = [work.prepare_dir, work.select_dir]
    if cfg.procedural.enabled:
        dirs.append(work.procedural_dir)
    if cfg.rewriter.enabled:
        from pipeline.stages.rewriter import stage_dir

        dirs.append(stage_dir(work))
    if cfg.diversity.embedder:
        from pipeline.embedders.documents import embed_dir

        dirs.append(embed_dir(cfg, work))
    return dirs


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


@dataclass
class GarbageReport:
    """What `longloom gc` found under OUT/.longloom: stage folders in use and those no stage key names."""

    kept: list[tuple[str, int]]
    unreferenced: list[tuple[str, int]]
    deleted: bool

    def lines(self) -> list[str]:
        gib = 1 << 30
        verb = "deleted" if self.deleted else "would delete"
        out = [f"  in use   {n / gib:8.3f} GiB  {name}" for name, n in self.kept]
        out += [f"  {verb:<8} {n / gib:8.3f} GiB  {name}" for name, n in self.unreferenced]
        freed = sum(n for _, n in self.unreferenced)
        out.append(
            f"{len(self.unreferenced)} folders of earlier configs, {freed / gib:.3f} GiB "
            + ("freed" if self.deleted else "reclaimable (dry run: pass --delete to remove them)")
        )
        return out


def collect_garbage(out: Path, delete: bool = False, locked: bool = False) -> GarbageReport:
    """Stage folders under OUT/.longloom that the last finished run's stage keys do not name.

    Only a finished run records which folders it used (CURRENT_STAGES_FILE); without that record
    nothing is unreferenced. Deleting takes the output folder's lock (unless the caller, a run, holds it
    already: `locked`), so it never races a build.
    """
    root = out / ".longloom"
    try:
        current = set(json.loads((root / CURRENT_STAGES_FILE).read_text(encoding="utf-8"))["stage_dirs"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GcError(
            f"{out}: no record of a finished run ({root / CURRENT_STAGES_FILE}: {err}); "
            "run `longloom build` on it once, then gc knows which folders are in use"
        ) from None
    found = sorted(d for d in root.iterdir() if d.is_dir() and _STAGE_DIR.match(d.name))
    kept = [(d.name, _size(d)) for d in found if d.name in current]
    stale = [(d.name, _size(d)) for d in found if d.name not in current]
    if delete and stale:
        with contextlib.nullcontext() if locked else _held(root):
            for name, _ in stale:
                shutil.rmtree(root / name, ignore_errors=True)
    return GarbageReport(kept, stale, delete)


class GcError(RuntimeError):
    """`longloom gc` cannot tell what is in use (no finished run recorded) or the folder is busy."""


@contextlib.contextmanager
def _held(root: Path) -> Iterator[None]:
    """The output folder's lock (the file WorkDir.lock takes), without waiting for a running build."""
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GcError(
                f"{root.parent}: a build is running on this folder; try again when it ends"
            ) from None
        yield
    finally:
        os.close(fd)


def _checks(
    cfg: BuildConfig,
    counts: dict[str, SourceCounts],
    targets: list[TargetSummary],
    selected: SelectResult,
    audit_f: Counter[tuple[str, str]],
    audit_q: Counter[tuple[str, str]],
    bad_shards: list[list[str]],
) -> list[Check]:
    """The reconciliation checks. `audit_f`/`audit_q` (rows per (source, reason)) and `bad_shards` (per
    target) were recounted from the published files by the units; counts come from the stage records."""
    checks: list[Check] = []
    for name, c in counts.items():
        kind = cfg.source(name).kind
        q = sum(c.quarantined.values())
        if kind == "code":  # records are files; a repository document holds many
            ok = c.records_in_documents + q == c.records_read and c.documents <= c.records_in_documents
        else:
            ok = c.documents + q == c.records_read
        checks.append(
            Check(
                name=f"{name}: records read = in documents + quarantined",
                ok=ok,
                detail=f"{c.records_read} = {c.records_in_documents} + {q}",
            )
        )
        f = sum(c.filtered.values())
        checks.append(
            Check(
                name=f"{name}: documents = kept + filtered",
                ok=c.documents == c.kept + f,
                detail=f"{c.documents} = {c.kept} + {f}",
            )
        )
        checks.append(
            Check(
                name=f"{name}: kept tokens = packed + dropped with the last row",
                ok=c.kept_tokens == c.packed_tokens + c.dropped_tail_tokens,
                detail=f"{c.kept_tokens} = {c.packed_tokens} + {c.dropped_tail_tokens}",
            )
        )
        table_f = {r: n for (s, r), n in audit_f.items() if s == name}
        checks.append(
            Check(
                name=f"{name}: filtered table matches counts",
                ok=table_f == c.filtered,
                detail=f"table {dict(sorted(table_f.items()))} vs counts {dict(sorted(c.filtered.items()))}",
            )
        )
        table_q = {r: n for (s, r), n in audit_q.items() if s == name}
        checks.append(
            Check(
                name=f"{name}: quarantine table matches counts",
                ok=table_q == c.quarantined,
                detail=f"table {dict(sorted(table_q.items()))} vs counts {dict(sorted(c.quarantined.items()))}",
            )
        )
    packed_total = sum(c.packed_tokens for c in counts.values())
    row_content = sum(t.content_tokens for t in targets)
    checks.append(
        Check(
            name="document tokens in rows = packed tokens",
            ok=packed_total == row_content,
            detail=f"{row_content} in rows, {packed_total} laid out",
        )
    )
    for t, plan, bad in zip(targets, selected.targets, bad_shards, strict=True):
        sep_pad = sum(e.separator_tokens + e.pad_tokens for e in t.shards)
        checks.append(
            Check(
                name=f"{t.config_name}: rows x length = content + separators + padding",
                ok=t.tokens == t.rows * t.target_length == t.content_tokens + sep_pad
                and t.rows == plan.n_rows,
                detail=f"{t.rows} x {t.target_length} = {t.content_tokens} + {sep_pad}",
            )
        )
        checks.append(
            Check(name=f"{t.config_name}: shard checksums", ok=not bad, detail=", ".join(bad) or "all match")
        )
    return checks


def _remove_stale(out: Path, manifest: Manifest) -> None:
    """Delete shards an earlier run with another config left behind, so the folder holds one dataset."""
    keep = {e.path for t in manifest.targets for e in t.shards}
    keep |= {e.path for files in manifest.audit.values() for e in files}
    keep |= {e.path for files in manifest.extra_configs.values() for e in files}
    for top in ("data", "audit"):
        root = out / top
        if not root.exists():
            continue
        for p in sorted(root.rglob("*.parquet")):
            if str(p.relative_to(out)) not in keep:
                p.unlink()
        for d in sorted((d for d in root.rglob("*") if d.is_dir()), reverse=True):
            if not any(d.iterdir()):
                shutil.rmtree(d)


class FinalizeStage(Stage):
    """Merge audit tables, reconcile counts, write the manifest and card (`pipeline.stages.finalize`)."""

    name = "finalize"
    sections = (
        "sources",
        "tokenizer",
        "filters",
        "diversity",
        "long_dependency",
        "packing",
        "procedural",
        "rewriter",
        "output",
        "card",
        "publish",  # the manifest records the whole config
    )
    inputs = ("prepare", "embed", "long_dependency", "select", "write", "procedural", "rewriter")
    unit_noun = "parts"
    config_type = BuildConfig
    task_name = "finalize"
    retries = 0

    def config(self, cfg: BuildConfig) -> BuildConfig:
        # the manifest records the whole config (and the card its card section): finalize reads it all
        return cfg

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Finalize(self, ctx, inputs)


class _Finalize(StageWork[FinalizeUnit, FinalizeResult]):
    """Finalize as units and a small merge: each audit file and each group of output shards is a unit
    (any worker, reading only its slice or its shards), the optional stages' outputs one more; the merge
    adds their results, runs the checks and writes the manifest (last) and the card."""

    def units(self) -> list[FinalizeUnit]:
        inp = self.inputs
        return finalize_units(self.ctx.work, inp["prepare"], inp["select"], self._written())

    def _written(self) -> list[list[ShardEntry]]:
        return group_by_target(self.inputs["select"], [w.entry for w in self.inputs["write"]])

    def run_unit(self, unit: FinalizeUnit, progress: UnitProgress | None = None) -> FinalizeResult:
        work = self.ctx.work  # where this process sees the output folder (a mirror, on a URL)
        if isinstance(unit, AuditUnit):
            return write_audit_file(self.cfg, work, unit.part)
        if isinstance(unit, ChecksumUnit):
            entries = self._written()[unit.target][unit.start : unit.stop]
            return ChecksumResult(unit.target, unit.start, check_shards(work, entries))
        return self._extras()

    def _extras(self) -> ExtrasResult:
        cfg, work, inp = self.cfg, self.ctx.work, self.inputs
        selected = inp["select"]
        audit_extra, extra = diversity_outputs(cfg, work, inp.get("embed") or [], selected)
        extra_configs: dict[str, Any] = {}
        scored = inp.get("long_dependency")
        if scored is not None:
            from pipeline.longdep.use import manifest_extra

            extra["long_dependency"] = manifest_extra(cfg, work, inp["prepare"], scored, selected)
        proc = inp.get("procedural")
        if proc is not None:
            extra["procedural"] = proc.extra
            extra_configs.update(proc.extra_configs)
        rw = inp.get("rewriter")
        if rw is not None:
            from pipeline.stages.rewriter import manifest_stats

            extra["rewriter"] = manifest_stats(rw.stats)  # what this run spent goes to report.json
            extra_configs.update(rw.extra_configs)
            audit_extra.update(rw.audit_extra)
        return ExtrasResult(extra, extra_configs, audit_extra)

    def merge(self, results: list[FinalizeResult]) -> Manifest:
        inp = self.inputs
        return finalize_merge(
            self.cfg,
            self.ctx.work,
            inp["prepare"],
            inp["select"],
            self._written(),
            inp.reports,
            results,
            self.ctx.command,
        )

    def label(self, unit: FinalizeUnit) -> str:
        if isinstance(unit, AuditUnit):
            return unit.part.path
        if isinstance(unit, ChecksumUnit):
            return f"checksums {self.inputs['select'].targets[unit.target].config_name}/{unit.start}"
        return "optional stages"

    def log_line(self, result: FinalizeResult) -> str | None:
        if isinstance(result, AuditFile):
            return f"wrote {result.entry.path}: {result.entry.rows} rows"
        return None


def diversity_outputs(
    cfg: BuildConfig, work: WorkDir, embedded: list, selected: SelectResult
) -> tuple[dict, dict]:
    """The diversity stage's audit tables and statistics for finalize_run ({} when it is off)."""
    if not cfg.diversity.embedder:
        return {}, {}
    from pipeline.output.semantic_report import diversity_outputs as outputs

    return outputs(cfg, work, embedded, selected)
