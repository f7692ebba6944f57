"""The build as a Prefect flow: stage functions from `pipeline` wired as tasks, mapped over shards.

Tasks cover a shard (never a document). Completed work is recorded on disk by the stages
themselves, so a rerun of the flow, even after a crash, skips what is done and verified.

    python -m flows.build [CONFIG.yaml]
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

import flows
from flows.api import prefect_api, run_helpers
from pipeline.build import (
    diversity_outputs,
    diversity_report,
    group_by_target,
    lineage_steps,
    longloom_commit,
    output_units,
    preflight,
    rebuild_command,
)
from pipeline.card import headline_rows, inline_images, split_front_matter
from pipeline.finalize import finalize_run
from pipeline.prepare import PrepareResult, prepare_shard
from pipeline.progress import LogReporter, Reporter, active_reporter, throttled
from pipeline.readers import InputShard
from pipeline.report import (
    RunClock,
    build_report,
    prepare_counts,
    select_counts,
    write_counts,
    write_report,
)
from pipeline.rows import WrittenShard, write_shard
from pipeline.select import SelectResult, select_and_layout
from pipeline.workdir import WorkDir
from schemas.config import BuildConfig, load_config, with_overrides
from schemas.manifest import Manifest, ShardEntry, StageReport
from schemas.redact import redact_url

DEFAULT_CONFIG = flows.DEFAULT_CONFIG


@task(name="prepare-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def prepare_task(cfg: BuildConfig, shard: InputShard) -> PrepareResult:
    logger = get_run_logger()
    res = prepare_shard(cfg, shard, WorkDir(cfg), throttled(logger.info, shard.shard_id))
    logger.info(
        "%s: %d records, %d documents, %d kept (%d tokens), %d quarantined%s",
        shard.shard_id,
        res.records_read,
        res.documents,
        res.kept,
        res.kept_tokens,
        sum(res.quarantined.values()),
        " (reused a verified earlier result)" if res.reused else "",
    )
    return res


def retry_unless_embedder_error(task: Any, task_run: Any, state: Any) -> bool:
    """A model that cannot be loaded fails the same way on every try: end the task instead of retrying."""
    from pipeline.embed import EmbedderError

    return not isinstance(state.data, EmbedderError)


@task(
    name="embed-shard",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_embedder_error,
)
def embed_task(cfg: BuildConfig, prepared: PrepareResult) -> Any:
    from pipeline.embed_stage import embed_shard

    res = embed_shard(cfg, WorkDir(cfg), prepared)
    get_run_logger().info(
        "%s: %d documents embedded (%d cache hits, %d misses, %d model calls%s)",
        res.shard_id,
        res.documents,
        res.cache_hits,
        res.cache_misses,
        res.model_calls,
        ", reused" if res.reused else "",
    )
    return res


@task(name="select-and-layout", cache_policy=NO_CACHE, retries=1)
def select_task(cfg: BuildConfig, prepared: list[PrepareResult]) -> SelectResult:
    res = select_and_layout(cfg, WorkDir(cfg), prepared)
    for t in res.targets:
        get_run_logger().info(
            "%s: %d rows in %d shards (%s), %d documents split",
            t.config_name,
            t.n_rows,
            t.n_shards,
            t.strategy,
            t.split_documents,
        )
    return res


@task(name="write-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def write_task(
    cfg: BuildConfig,
    unit: tuple[int, int],
    selected: SelectResult,
    prepared: list[PrepareResult],
    steps: list[str],
) -> WrittenShard:
    ti, k = unit
    logger = get_run_logger()
    label = f"{selected.targets[ti].config_name}/{k}"
    w = write_shard(cfg, WorkDir(cfg), selected, prepared, ti, k, steps, throttled(logger.info, label))
    e = w.entry
    verb = "kept verified" if w.reused else "wrote"
    logger.info("%s %s: %d rows, %d tokens", verb, e.path, e.rows, e.tokens)
    return w


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(
    cfg: BuildConfig,
    prepared: list[PrepareResult],
    selected: SelectResult,
    entries: list[ShardEntry],
    stages: dict[str, StageReport],
    command: str,
    optional: dict[str, dict] | None = None,
    embedded: list | None = None,
) -> Manifest:
    work = WorkDir(cfg)
    opt = optional or {}
    audit_extra, extra = diversity_outputs(cfg, work, embedded or [], selected)
    return finalize_run(
        cfg,
        work,
        prepared,
        selected,
        group_by_target(selected, entries),
        stages,
        command,
        extra={**opt.get("extra", {}), **extra},
        extra_configs=opt.get("extra_configs", {}),
        audit_extra={**opt.get("audit_extra", {}), **audit_extra},
    )


@task(name="publish", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def publish_task(cfg: BuildConfig) -> dict[str, Any]:
    """Push the finished output to the hub (`publish:` config); uploads only what changed."""
    from pipeline.publish import publish_configured

    res = publish_configured(Path(cfg.output.dir), cfg.publish)
    logger = get_run_logger()
    for line in res.plan.lines():
        logger.info(line)
    return {
        "repo_id": res.plan.repo_id,
        "commit": res.commit,
        "uploaded": [c.path for c in res.plan.of("add", "update")],
        "deleted": [c.path for c in res.plan.of("delete")],
    }


def card_artifacts(cfg: BuildConfig, manifest: Manifest) -> None:
    """Attach the dataset card (Markdown) and its headline figures (a table) to the flow run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = re.sub(r"[^a-z0-9-]+", "-", cfg.run.name.lower()).strip("-") or "longloom"
    _, body = split_front_matter((Path(cfg.output.dir) / "README.md").read_text(encoding="utf-8"))
    # plots embedded: the UI cannot resolve the card's relative images/*.png links (issue 12.26)
    create_markdown_artifact(
        markdown=inline_images(Path(cfg.output.dir), body),
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
        from pipeline.procedural.stage import describe

        lines += describe(m.extra["procedural"])
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
    work = WorkDir(cfg)
    shards = preflight(cfg)  # a bad config or missing input fails here, before anything is written
    with work.lock(logger.info), run_helpers(work.root, logger.info):
        work.remove_temporaries()
        clock = RunClock()
        stages: dict[str, StageReport] = {}
        with clock.stage("prepare") as st:
            logger.info(
                "%d input shards from %d sources -> %s", len(shards), len(cfg.sources), cfg.output.dir
            )
            rep.start("prepare", len(shards), "shards")
            prep = prepare_task.with_options(
                retries=cfg.run.retries, retry_delay_seconds=cfg.run.retry_delay_seconds
            )
            prepared = gather(
                prep.map(unmapped(cfg), shards),
                rep,
                "prepare",
                lambda r: (r.shard_id, {"tokens": r.kept_tokens}),
            )
            st.units, st.reused = len(prepared), sum(r.reused for r in prepared)
        stages["prepare"] = prepare_counts(prepared)
        embedded: list = []
        if cfg.diversity.embedder:  # a task per prepared shard, like prepare
            with clock.stage("embed") as st:
                rep.start("embed", len(prepared), "shards")
                emb = embed_task.with_options(
                    retries=cfg.run.retries, retry_delay_seconds=cfg.run.retry_delay_seconds
                )
                embedded = gather(
                    emb.map(unmapped(cfg), prepared), rep, "embed", lambda e: (e.shard_id, {"docs": e.documents})
                )
                st.units, st.reused = len(embedded), sum(e.reused for e in embedded)
            stages["embed"] = StageReport(
                items_in=sum(r.kept for r in prepared), items_out=sum(e.documents for e in embedded)
            )
        with clock.stage("select") as st:
            rep.start("select", 1, "step")
            selected = select_task(cfg, prepared)
            rep.advance("select", tokens=sum(t.content_tokens for t in selected.targets))
            st.units, st.reused = 1, int(selected.reused)
        stages["select"] = select_counts(prepared, selected)
        with clock.stage("write") as st:
            steps = lineage_steps(prepared, selected)
            write = write_task.with_options(
                retries=cfg.run.retries, retry_delay_seconds=cfg.run.retry_delay_seconds
            )
            units = output_units(selected)
            rep.start("write", len(units), "shards")
            futures = write.map(unmapped(cfg), units, unmapped(selected), unmapped(prepared), unmapped(steps))
            written = gather(futures, rep, "write", lambda w: (w.entry.path, {"rows": w.entry.rows}))
            st.units, st.reused = len(written), sum(w.reused for w in written)
        entries = [w.entry for w in written]
        stages["write"] = write_counts(selected, entries)
        optional: dict[str, dict] = {"extra": {}, "extra_configs": {}, "audit_extra": {}}
        if cfg.procedural.enabled:
            from flows.procedural import procedural_stage

            with clock.stage("procedural") as st:
                proc, stages["procedural"] = procedural_stage(cfg, selected, entries, steps)
                st.units, st.reused = proc.batches, proc.reused
            optional["extra"]["procedural"] = proc.extra
            optional["extra_configs"].update(proc.extra_configs)
        run_stats: dict = {}  # what this run spent, for the report only
        if cfg.rewriter.enabled:
            from flows.rewriter import rewriter_stage
            from pipeline.rewriter.stage import manifest_stats, run_report_stats

            with clock.stage("rewriter") as st:
                rw = rewriter_stage(cfg, selected)
                st.units = 1
            stages["rewriter"] = rw.report
            optional["extra"]["rewriter"] = manifest_stats(rw.stats)
            run_stats |= run_report_stats(rw.stats)
            optional["extra_configs"].update(rw.extra_configs)
            optional["audit_extra"].update(rw.audit_extra)
        with clock.stage("finalize") as st:
            manifest = finalize_task(cfg, prepared, selected, entries, stages, command, optional, embedded)
            st.units = 1
        rep.close()
        address = redact_url(cfg.run.dask_address) if cfg.run.dask_address else "local"
        runner = f"dask {address}" if cfg.run.task_runner == "dask" else "threads"
        report = build_report(manifest, clock, cfg.output.dir, runner, command)
        md = write_report(work.out, report | diversity_report(cfg, work, embedded, selected) | run_stats)
    for line in summary_lines(manifest):
        logger.info(line)
    card_artifacts(cfg, manifest)
    logger.info("run report (%s):\n%s", work.out / "report.md", md)
    result: dict[str, Any] = {
        "output_dir": cfg.output.dir,
        "config_hash": manifest.config_hash,
        "rows": {t.config_name: t.rows for t in manifest.targets},
        "tokens": {t.config_name: t.tokens for t in manifest.targets},
        "checks_ok": manifest.ok,
        "report": str(work.out / "report.md"),
    }
    if cfg.publish.enabled:
        result["published"] = publish_task(cfg)
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
    if cfg.run.task_runner == "dask":
        # workers may start elsewhere: give them an output path that does not depend on their cwd
        cfg = with_overrides(cfg, "output", dir=str(Path(cfg.output.dir).resolve()))
    with prefect_api() as (api_url, _):
        return build.with_options(task_runner=task_runner_for(cfg, api_url))(cfg, command=command)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0] if args else DEFAULT_CONFIG)
    result = run(cfg, command=rebuild_command(args[0] if args else None, cfg.output.dir, longloom_commit()))
    return 0 if result["checks_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
