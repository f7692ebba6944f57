"""The Prefect executor: the stage list of `pipeline.stages.plan`, each stage's units mapped as tasks.

The same loop as `pipeline.build.run_stages`; only how a unit runs differs (a Prefect task on threads
or Dask, retried per the stage). Tasks cover a shard or a batch (never a document). Completed work
is recorded on disk by the stages themselves, so a rerun of the flow, even after a crash, skips what
is done and verified.

    python -m flows.build [CONFIG.yaml]
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

import flows
import flows.early
from flows.api import prefect_api, run_helpers
from pipeline.build import (
    longloom_commit,
    preflight,
    rebuild_command,
)
from pipeline.core import storage
from pipeline.core.progress import LogReporter, Reporter, active_reporter, throttled
from pipeline.core.workdir import WorkDir
from pipeline.output.card import headline_rows, inline_images, split_front_matter
from pipeline.output.report import (
    RunClock,
    build_report,
    write_report,
)
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from pipeline.stages.embed import EmbedStage
from pipeline.stages.plan import run_plan
from schemas.config import BuildConfig, load_config, with_overrides
from schemas.manifest import Manifest
from schemas.redact import redact_url

DEFAULT_CONFIG = flows.DEFAULT_CONFIG


@task(name="stage-unit", cache_policy=NO_CACHE)
def unit_task(job: StageWork, unit: Any) -> Any:
    """One unit of one stage (a shard, a batch, a step): `job.run_unit(unit)`, logged to the flow run.

    The task is renamed per stage (`Stage.task_name`: prepare-shard, write-shard, ...) where it is mapped.
    """
    logger = get_run_logger()
    out = job.ctx.cfg.output.dir
    if storage.is_remote(out):
        # This process works in its own mirror of the store: fetch what other processes committed,
        # and bind the stage again here, so every path it holds is a path of this process's mirror.
        storage.pull(out)
        job = job.stage.bind(job.ctx, job.inputs)
    progress = throttled(logger.info, job.label(unit))
    # a unit `longloom build` started before the flow existed (flows.early): wait for it, or take it
    early = flows.early.active(job.ctx.cfg)
    started = early.adopt(job.key, unit, progress) if early is not None else None
    res = started.result() if started is not None else job.run_unit(unit, progress)
    storage.push(out)  # the unit's files, then its record last (nothing for a local output)
    line = job.log_line(res)
    if line:
        logger.info("%s", line)
    return res


def stage_task(stage: Stage, cfg: BuildConfig) -> Any:
    """`unit_task` named for `stage`, with the stage's retries (None: the run's `run.retries`)."""
    retries = cfg.run.retries if stage.retries is None else stage.retries
    task = unit_task.with_options(
        name=stage.task_name, retries=retries, retry_delay_seconds=cfg.run.retry_delay_seconds
    )
    if stage.no_retry_on:
        task = task.with_options(retry_condition_fn=retry_condition(stage.no_retry_on))
    return task


def retry_condition(no_retry: tuple[type[BaseException], ...]) -> Callable[[Any, Any, Any], bool]:
    """A Prefect retry condition: retry unless the unit failed with one of `no_retry`."""

    def retry_unless(task: Any, task_run: Any, state: Any) -> bool:
        return not isinstance(state.data, no_retry)

    return retry_unless


# the embed stage's: a model that cannot be loaded fails the same way on every try
retry_unless_embedder_error = retry_condition(EmbedStage.no_retry_on)


def card_artifacts(cfg: BuildConfig, manifest: Manifest) -> None:
    """Attach the dataset card (Markdown) and its headline figures (a table) to the flow run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = re.sub(r"[^a-z0-9-]+", "-", cfg.run.name.lower()).strip("-") or "longloom"
    out = WorkDir(cfg).out  # a URL output: this process's mirror of it
    _, body = split_front_matter((out / "README.md").read_text(encoding="utf-8"))
    # plots embedded: the UI cannot resolve the card's relative images/*.png links (issue 12.26)
    create_markdown_artifact(
        markdown=inline_images(out, body),
        key=f"{key}-card",
        description="Dataset card (README.md)",
    )
    create_table_artifact(
        table=headline_rows(manifest),
        key=f"{key}-headline",
        description=f"Rows and tokens per config and source, config {manifest.config_hash}",
    )


def summary_lines(m: Manifest) -> list[str]:
    """The end-of-run summary: rows, tokens, per-source mixture, drops by reason, reconciliation."""
    lines = [f"config {m.config_hash}, tokenizer {m.tokenizer.name} ({m.tokenizer.vocab_hash})"]
    for t in m.targets:
        lines.append(
            f"  {t.config_name}: {t.rows} rows x {t.target_length} = {t.tokens} tokens "
            f"({t.content_tokens} document, {t.pad_tokens} padding) in {len(t.shards)} shards; "
            f"{t.split_documents} documents split ({t.needless_splits} that would have fit)"
        )
    packed = sum(c.packed_tokens for c in m.sources.values()) or 1
    for name, c in m.sources.items():
        drops = ", ".join(f"{k}={v}" for k, v in sorted({**c.quarantined, **c.filtered}.items())) or "none"
        lines.append(
            f"  source {name}: {c.records_read} read, {c.kept} kept ({c.packed_tokens} tokens, "
            f"{100 * c.packed_tokens / packed:.1f}% of output); dropped: {drops}"
        )
    if "procedural" in m.extra:
        from pipeline.stages.procedural import describe

        lines += describe(m.extra["procedural"])
    if "rewriter" in m.extra:
        rw = m.extra["rewriter"]
        lines.append(
            f"  rewriter: {rw['accepted']}/{rw['requested']} accepted; rejected {rw['rejected']}; "
            f"failed {rw['failed']} (spending in report.json)"
        )
    bad = [c for c in m.checks if not c.ok]
    lines.append(f"  reconciliation: {len(m.checks) - len(bad)}/{len(m.checks)} checks pass")
    lines += [f"    FAILED {c.name}: {c.detail}" for c in bad]
    return lines


R = TypeVar("R")


def gather(
    futures: list[PrefectFuture[R]],
    rep: Reporter,
    stage: str,
    describe: Callable[[R], tuple[str, dict[str, int]]],
) -> list[R]:
    """Results in submission order, advancing the stage's progress (label, counts) as each unit finishes."""
    index = {f.task_run_id: i for i, f in enumerate(futures)}
    out: list[Any] = [None] * len(futures)
    for f in as_completed(futures):
        r = f.result()
        out[index[f.task_run_id]] = r
        label, counts = describe(r)
        rep.advance(stage, label=label, **counts)
    return out


@flow(name="longloom-build", log_prints=True, validate_parameters=False)
def build(config: BuildConfig, command: str | None = None) -> dict[str, Any]:
    """Read, filter, tokenize and pack every source into exact-length rows with lineage."""
    logger = get_run_logger()
    cfg = config
    command = command or "python -m flows.build"
    rep = active_reporter() or LogReporter(logger.info)
    shards = preflight(cfg)  # a bad config or missing input fails here, before anything is written
    work = WorkDir(cfg)
    shown = storage.shown(cfg.output.dir)
    logger.info("%d input shards from %d sources -> %s", len(shards), len(cfg.sources), shown)
    # an output folder on a URL: resume from what the store holds (no-ops for a local folder)
    storage.pull(cfg.output.dir)

    early = flows.early.active(cfg)  # holds the lock already, its units running (flows.early)
    lead: dict[str, float] = {}  # per stage: how long its units ran before the flow reached it

    def run_units(stage: Stage, job: StageWork, units: list[Any]) -> list[Any]:
        if early is not None and stage.name == early.stage:
            lead[stage.name] = time.perf_counter() - early.started
            early.stop()  # from here the task runner decides how many units run at once
        storage.push(cfg.output.dir)  # what the earlier stages' merges wrote, before workers read it
        done = gather(stage_task(stage, cfg).map(unmapped(job), units), rep, stage.name, job.advance)
        storage.pull(cfg.output.dir)  # what the units committed, for the merge
        return done

    with contextlib.ExitStack() as held:
        if early is None:  # else the early start took the lock and removed the temporaries
            held.enter_context(work.lock(logger.info))
        held.enter_context(run_helpers(work.root, logger.info))
        if early is None:
            work.remove_temporaries()
        clock = RunClock()
        if early is not None:
            clock._t0 = early.started  # the run began when its first units did
            logger.info("%s: %d units started before the flow run", early.stage, len(early.units))

        def after_report(manifest: Manifest, extra: dict[str, Any]) -> None:
            if early is not None and early.stage in clock.stages:
                # the stage's seconds count from its early start, not from when the flow reached it
                st = clock.stages[early.stage]
                st.seconds = round(st.seconds + lead.get(early.stage, 0.0), 3)
            address = redact_url(cfg.run.dask_address) if cfg.run.dask_address else "local"
            runner = f"dask {address}" if cfg.run.task_runner == "dask" else "threads"
            report = build_report(manifest, clock, shown, runner, command)
            md = write_report(work.out, report | extra)
            for line in summary_lines(manifest):
                logger.info(line)
            card_artifacts(cfg, manifest)
            logger.info("run report (%s):\n%s", work.out / "report.md", md)

        # the same loop as pipeline.build.run_stages; only how units run differs
        inputs = run_plan(
            RunContext(cfg, command), Inputs(shards=shards), run_units, rep, clock, after_report
        )
        storage.push(cfg.output.dir)  # finalize's manifest (last), the card, the report
    manifest = inputs["finalize"]
    result: dict[str, Any] = {
        "output_dir": shown,
        "config_hash": manifest.config_hash,
        "rows": {t.config_name: t.rows for t in manifest.targets},
        "tokens": {t.config_name: t.tokens for t in manifest.targets},
        "checks_ok": manifest.ok,
        "report": str(work.out / "report.md"),
    }
    if inputs.get("publish") is not None:
        result["published"] = inputs["publish"]
    return result


def task_runner_for(cfg: BuildConfig, api_url: str | None = None) -> Any:
    """Threads on one machine, or Dask: a local cluster, or an existing scheduler's address.

    Dask workers are pointed at `api_url` (the flow's Prefect API) before they run a task.
    """
    if cfg.run.task_runner == "dask":
        from flows.dask_runner import ReportingDaskTaskRunner

        if cfg.run.dask_address:
            return ReportingDaskTaskRunner(address=cfg.run.dask_address, api_url=api_url)
        return ReportingDaskTaskRunner(
            cluster_kwargs={"n_workers": cfg.run.workers, "threads_per_worker": 1}, api_url=api_url
        )
    return ThreadPoolTaskRunner(max_workers=cfg.run.workers)


def run(cfg: BuildConfig, command: str | None = None) -> dict[str, Any]:
    """Run the flow with the task runner the config asks for, against the configured Prefect API or a
    temporary one started here (see `flows.api`)."""
    if cfg.run.task_runner == "dask" and not storage.is_remote(cfg.output.dir):
        # workers may start elsewhere: give them an output path that does not depend on their cwd
        cfg = with_overrides(cfg, "output", dir=str(Path(cfg.output.dir).resolve()))
    with prefect_api() as (api_url, _):
        return with_task_runner(build, task_runner_for(cfg, api_url))(cfg, command=command)


F = TypeVar("F")


def with_task_runner(f: F, runner: Any) -> F:
    """`f.with_options(task_runner=runner)` without building the flow again: `with_options` constructs
    a new `Flow`, and its constructor regenerates the JSON schema of the flow's parameters (the whole
    `BuildConfig`: 0.4-0.8 s of CPU on every build, measured on a loaded 2-core machine). A copy
    shares that schema; only the task runner differs."""
    g = copy.copy(f)
    g.task_runner = runner  # type: ignore[attr-defined]
    return g


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0] if args else DEFAULT_CONFIG)
    result = run(cfg, command=rebuild_command(args[0] if args else None, cfg.output.dir, longloom_commit()))
    return 0 if result["checks_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
