"""The LLM rewriter as Prefect tasks: one task per batch of contexts (never per request), then a merge.

Called from the build flow after the packed rows are written; `pipeline.stages.rewriter` does the work.
"""

from __future__ import annotations

from prefect import get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from pipeline.core.workdir import WorkDir
from pipeline.stages.rewriter import BatchResult, RewriterOutput, merge, run_batch, summary_line
from pipeline.stages.select import SelectResult
from pipeline.synth.rewriter.plan import Batch, RewriterPlan, make_plan
from schemas.config import BuildConfig


@task(name="rewriter-batch", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def rewriter_batch_task(cfg: BuildConfig, batch: Batch, sample_length: int) -> BatchResult:
    res = run_batch(cfg, WorkDir(cfg), batch, sample_length)
    acc = sum(c["accepted"] for c in res.counts.values())
    get_run_logger().info(
        "rewriter batch %d: %d/%d accepted, %d HTTP requests (%.1fs)",
        batch.index,
        acc,
        len(batch.plans),
        res.requests_sent,
        res.seconds,
    )
    return res


@task(name="rewriter-merge", cache_policy=NO_CACHE)
def rewriter_merge_task(cfg: BuildConfig, plan: RewriterPlan, results: list[BatchResult]) -> RewriterOutput:
    return merge(cfg, WorkDir(cfg), plan, results)


def rewriter_stage(cfg: BuildConfig, selected: SelectResult) -> RewriterOutput:
    """Plan, map the batch task over the batches, merge; logs progress per batch and a summary."""
    logger = get_run_logger()
    plan = make_plan(cfg, selected)
    logger.info(
        "rewriter: %d samples planned in %d batches against %s (%s), %d unplannable",
        plan.n_planned,
        len(plan.batches),
        cfg.rewriter.model,
        plan.context_config,
        len(plan.unplanned),
    )
    futures = rewriter_batch_task.map(unmapped(cfg), plan.batches, unmapped(plan.sample_length))
    results = [f.result() for f in futures]
    out = rewriter_merge_task(cfg, plan, results)
    logger.info(summary_line(out.stats))
    return out
