"""The semantic_assign stage (partitioned SemDeDup/D4): centroids in the bind, then every shard's
vectors to their nearest centroids, a unit per prepared shard (`pipeline.corpus.semantic.partitioned`)."""

from __future__ import annotations

from pipeline.core.progress import UnitProgress
from pipeline.core.results import inputs_key
from pipeline.corpus.semantic.partitioned import AssignResult, Centroids, assign_shard, fit_centroids
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from pipeline.stages.semantic_exact import PartitionedSemantic


class SemanticAssignStage(PartitionedSemantic):
    """Centroids (fitted in the bind on the single process's sample), then each shard to them."""

    name = "semantic_assign"
    inputs = ("prepare", "embed", "semantic_exact")
    task_name = "semantic-assign-shard"

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Assign(self, ctx, inputs)


class _Assign(StageWork[int, AssignResult]):
    def __init__(self, stage: Stage, ctx: RunContext, inputs: Inputs) -> None:
        super().__init__(stage, ctx, inputs)
        prepared = inputs["prepare"]
        self.centroids = fit_centroids(
            self.cfg, ctx.work, prepared, inputs["semantic_exact"], inputs_key(prepared)
        )

    def units(self) -> list[int]:
        return list(range(len(self.inputs["prepare"])))

    def run_unit(self, unit: int, progress: UnitProgress | None = None) -> AssignResult:
        return assign_shard(
            self.cfg,
            self.ctx.work,
            self.inputs["prepare"],
            self.inputs["semantic_exact"],
            self.centroids,
            unit,
        )

    def merge(self, results: list[AssignResult]) -> tuple[Centroids, list[AssignResult]]:
        return self.centroids, sorted(results, key=lambda r: r.shard)

    def label(self, unit: int) -> str:
        return f"semantic assign {unit}"
