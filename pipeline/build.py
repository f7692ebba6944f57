"""The build as plain function calls, stage by stage: what the Prefect flow runs, minus Prefect.

`run_build` is the reference order of work and what tests call to exercise the library alone. The
flow in `flows/build.py` calls the same stage functions as tasks, mapped over shards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.finalize import finalize_run
from pipeline.prepare import PrepareResult, prepare_shard, tokenizer_for
from pipeline.readers import InputShard, list_input_shards
from pipeline.rows import write_output_shard
from pipeline.select import SelectResult, select_and_layout
from pipeline.workdir import WorkDir
from schemas.config import BuildConfig, ConfigError
from schemas.manifest import Manifest, ShardEntry, StageReport

log = logging.getLogger("longloom")


def preflight(cfg: BuildConfig) -> list[InputShard]:
    """Every check that can fail before work starts: inputs exist, tokenizer and its tokens resolve."""
    from pipeline.tokenizer import TokenizerError

    try:
        tok = tokenizer_for(cfg)
        tok.special_token_id(cfg.packing.separator)
        tok.special_token_id(cfg.packing.pad_token or cfg.packing.separator)
    except TokenizerError as err:
        raise ConfigError(f"tokenizer / packing.separator / packing.pad_token: {err}") from None
    if cfg.diversity.embedder:
        from pipeline.embed import EmbedderError, check_embedder_spec

        try:
            check_embedder_spec(cfg.diversity.embedder)
        except EmbedderError as err:
            raise ConfigError(str(err)) from None
    shards = list_input_shards(cfg)
    if not shards:
        raise ConfigError("sources: no input shards found")
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir: {out} exists and is not a folder")
    return shards


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
    cfg: BuildConfig, command: str | None = None, on_stage: Callable[[str, StageReport], None] | None = None
) -> Manifest:
    """Run every stage in this process, one unit after another."""
    stages: dict[str, StageReport] = {}

    def stage(name: str, t0: float, **kw: int) -> None:
        stages[name] = StageReport(seconds=round(time.perf_counter() - t0, 3), **kw)
        if on_stage:
            on_stage(name, stages[name])

    work = WorkDir(cfg)
    t0 = time.perf_counter()
    shards = preflight(cfg)
    prepared = []
    for s in shards:
        prepared.append(prepare_shard(cfg, s, work))
        log.info("prepared %s: %d documents, %d kept", s.shard_id, prepared[-1].documents, prepared[-1].kept)
    stage(
        "prepare",
        t0,
        items_in=sum(r.records_read for r in prepared),
        items_out=sum(r.kept for r in prepared),
        tokens_in=sum(r.tokens_read for r in prepared),
        tokens_out=sum(r.kept_tokens for r in prepared),
    )
    embedded = []
    if cfg.diversity.embedder:
        from pipeline.embed_stage import embed_shard

        t0 = time.perf_counter()
        embedded = [embed_shard(cfg, work, r) for r in prepared]
        stage(
            "embed", t0, items_in=sum(r.kept for r in prepared), items_out=sum(e.documents for e in embedded)
        )
    t0 = time.perf_counter()
    selected = select_and_layout(cfg, work, prepared)
    stage(
        "select",
        t0,
        items_out=sum(t.documents for t in selected.targets),
        tokens_out=sum(t.content_tokens for t in selected.targets),
    )
    t0 = time.perf_counter()
    steps = lineage_steps(prepared, selected)
    entries = [
        write_output_shard(cfg, work, selected, prepared, ti, k, steps) for ti, k in output_units(selected)
    ]
    stage("write", t0, items_out=sum(e.rows for e in entries), tokens_out=sum(e.tokens for e in entries))
    t0 = time.perf_counter()
    audit_extra, extra = diversity_outputs(cfg, work, embedded, selected)
    manifest = finalize_run(
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
    return manifest


def diversity_outputs(
    cfg: BuildConfig, work: WorkDir, embedded: list, selected: SelectResult
) -> tuple[dict, dict]:
    """The diversity stage's audit tables and statistics for finalize_run ({} when it is off)."""
    if not cfg.diversity.embedder:
        return {}, {}
    from pipeline.diversity import diversity_outputs as outputs

    return outputs(cfg, work, embedded, selected)
