"""The in-process executor: the stage loop (`run_plan`) with every unit run in this process, no Prefect.

`run_build` runs `pipeline.stages.plan.STAGES` in order (the flow in `flows/build.py` is the same
loop with units mapped as Prefect tasks); `preflight` holds every check that can fail before work
starts. Tests call `run_build` to exercise the library alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
from pathlib import Path
from typing import Any

from pipeline.core import storage
from pipeline.core.helpers import reap_orphans
from pipeline.core.lineage import lineage_steps
from pipeline.core.progress import Reporter
from pipeline.core.results import group_by_target, output_units
from pipeline.core.tokenizer import tokenizer_for
from pipeline.core.workdir import CONFIG_HASH_FILE, WorkDir
from pipeline.output.report import (
    RunClock,
    build_report,
    write_report,
)
from pipeline.readers import InputShard, list_input_shards
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from pipeline.stages.finalize import diversity_outputs
from pipeline.stages.plan import run_plan, semantic_selectors
from schemas.config import BuildConfig, ConfigError, config_hash
from schemas.manifest import Manifest

log = logging.getLogger("longloom")

# what tests and tools import from here: the executor, and helpers over the stages' results
__all__ = [
    "diversity_outputs",
    "group_by_target",
    "lineage_steps",
    "output_units",
    "preflight",
    "run_build",
    "run_stages",
]


def preflight(cfg: BuildConfig) -> list[InputShard]:
    """Every check that can fail before work starts: inputs exist, tokenizer and its tokens resolve."""
    from pipeline.core.tokenizer import TokenizerError, separator_and_pad

    check_stores(cfg)  # first: an unreachable store or missing credentials is said in seconds
    try:
        tok = tokenizer_for(cfg)
        for special in separator_and_pad(tok, cfg.packing.separator, cfg.packing.pad_token):
            tok.special_token_id(special)
    except TokenizerError as err:
        raise ConfigError(f"tokenizer / packing.separator / packing.pad_token: {err}") from None
    if cfg.diversity.embedder:
        from pipeline.embedders.registry import EmbedderError, check_embedder_spec

        try:
            check_embedder_spec(cfg.diversity.embedder, cfg.base_dir)
        except EmbedderError as err:
            raise ConfigError(str(err)) from None
        semantic_selectors(cfg)  # a configured SemDeDup/D4 that cannot load fails here, not mid-run
    shards = list_input_shards(cfg)
    if not shards:
        raise ConfigError("sources: no input shards found")
    if not storage.is_remote(cfg.output.dir):
        out = storage.local_path(cfg.output.dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output.dir: {out} exists and is not a folder")
        check_unnamed_output(cfg)
    if cfg.procedural.enabled:
        from pipeline.stages.procedural import check_procedural

        check_procedural(cfg)
    if cfg.rewriter.enabled:
        from pipeline.stages.rewriter import check_rewriter

        check_rewriter(cfg)
    return shards


def check_stores(cfg: BuildConfig) -> None:
    """ConfigError (one line naming the URL and what is missing) for every object store the config
    names that does not answer with the credentials found: before any input is listed or work done."""
    checks = [(p, f"source {s.name!r}") for s in cfg.sources for p in s.paths]
    checks.append((cfg.output.dir, "output.dir"))
    # caches are read and written through the store (`storage.KeyedFiles`); only the ones in use
    for field, value, used in (
        ("diversity.cache_dir", cfg.diversity.cache_dir, bool(cfg.diversity.embedder)),
        ("rewriter.cache_dir", cfg.rewriter.cache_dir, cfg.rewriter.enabled),
        ("long_dependency.cache_dir", cfg.long_dependency.cache_dir, cfg.long_dependency.enabled),
    ):
        if value and used:
            checks.append((str(value), field))
    seen: set[str] = set()
    for path, what in checks:
        if not storage.is_remote(path):
            continue
        bucket = storage.bucket_of(path)
        if bucket in seen:
            continue
        seen.add(bucket)
        try:
            storage.check_store(path, what, must_exist=False)
        except storage.StorageError as err:
            raise ConfigError(str(err)) from None


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
    args = ["longloom", "build"]
    if storage.is_remote(str(output_dir)):  # a store's URL names the output wherever it is run
        if config is not None and Path(config).resolve() != flows_default_config():
            args.append(Path(config).name)
        line = " ".join(shlex.quote(a) for a in [*args, "--output", storage.shown(str(output_dir))])
        return f"# Longloom git commit {commit}\n{line}" if commit else line
    out = Path(output_dir).resolve()
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


def run_build(
    cfg: BuildConfig,
    command: str | None = None,
    reporter: Reporter | None = None,
) -> Manifest:
    """Run every stage in this process (see `run_stages`); return the manifest."""
    manifest: Manifest = run_stages(cfg, command, reporter)["finalize"]
    return manifest


def run_stages(
    cfg: BuildConfig,
    command: str | None = None,
    reporter: Reporter | None = None,
) -> Inputs:
    """Run every enabled stage of `STAGES` in this process, one unit after another.

    Returns every stage's merged result by name (`["finalize"]` is the manifest, `.get("publish")`
    what was published). Holds the output folder's lock for the whole run and first clears what a
    killed run left behind. Writes the run report once `REPORT_AFTER` (finalize) is done, so that
    publishing uploads it with the rest.
    """
    rep = reporter or Reporter()
    shards = preflight(cfg)  # a bad config or missing input fails here, before anything is written
    work = WorkDir(cfg)
    # an output folder on a URL: resume from what the store holds (no-ops for a local folder)
    storage.pull(cfg.output.dir)

    def run_units(stage: Stage, job: StageWork, units: list[Any]) -> list[Any]:
        storage.push(cfg.output.dir)  # what the earlier stages' merges wrote
        results = []
        for unit in units:
            r = job.run_unit(unit, rep.unit(stage.name, job.label(unit)))
            storage.push(cfg.output.dir)  # the unit's files, then its record (see pipeline.core.storage)
            results.append(r)
            label, counts = job.advance(r)
            rep.advance(stage.name, label=label, **counts)
            line = job.log_line(r)
            if line:
                log.info("%s", line)
        return results

    with work.lock(log.info):
        reap_orphans(work.root, log.info)  # e.g. the temporary Prefect API of a killed flow run
        work.remove_temporaries()
        clock = RunClock()

        def after_report(manifest: Manifest, extra: dict[str, Any]) -> None:
            report = build_report(manifest, clock, storage.shown(cfg.output.dir), "in-process", command)
            write_report(work.out, report | extra)

        done = run_plan(RunContext(cfg, command), Inputs(shards=shards), run_units, rep, clock, after_report)
        storage.push(cfg.output.dir)  # finalize's manifest (last), the card, the report
        return done
