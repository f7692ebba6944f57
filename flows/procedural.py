"""The procedural generators as Prefect tasks: one task per batch of samples (never per sample).

Called from the build flow after the packed rows are written; `pipeline.stages.procedural` does the work.
"""

from __future__ import annotations

import time

from prefect import get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from pipeline.build import group_by_target
from pipeline.core.workdir import WorkDir
from pipeline.stages.procedural import (
    BatchResult,
    ProceduralBatch,
    ProceduralSummary,
    generate_batch,
    plan_procedural,
    pool_shards,
    summarize_procedural,
)
from pipeline.stages.select import SelectResult
from schemas.config import BuildConfig
from schemas.manifest import ShardEntry, StageReport


@task(name="procedural-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def procedural_task(
    cfg: BuildConfig, batch: ProceduralBatch, shards: list[tuple[str, int]], steps: list[str]
) -> BatchResult:
    res = generate_batch(cfg, WorkDir(cfg), batch, shards, steps)
    secs = sum(s.seconds for s in res.stats)
    get_run_logger().info(
        "procedural batch %d/%d: %d samples (%s), %.2fs",
        batch.k + 1,
        batch.n,
        len(res.stats),
        ", ".join(sorted({s.label for s in res.stats})),
        secs,
    )
    return res


def procedural_stage(
    cfg: BuildConfig, selected: SelectResult, entries: list[ShardEntry], steps: list[str]
) -> tuple[ProceduralSummary, StageReport]:
    """Plan, map the batch task over the batches, check and summarise."""
    t0 = time.perf_counter()
    logger = get_run_logger()
    plan = plan_procedural(cfg)
    shards = pool_shards(group_by_target(selected, entries))
    logger.info("procedural: %d samples in %d batches", sum(len(b.specs) for b in plan), len(plan))
    run = procedural_task.with_options(
        retries=cfg.run.retries, retry_delay_seconds=cfg.run.retry_delay_seconds
    )
    results = [f.result() for f in run.map(unmapped(cfg), plan, unmapped(shards), unmapped(steps))]
    summary = summarize_procedural(cfg, WorkDir(cfg), results)
    logger.info("procedural: %d samples, %d tokens", summary.samples, summary.tokens)
    report = StageReport(
        seconds=round(time.perf_counter() - t0, 3), items_out=summary.samples, tokens_out=summary.tokens
    )
    return summary, report
