"""The build as a Prefect flow: stage functions from `pipeline` wired as tasks, mapped over shards.

Tasks cover a shard (never a document). Completed work is recorded on disk by the stages
themselves, so a rerun of the flow, even after a crash, skips what is done and verified.

    python -m flows.build [CONFIG.yaml]
"""

from __future__ import annotations

import sys
import time
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

import flows
from pipeline.build import diversity_outputs, group_by_target, lineage_steps, output_units, preflight
from pipeline.finalize import finalize_run
from pipeline.prepare import PrepareResult, prepare_shard
from pipeline.readers import InputShard
from pipeline.rows import write_output_shard
from pipeline.select import SelectResult, select_and_layout
from pipeline.workdir import WorkDir
from schemas.config import BuildConfig, load_config
from schemas.manifest import Manifest, ShardEntry, StageReport

DEFAULT_CONFIG = flows.DEFAULT_CONFIG


@task(name="prepare-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def prepare_task(cfg: BuildConfig, shard: InputShard) -> PrepareResult:
    res = prepare_shard(cfg, shard, WorkDir(cfg))
    get_run_logger().info(
        "%s: %d records, %d documents, %d kept (%d tokens), %d quarantined",
        shard.shard_id,
        res.records_read,
        res.documents,
        res.kept,
        res.kept_tokens,
        sum(res.quarantined.values()),
    )
    return res


@task(name="embed-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
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
) -> ShardEntry:
    ti, k = unit
    entry = write_output_shard(cfg, WorkDir(cfg), selected, prepared, ti, k, steps)
    get_run_logger().info("wrote %s: %d rows, %d tokens", entry.path, entry.rows, entry.tokens)
    return entry


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(
    cfg: BuildConfig,
    prepared: list[PrepareResult],
    selected: SelectResult,
    entries: list[ShardEntry],
    stages: dict[str, StageReport],
    command: str,
    embedded: list | None = None,
) -> Manifest:
    work = WorkDir(cfg)
    audit_extra, extra = diversity_outputs(cfg, work, embedded or [], selected)
    return finalize_run(
        cfg,
        work,
        prepared,
        selected,
        group_by_target(selected, entries),
        stages,
        command,
        extra=extra,
        audit_extra=audit_extra,
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
    bad = [c for c in m.checks if not c.ok]
    lines.append(f"  reconciliation: {len(m.checks) - len(bad)}/{len(m.checks)} checks pass")
    lines += [f"    FAILED {c.name}: {c.detail}" for c in bad]
    return lines


@flow(name="longloom-build", log_prints=True, validate_parameters=False)
def build(config: BuildConfig, command: str | None = None) -> dict[str, Any]:
    """Read, filter, tokenize and pack every source into exact-length rows with lineage."""
    logger = get_run_logger()
    cfg = config
    stages: dict[str, StageReport] = {}
    t0 = time.perf_counter()
    shards = preflight(cfg)
    logger.info("%d input shards from %d sources -> %s", len(shards), len(cfg.sources), cfg.output.dir)
    prep = prepare_task.with_options(retries=cfg.run.retries, retry_delay_seconds=cfg.run.retry_delay_seconds)
    prepared = [f.result() for f in prep.map(unmapped(cfg), shards)]
    stages["prepare"] = StageReport(
        seconds=round(time.perf_counter() - t0, 3),
        items_in=sum(r.records_read for r in prepared),
        items_out=sum(r.kept for r in prepared),
        tokens_in=sum(r.tokens_read for r in prepared),
        tokens_out=sum(r.kept_tokens for r in prepared),
    )
    embedded = []
    if cfg.diversity.embedder:  # a task per prepared shard, like prepare
        t0 = time.perf_counter()
        emb = embed_task.with_options(
            retries=cfg.run.retries, retry_delay_seconds=cfg.run.retry_delay_seconds
        )
        embedded = [f.result() for f in emb.map(unmapped(cfg), prepared)]
        stages["embed"] = StageReport(
            seconds=round(time.perf_counter() - t0, 3),
            items_in=sum(r.kept for r in prepared),
            items_out=sum(e.documents for e in embedded),
        )
    t0 = time.perf_counter()
    selected = select_task(cfg, prepared)
    stages["select"] = StageReport(seconds=round(time.perf_counter() - t0, 3))
    t0 = time.perf_counter()
    steps = lineage_steps(prepared, selected)
    write = write_task.with_options(retries=cfg.run.retries, retry_delay_seconds=cfg.run.retry_delay_seconds)
    entries = [
        f.result()
        for f in write.map(
            unmapped(cfg), output_units(selected), unmapped(selected), unmapped(prepared), unmapped(steps)
        )
    ]
    stages["write"] = StageReport(
        seconds=round(time.perf_counter() - t0, 3),
        items_out=sum(e.rows for e in entries),
        tokens_out=sum(e.tokens for e in entries),
    )
    manifest = finalize_task(
        cfg, prepared, selected, entries, stages, command or "python -m flows.build", embedded
    )
    for line in summary_lines(manifest):
        logger.info(line)
    return {
        "output_dir": cfg.output.dir,
        "config_hash": manifest.config_hash,
        "rows": {t.config_name: t.rows for t in manifest.targets},
        "tokens": {t.config_name: t.tokens for t in manifest.targets},
        "checks_ok": manifest.ok,
    }


def task_runner_for(cfg: BuildConfig) -> Any:
    """Threads on one machine, or Dask: a local cluster, or an existing scheduler's address."""
    if cfg.run.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.run.dask_address:
            return DaskTaskRunner(address=cfg.run.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.run.workers, "threads_per_worker": 1})
    return ThreadPoolTaskRunner(max_workers=cfg.run.workers)


def run(cfg: BuildConfig, command: str | None = None) -> dict[str, Any]:
    """Run the flow with the task runner the config asks for."""
    return build.with_options(task_runner=task_runner_for(cfg))(cfg, command=command)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0] if args else DEFAULT_CONFIG)
    result = run(cfg, command="python -m flows.build " + " ".join(args))
    return 0 if result["checks_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
