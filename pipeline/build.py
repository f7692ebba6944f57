"""The build as plain function calls, stage by stage: what the Prefect flow runs, minus Prefect.

`run_build` is the reference order of work and what tests call to exercise the library alone. The
flow in `flows/build.py` calls the same stage functions as tasks, mapped over shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
from pathlib import Path

from pipeline.finalize import finalize_run
from pipeline.helpers import reap_orphans
from pipeline.prepare import PrepareResult, prepare_shard, tokenizer_for
from pipeline.progress import Reporter
from pipeline.readers import InputShard, list_input_shards
from pipeline.report import (
    RunClock,
    build_report,
    prepare_counts,
    select_counts,
    write_counts,
    write_report,
)
from pipeline.rows import write_shard
from pipeline.select import SelectResult, select_and_layout, semantic_selectors
from pipeline.workdir import CONFIG_HASH_FILE, WorkDir
from schemas.config import BuildConfig, ConfigError, config_hash
from schemas.manifest import Manifest, ShardEntry, StageReport

log = logging.getLogger("longloom")


def preflight(cfg: BuildConfig) -> list[InputShard]:
    """Every check that can fail before work starts: inputs exist, tokenizer and its tokens resolve."""
    from pipeline.tokenizer import TokenizerError, separator_and_pad

    try:
        tok = tokenizer_for(cfg)
        for special in separator_and_pad(tok, cfg.packing.separator, cfg.packing.pad_token):
            tok.special_token_id(special)
    except TokenizerError as err:
        raise ConfigError(f"tokenizer / packing.separator / packing.pad_token: {err}") from None
    if cfg.diversity.embedder:
        from pipeline.embed import EmbedderError, check_embedder_spec

        try:
            check_embedder_spec(cfg.diversity.embedder, cfg.base_dir)
        except EmbedderError as err:
            raise ConfigError(str(err)) from None
        semantic_selectors(cfg)  # a configured SemDeDup/D4 that cannot load fails here, not mid-run
    shards = list_input_shards(cfg)
    if not shards:
        raise ConfigError("sources: no input shards found")
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir: {out} exists and is not a folder")
    check_unnamed_output(cfg)
    if cfg.procedural.enabled:
        from pipeline.procedural.stage import check_procedural

        check_procedural(cfg)
    if cfg.rewriter.enabled:
        from pipeline.rewriter.stage import check_rewriter

        check_rewriter(cfg)
    return shards


def check_unnamed_output(cfg: BuildConfig) -> None:
    """ConfigError when the config named no output folder and its default holds another config's run.

    A run replaces an earlier run of another config in its folder (stale shards are deleted). That is
    what a user who named the folder asked for; a default folder must never cost someone their output.
    """
    if cfg.output_named:
        return
    out = Path(cfg.output.dir)
    try:
        previous = json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("config_hash")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous is None:  # a run that never finished: the config it started with (WorkDir.lock)
        with contextlib.suppress(OSError):
            previous = (out / ".longloom" / CONFIG_HASH_FILE).read_text(encoding="utf-8").strip() or None
    if previous is None and out.is_dir() and any(out.iterdir()):
        previous = "unknown"  # files no run of Longloom accounts for: leave them alone
    if previous is not None and previous != config_hash(cfg):
        raise ConfigError(
            f"output.dir: the config names no output folder, and its default {out} holds the output of "
            f"another config (hash {previous}); nothing was changed. Set output.dir (or pass --output) to "
            f"{out} to replace that run, or to another folder"
        )

def longloom_commit() -> str | None:
    """The git commit of this Longloom checkout (`<sha>` or `<sha>+local changes`), None if not a checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("+local changes" if dirty else "")


def rebuild_command(config: str | Path | None, output_dir: str | Path, commit: str | None = None) -> str:
    """The command that rebuilds this output, runnable by someone else: no local absolute path in it.

    The config is named relative to the folder that holds the output (`configs/my.yaml`), or by its
    file name when it lives elsewhere; the output by its folder name. Run from the folder holding both
    (its whole text is also in `manifest.json`). The git commit of Longloom comes first, when known.
    """
    out = Path(output_dir).resolve()
    args = ["longloom", "build"]
    if config is not None and Path(config).resolve() != flows_default_config():
        cfg = Path(config).resolve()
        try:
            args.append(cfg.relative_to(out.parent).as_posix())
        except ValueError:
            args.append(cfg.name)
    args += ["--output", out.name]
    line = " ".join(shlex.quote(a) for a in args)
    return f"# Longloom git commit {commit}\n{line}" if commit else line


def flows_default_config() -> Path:
    """The bundled sample config (what `longloom build` without a CONFIG runs)."""
    return Path(__file__).resolve().parent.parent / "data" / "sample.yaml"


def lineage_steps(prepared: list[PrepareResult], selected: SelectResult) -> list[str]:
    """The versioned steps rows went through, in order, without repeats."""
    seen: dict[str, None] = {}
    for r in prepared:
        for s in r.steps:
            seen.setdefault(s)
    for s in selected.steps:
        seen.setdefault(s)
    return list(seen)


def output_units(selected: SelectResult) -> list[tuple[int, int]]:
    """(target index, shard index) of every output shard, in order."""
    return [(ti, k) for ti, plan in enumerate(selected.targets) for k in range(plan.n_shards)]


def group_by_target(selected: SelectResult, entries: list[ShardEntry]) -> list[list[ShardEntry]]:
    out: list[list[ShardEntry]] = [[] for _ in selected.targets]
    for (ti, _), e in zip(output_units(selected), entries, strict=True):
        out[ti].append(e)
    return out


def run_build(
    cfg: BuildConfig,
    command: str | None = None,
    reporter: Reporter | None = None,
) -> Manifest:
    """Run every stage in this process, one unit after another; write the manifest and the run report.

    Holds the output folder's lock for the whole run and first clears what a killed run left behind.
    """
    rep = reporter or Reporter()
    work = WorkDir(cfg)
    shards = preflight(cfg)  # a bad config or missing input fails here, before anything is written
    with work.lock(log.info):
        reap_orphans(work.root, log.info)  # e.g. the temporary Prefect API of a killed flow run
        work.remove_temporaries()
        clock = RunClock()
        stages: dict[str, StageReport] = {}
        with clock.stage("prepare") as st:
            rep.start("prepare", len(shards), "shards")
            prepared = []
            for s in shards:
                r = prepare_shard(cfg, s, work, rep.unit("prepare", s.shard_id))
                prepared.append(r)
                rep.advance("prepare", label=s.shard_id, tokens=r.kept_tokens)
                log.info(
                    "prepared %s: %d documents, %d kept%s",
                    s.shard_id,
                    r.documents,
                    r.kept,
                    " (reused)" if r.reused else "",
                )
            st.units, st.reused = len(prepared), sum(r.reused for r in prepared)
        stages["prepare"] = prepare_counts(prepared)
        embedded: list = []
        if cfg.diversity.embedder:
            from pipeline.embed_stage import embed_shard

            with clock.stage("embed") as st:
                rep.start("embed", len(prepared), "shards")
                for r in prepared:
                    embedded.append(embed_shard(cfg, work, r))
                    rep.advance("embed", label=r.shard_id)
                st.units, st.reused = len(embedded), sum(e.reused for e in embedded)
            stages["embed"] = StageReport(
                items_in=sum(r.kept for r in prepared), items_out=sum(e.documents for e in embedded)
            )
        with clock.stage("select") as st:
            rep.start("select", 1, "step")
            selected = select_and_layout(cfg, work, prepared)
            rep.advance("select", tokens=sum(t.content_tokens for t in selected.targets))
            st.units, st.reused = 1, int(selected.reused)
        stages["select"] = select_counts(prepared, selected)
        with clock.stage("write") as st:
            steps = lineage_steps(prepared, selected)
            units = output_units(selected)
            rep.start("write", len(units), "shards")
            written = []
            for ti, k in units:
                label = f"{selected.targets[ti].config_name}/{k}"
                w = write_shard(cfg, work, selected, prepared, ti, k, steps, rep.unit("write", label))
                written.append(w)
                rep.advance("write", label=label, rows=w.entry.rows)
            st.units, st.reused = len(written), sum(w.reused for w in written)
        entries = [w.entry for w in written]
        stages["write"] = write_counts(selected, entries)
        audit_extra, extra = diversity_outputs(cfg, work, embedded, selected)
        extra_configs: dict = {}
        if cfg.procedural.enabled:
            from pipeline.procedural.stage import run_procedural

            with clock.stage("procedural") as st:
                proc = run_procedural(cfg, work, group_by_target(selected, entries), steps)
                st.units, st.reused = proc.batches, proc.reused
            stages["procedural"] = StageReport(items_out=proc.samples, tokens_out=proc.tokens)
            extra["procedural"] = proc.extra
            extra_configs.update(proc.extra_configs)
        run_stats: dict = {}  # what this run spent, for the report only
        if cfg.rewriter.enabled:
            from pipeline.rewriter.stage import manifest_stats, run_report_stats, run_rewriter

            with clock.stage("rewriter") as st:
                rw = run_rewriter(cfg, work, selected)
                st.units = 1
            stages["rewriter"] = rw.report
            extra["rewriter"] = manifest_stats(rw.stats)
            run_stats |= run_report_stats(rw.stats)
            extra_configs.update(rw.extra_configs)
            audit_extra.update(rw.audit_extra)
        with clock.stage("finalize") as st:
            rep.start("finalize", 1, "step")
            manifest = finalize_run(
                cfg,
                work,
                prepared,
                selected,
                group_by_target(selected, entries),
                stages,
                command,
                extra=extra,
                extra_configs=extra_configs,
                audit_extra=audit_extra,
            )
            st.units = 1
        rep.close()
        report = build_report(manifest, clock, cfg.output.dir, "in-process", command)
        write_report(work.out, report | diversity_report(cfg, work, embedded, selected) | run_stats)
    return manifest


def diversity_outputs(
    cfg: BuildConfig, work: WorkDir, embedded: list, selected: SelectResult
) -> tuple[dict, dict]:
    """The diversity stage's audit tables and statistics for finalize_run ({} when it is off)."""
    if not cfg.diversity.embedder:
        return {}, {}
    from pipeline.diversity import diversity_outputs as outputs

    return outputs(cfg, work, embedded, selected)


def diversity_report(cfg: BuildConfig, work: WorkDir, embedded: list, selected: SelectResult) -> dict:
    """{"diversity": this run's timings and cache use} for report.json ({} when the stage is off)."""
    if not cfg.diversity.embedder:
        return {}
    from pipeline.diversity import diversity_run_stats

    return {"diversity": diversity_run_stats(cfg, work, embedded, selected)}
