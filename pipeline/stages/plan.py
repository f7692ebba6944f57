"""The pipeline: the one ordered list of stages (`STAGES`), and what each stage is handed.

Every executor is a loop over `STAGES` (see `pipeline.stages.base` for the protocol):
`pipeline.build.run_build` in this process, `flows.build` as Prefect tasks. Each entry names the
config sections it depends on, the earlier stages it reads, and maps its units to the functions of
its module (`pipeline/stages/<name>.py`).

Selection works on the corpus index and must not import the packages that build on that index (the
semantic package imports the index; an import back would be a circle). So its wiring lives here, one
level up: exact dedup, the configured semantic selectors (SemDeDup, D4), then source budgets.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.progress import Reporter, UnitProgress
from pipeline.core.workdir import WorkDir
from pipeline.corpus.exact import exact_dedup, source_budgets
from pipeline.corpus.index import Selector
from pipeline.corpus.partition import PartitionResult, check_partitioned, dedup_partition, select_partitioned
from pipeline.embedders.base import EmbedderError
from pipeline.output.report import RunClock, prepare_counts, select_counts, write_counts
from pipeline.readers import InputShard, list_input_shards
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from pipeline.stages.finalize import finalize_run
from pipeline.stages.prepare import PrepareResult, prepare_shard
from pipeline.stages.select import SelectResult, SimilarityOrder, select_and_layout
from pipeline.stages.select import inputs_key as select_inputs_key
from pipeline.stages.write import WrittenShard, write_shard
from schemas.config import BuildConfig, ConfigError
from schemas.manifest import Manifest, ShardEntry, StageReport


def semantic_selectors(cfg: BuildConfig) -> list[Selector]:
    """Corpus-level selectors of the diversity stage (see pipeline.corpus.semantic), when it is configured.

    A configured stage that cannot run is an error, never a silent skip: a run that asked for SemDeDup
    or D4 and got neither would publish a dataset that says it was deduplicated.
    """
    d = cfg.diversity
    wanted = []
    if d.embedder and d.semdedup.enabled:
        wanted.append("diversity.semdedup")
    if d.embedder and d.d4.keep_fraction is not None and d.d4.keep_fraction < 1.0:
        wanted.append("diversity.d4")
    if not wanted:
        return []
    try:
        from pipeline.corpus.semantic import selectors as diversity_selectors
    except ImportError as err:
        raise ConfigError(
            f"{' and '.join(wanted)} configured (diversity.embedder {d.embedder!r}), but the diversity "
            f"stage cannot be loaded: {err}. Install Longloom's dependencies (pip install -e .), "
            "or set diversity.embedder: null to build without it"
        ) from err
    return list(diversity_selectors())


def corpus_selectors(cfg: BuildConfig) -> list[Selector]:
    """The selectors of the select stage, in the order they run on what the previous ones kept."""
    return [exact_dedup, *semantic_selectors(cfg), source_budgets]


def packing_order(cfg: BuildConfig) -> SimilarityOrder | None:
    """`packing.strategy: similarity`'s document order, None for the other strategies."""
    if cfg.packing.strategy != "similarity":
        return None
    from pipeline.corpus.semantic import similarity_order

    return similarity_order


def select(cfg: BuildConfig, work: WorkDir, prepared: list[PrepareResult]) -> SelectResult:
    """The select stage with what the stage list hands it (selectors and order)."""
    return select_and_layout(cfg, work, prepared, corpus_selectors(cfg), packing_order(cfg))


# ---- the stages ------------------------------------------------------------------------------------


class PrepareStage(Stage):
    """Read, filter and tokenize each input shard (`pipeline.stages.prepare`)."""

    name = "prepare"
    sections = ("sources", "tokenizer", "filters", "packing")
    task_name = "prepare-shard"

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Prepare(self, ctx, inputs)


class _Prepare(StageWork[InputShard, PrepareResult]):
    def units(self) -> list[InputShard]:
        return list(self.inputs.shards) or list_input_shards(self.ctx.cfg)

    def run_unit(self, unit: InputShard, progress: UnitProgress | None = None) -> PrepareResult:
        return prepare_shard(self.ctx.cfg, unit, self.ctx.work, progress)

    def report(self, merged: list[PrepareResult]) -> StageReport:
        return prepare_counts(merged)

    def label(self, unit: InputShard) -> str:
        return unit.shard_id

    def advance(self, r: PrepareResult) -> tuple[str, dict[str, int]]:
        return r.shard_id, {"tokens": r.kept_tokens}

    def log_line(self, r: PrepareResult) -> str:
        return (
            f"{r.shard_id}: {r.records_read} records, {r.documents} documents, {r.kept} kept "
            f"({r.kept_tokens} tokens), {sum(r.quarantined.values())} quarantined"
            + (" (reused a verified earlier result)" if r.reused else "")
        )


class EmbedStage(Stage):
    """Embed each prepared shard's documents for semantic selection (`pipeline.stages.embed`)."""

    name = "embed"
    sections = ("diversity", "tokenizer")
    inputs = ("prepare",)
    task_name = "embed-shard"
    no_retry_on = (EmbedderError,)  # a model that cannot be loaded fails the same way on every try

    def enabled(self, cfg: BuildConfig) -> bool:
        return bool(cfg.diversity.embedder)

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Embed(self, ctx, inputs)


class _Embed(StageWork[PrepareResult, Any]):
    def units(self) -> list[PrepareResult]:
        return list(self.inputs["prepare"])

    def run_unit(self, unit: PrepareResult, progress: UnitProgress | None = None) -> Any:
        from pipeline.stages.embed import embed_shard

        return embed_shard(self.ctx.cfg, self.ctx.work, unit)

    def report(self, merged: list[Any]) -> StageReport:
        prepared = self.inputs["prepare"]
        return StageReport(items_in=sum(r.kept for r in prepared), items_out=sum(e.documents for e in merged))

    def label(self, unit: PrepareResult) -> str:
        return unit.shard_id

    def advance(self, r: Any) -> tuple[str, dict[str, int]]:
        return r.shard_id, {"docs": r.documents}

    def log_line(self, r: Any) -> str:
        return (
            f"{r.shard_id}: {r.documents} documents embedded ({r.cache_hits} cache hits, "
            f"{r.cache_misses} misses, {r.model_calls} model calls{', reused' if r.reused else ''})"
        )


class SelectStage(Stage):
    """Choose documents and lay out rows over the whole corpus (`pipeline.stages.select`)."""

    name = "select"
    sections = ("sources", "filters", "diversity", "packing")
    inputs = ("prepare", "embed")
    unit_noun = "step"
    task_name = "select-and-layout"
    retries = 1

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Select(self, ctx, inputs)


class _Select(StageWork[int | None, Any]):
    def units(self) -> list[int | None]:
        P = self.ctx.cfg.run.select_partitions
        if P == 1:
            return [None]  # one step over small columns of the whole corpus
        check_partitioned(self.ctx.cfg)
        return list(range(P))  # hash partitions (pipeline.corpus.partition); the merge lays out rows

    def run_unit(self, unit: int | None, progress: UnitProgress | None = None) -> Any:
        prepared = self.inputs["prepare"]
        if unit is None:
            return select(self.ctx.cfg, self.ctx.work, prepared)
        return dedup_partition(self.ctx.cfg, self.ctx.work, prepared, unit, select_inputs_key(prepared))

    def merge(self, results: list[Any]) -> SelectResult:
        if self.ctx.cfg.run.select_partitions == 1:
            return results[0]
        return select_partitioned(self.ctx.cfg, self.ctx.work, self.inputs["prepare"], results)

    def label(self, unit: int | None) -> str:
        return "select" if unit is None else f"select partition {unit}/{self.ctx.cfg.run.select_partitions}"

    def advance(self, r: Any) -> tuple[str, dict[str, int]]:
        if isinstance(r, PartitionResult):
            return "select", {"documents": r.documents}
        return "select", {"tokens": sum(t.content_tokens for t in r.targets)}

    def log_line(self, r: Any) -> str:
        if isinstance(r, PartitionResult):
            return f"partition {r.partition}: {r.documents} documents, {r.duplicates} exact duplicates"
        return "; ".join(
            f"{t.config_name}: {t.n_rows} rows in {t.n_shards} shards ({t.strategy}), "
            f"{t.split_documents} documents split"
            for t in r.targets
        )

    def report(self, merged: SelectResult) -> StageReport:
        return select_counts(self.inputs["prepare"], merged)


class WriteStage(Stage):
    """Fill each output shard's rows from the layouts (`pipeline.stages.write`)."""

    name = "write"
    sections = ("sources", "tokenizer", "filters", "diversity", "packing", "output")
    inputs = ("prepare", "select")
    task_name = "write-shard"

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Write(self, ctx, inputs)


class _Write(StageWork[tuple[int, int], WrittenShard]):
    def __init__(self, stage: Stage, ctx: RunContext, inputs: Inputs) -> None:
        super().__init__(stage, ctx, inputs)
        self.steps = lineage_steps(inputs["prepare"], inputs["select"])

    def units(self) -> list[tuple[int, int]]:
        return output_units(self.inputs["select"])

    def run_unit(self, unit: tuple[int, int], progress: UnitProgress | None = None) -> WrittenShard:
        ti, k = unit
        return write_shard(
            self.ctx.cfg,
            self.ctx.work,
            self.inputs["select"],
            self.inputs["prepare"],
            ti,
            k,
            self.steps,
            progress,
        )

    def report(self, merged: list[WrittenShard]) -> StageReport:
        return write_counts(self.inputs["select"], [w.entry for w in merged])

    def label(self, unit: tuple[int, int]) -> str:
        ti, k = unit
        return f"{self.inputs['select'].targets[ti].config_name}/{k}"

    def advance(self, w: WrittenShard) -> tuple[str, dict[str, int]]:
        return w.entry.path, {"rows": w.entry.rows}

    def log_line(self, w: WrittenShard) -> str:
        e = w.entry
        return f"{'kept verified' if w.reused else 'wrote'} {e.path}: {e.rows} rows, {e.tokens} tokens"


class ProceduralStage(Stage):
    """Procedural long-range chat samples over the packed rows (`pipeline.stages.procedural`)."""

    name = "procedural"
    sections = ("procedural", "tokenizer", "packing")
    inputs = ("prepare", "select", "write")
    unit_noun = "batches"
    task_name = "procedural-batch"

    def enabled(self, cfg: BuildConfig) -> bool:
        return cfg.procedural.enabled

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Procedural(self, ctx, inputs)


class _Procedural(StageWork[Any, Any]):
    def __init__(self, stage: Stage, ctx: RunContext, inputs: Inputs) -> None:
        from pipeline.stages.procedural import pool_shards

        super().__init__(stage, ctx, inputs)
        selected, written = inputs["select"], inputs["write"]
        self.steps = lineage_steps(inputs["prepare"], selected)
        self.shards = pool_shards(group_by_target(selected, [w.entry for w in written]))

    def units(self) -> list[Any]:
        from pipeline.stages.procedural import plan_procedural

        return list(plan_procedural(self.ctx.cfg))

    def run_unit(self, unit: Any, progress: UnitProgress | None = None) -> Any:
        from pipeline.stages.procedural import generate_batch

        return generate_batch(self.ctx.cfg, self.ctx.work, unit, self.shards, self.steps)

    def merge(self, results: list[Any]) -> Any:
        from pipeline.stages.procedural import summarize_procedural

        return summarize_procedural(self.ctx.cfg, self.ctx.work, results)

    def report(self, merged: Any) -> StageReport:
        return StageReport(items_out=merged.samples, tokens_out=merged.tokens)

    def reused(self, results: list[Any], merged: Any) -> int:
        return int(merged.reused)

    def label(self, unit: Any) -> str:
        return f"batch {unit.k + 1}/{unit.n}"

    def advance(self, r: Any) -> tuple[str, dict[str, int]]:
        return "procedural", {"samples": len(r.stats)}

    def log_line(self, r: Any) -> str:
        return f"procedural batch: {len(r.stats)} samples ({', '.join(sorted({s.label for s in r.stats}))})"


class RewriterStage(Stage):
    """LLM-rewritten long-context samples (`pipeline.stages.rewriter`)."""

    name = "rewriter"
    sections = ("rewriter", "tokenizer", "packing")
    inputs = ("select", "write")
    unit_noun = "batches"
    task_name = "rewriter-batch"
    retries = 1

    def enabled(self, cfg: BuildConfig) -> bool:
        return cfg.rewriter.enabled

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Rewriter(self, ctx, inputs)


class _Rewriter(StageWork[Any, Any]):
    def __init__(self, stage: Stage, ctx: RunContext, inputs: Inputs) -> None:
        from pipeline.synth.rewriter.plan import make_plan

        super().__init__(stage, ctx, inputs)
        self.plan = make_plan(ctx.cfg, inputs["select"])

    def units(self) -> list[Any]:
        return list(self.plan.batches)

    def run_unit(self, unit: Any, progress: UnitProgress | None = None) -> Any:
        from pipeline.stages.rewriter import run_batch

        return run_batch(self.ctx.cfg, self.ctx.work, unit, self.plan.sample_length)

    def merge(self, results: list[Any]) -> Any:
        from pipeline.stages.rewriter import merge

        return merge(self.ctx.cfg, self.ctx.work, self.plan, results)

    def report(self, merged: Any) -> StageReport:
        return merged.report

    def log_line(self, r: Any) -> str:
        acc = sum(c["accepted"] for c in r.counts.values())
        return f"rewriter batch: {acc} accepted, {r.requests_sent} HTTP requests ({r.seconds:.1f}s)"


class FinalizeStage(Stage):
    """Merge audit tables, reconcile counts, write the manifest and card (`pipeline.stages.finalize`)."""

    name = "finalize"
    sections = (
        "sources",
        "tokenizer",
        "filters",
        "diversity",
        "packing",
        "procedural",
        "rewriter",
        "output",
        "card",
    )
    inputs = ("prepare", "embed", "select", "write", "procedural", "rewriter")
    unit_noun = "step"
    task_name = "finalize"
    retries = 0

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Finalize(self, ctx, inputs)


class _Finalize(StageWork[None, Manifest]):
    def units(self) -> list[None]:
        return [None]

    def run_unit(self, unit: None, progress: UnitProgress | None = None) -> Manifest:
        cfg, work, inp = self.ctx.cfg, self.ctx.work, self.inputs
        selected = inp["select"]
        entries = [w.entry for w in inp["write"]]
        audit_extra, extra = diversity_outputs(cfg, work, inp.get("embed") or [], selected)
        extra_configs: dict[str, Any] = {}
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
        return finalize_run(
            cfg,
            work,
            inp["prepare"],
            selected,
            group_by_target(selected, entries),
            inp.reports,
            self.ctx.command,
            extra=extra,
            extra_configs=extra_configs,
            audit_extra=audit_extra,
        )

    def merge(self, results: list[Manifest]) -> Manifest:
        return results[0]


class PublishStage(Stage):
    """Push the finished output to the hub when `publish:` asks for it and every check passed."""

    name = "publish"
    sections = ("publish",)
    inputs = ("finalize",)
    unit_noun = "step"
    task_name = "publish"
    retries = 1

    def enabled(self, cfg: BuildConfig) -> bool:
        return cfg.publish.enabled

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Publish(self, ctx, inputs)


class _Publish(StageWork[None, dict[str, Any] | None]):
    def units(self) -> list[None]:
        # a run whose reconciliation failed is not published (`longloom publish --allow-failed-checks`)
        return [None] if self.inputs["finalize"].ok else []

    def run_unit(self, unit: None, progress: UnitProgress | None = None) -> dict[str, Any]:
        from pipeline.output.publish import publish_configured

        res = publish_configured(Path(self.ctx.cfg.output.dir), self.ctx.cfg.publish)
        return {
            "repo_id": res.plan.repo_id,
            "commit": res.commit,
            "uploaded": [c.path for c in res.plan.of("add", "update")],
            "deleted": [c.path for c in res.plan.of("delete")],
            "plan": res.plan.lines(),
        }

    def merge(self, results: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        return results[0] if results else None

    def log_line(self, r: dict[str, Any] | None) -> str | None:
        return "\n".join(r["plan"]) if r else None


# The pipeline, in the order it runs. Both executors loop over this list; nothing else orders stages.
STAGES: list[Stage] = [
    PrepareStage(),
    EmbedStage(),
    SelectStage(),
    WriteStage(),
    ProceduralStage(),
    RewriterStage(),
    FinalizeStage(),
    PublishStage(),
]
# The run report (report.json/.md) is written once this stage is done, before the next one runs:
# publishing uploads it with the rest of the output.
REPORT_AFTER = "finalize"


def report_extra(ctx: RunContext, inputs: Inputs) -> dict[str, Any]:
    """What the run report adds beyond the manifest: this run's diversity timings and cache use, and
    what the rewriter spent (requests, cache hits, tokens, cost); never in the manifest, which must be
    byte-identical across runs of one config."""
    cfg, out = ctx.cfg, {}
    if cfg.diversity.embedder:
        from pipeline.output.semantic_report import diversity_run_stats

        out["diversity"] = diversity_run_stats(cfg, ctx.work, inputs.get("embed") or [], inputs["select"])
    rw = inputs.get("rewriter")
    if rw is not None:
        from pipeline.stages.rewriter import run_report_stats

        out |= run_report_stats(rw.stats)
    return out


def enabled_stages(cfg: BuildConfig) -> list[Stage]:
    return [s for s in STAGES if s.enabled(cfg)]


# How an executor runs one stage's units: (stage, its work, its units) -> results in unit order.
UnitRunner = Callable[[Stage, StageWork, list[Any]], list[Any]]


def run_plan(
    ctx: RunContext,
    inputs: Inputs,
    run_units: UnitRunner,
    reporter: Reporter,
    clock: RunClock,
    after_report: Callable[[Manifest, dict[str, Any]], None],
) -> Inputs:
    """The loop every executor is: each enabled stage of `STAGES` in order, bound to what ran before.

    `run_units` is what differs between executors (in this process, or Prefect tasks on threads or
    Dask). `after_report(manifest)` writes the run report once `REPORT_AFTER` is done, before the
    stages after it (publishing uploads the report with the rest); its second argument is
    `report_extra`, what the report holds beyond the manifest.
    """
    for stage in enabled_stages(ctx.cfg):
        with clock.stage(stage.name) as st:
            job = stage.bind(ctx, inputs)
            units = job.units()
            reporter.start(stage.name, len(units), stage.unit_noun)
            results = run_units(stage, job, units)
            merged = job.merge(results)
            st.units, st.reused = len(units), job.reused(results, merged)
        inputs.record(stage.name, job.key, merged, job.report(merged))
        if stage.name == REPORT_AFTER:
            reporter.close()
            after_report(merged, report_extra(ctx, inputs))
    return inputs


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


def diversity_outputs(
    cfg: BuildConfig, work: WorkDir, embedded: list, selected: SelectResult
) -> tuple[dict, dict]:
    """The diversity stage's audit tables and statistics for finalize_run ({} when it is off)."""
    if not cfg.diversity.embedder:
        return {}, {}
    from pipeline.output.semantic_report import diversity_outputs as outputs

    return outputs(cfg, work, embedded, selected)
