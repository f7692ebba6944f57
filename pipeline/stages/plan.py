"""The pipeline: the one ordered list of stages (`STAGES`), and the loop every executor is (`run_plan`).

Every executor is a loop over `STAGES` (see `pipeline.stages.base` for the protocol):
`pipeline.build.run_build` in this process, `flows.build` as Prefect tasks. Each stage is defined
next to its code, in `pipeline/stages/<name>.py`: the config sections it depends on, the earlier
stages it reads, its units and how to run one.

Selection works on the corpus index and must not import the packages that build on that index (the
semantic package imports the index; an import back would be a circle). So its wiring lives here, one
level up: exact dedup, the configured semantic selectors (SemDeDup, D4), then source budgets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.core.progress import Reporter
from pipeline.core.results import PrepareResult, SelectResult
from pipeline.core.workdir import WorkDir
from pipeline.corpus.exact import exact_dedup, source_budgets
from pipeline.corpus.index import Selector
from pipeline.output.report import RunClock
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from pipeline.stages.embed import EmbedStage
from pipeline.stages.finalize import FinalizeStage
from pipeline.stages.long_dependency import LongDepStage
from pipeline.stages.prepare import PrepareStage
from pipeline.stages.procedural import ProceduralStage
from pipeline.stages.publish import PublishStage
from pipeline.stages.rewriter import RewriterStage
from pipeline.stages.scatter import ScatterStage
from pipeline.stages.select import RoutePriority, SelectStage, SimilarityOrder, select_and_layout
from pipeline.stages.semantic_assign import SemanticAssignStage
from pipeline.stages.semantic_exact import SemanticExactStage
from pipeline.stages.semantic_prune import SemanticPruneStage
from pipeline.stages.write import WriteStage
from schemas.config import BuildConfig, ConfigError
from schemas.manifest import Manifest
from schemas.stage_config import SelectConfig


def semantic_selectors(cfg: SelectConfig) -> list[Selector]:
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


def long_dependency_selectors(cfg: SelectConfig) -> list[Selector]:
    """`long_dependency`'s per-source filters (min_score, keep_top_fraction), when any is set."""
    if not (cfg.long_dependency.enabled and cfg.long_dependency.filters_any()):
        return []
    from pipeline.longdep.use import long_dependency_filter

    return [long_dependency_filter]


def corpus_selectors(cfg: SelectConfig) -> list[Selector]:
    """The selectors of the select stage, in the order they run on what the previous ones kept.

    Long-dependency filters run after dedup and pruning (fractions are of distinct documents) and
    before source budgets (a budget then fills with the documents that passed)."""
    return [exact_dedup, *semantic_selectors(cfg), *long_dependency_selectors(cfg), source_budgets]


def route_priority(cfg: SelectConfig) -> RoutePriority | None:
    """`long_dependency.route: longest_first`'s routing key (the scores), None otherwise."""
    if not (cfg.long_dependency.enabled and cfg.long_dependency.route == "longest_first"):
        return None
    from pipeline.longdep.use import route_priority as by_score

    return by_score


def packing_order(cfg: SelectConfig) -> SimilarityOrder | None:
    """`packing.strategy: similarity`'s document order, None for the other strategies."""
    if cfg.packing.strategy != "similarity":
        return None
    from pipeline.corpus.semantic import similarity_order

    return similarity_order


def select(cfg: BuildConfig, work: WorkDir, prepared: list[PrepareResult]) -> SelectResult:
    """The select stage with what the stage list hands it (selectors and order)."""
    return select_and_layout(
        cfg, work, prepared, corpus_selectors(cfg), packing_order(cfg), route_priority(cfg)
    )


# The pipeline, in the order it runs. Both executors loop over this list; nothing else orders stages.
STAGES: list[Stage] = [
    PrepareStage(),
    EmbedStage(),
    LongDepStage(),
    ScatterStage(),  # only when run.select_partitions > 1: the partition units' input files
    # partitioned SemDeDup/D4: only with run.select_partitions > 1 and SemDeDup or D4 on
    SemanticExactStage(),
    SemanticAssignStage(),
    SemanticPruneStage(),
    SelectStage(corpus_selectors, packing_order, route_priority),
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
        inputs.record(stage.name, job.key, merged, job.report(merged), job.depends)
        if stage.name == REPORT_AFTER:
            reporter.close()
            after_report(merged, report_extra(ctx, inputs))
    return inputs
