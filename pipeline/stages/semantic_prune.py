"""The semantic_prune stage (partitioned SemDeDup/D4): clusters dealt to P groups in the bind, SemDeDup
then D4 a unit per group; the merge writes the `pruned` rows and statistics and hands the drops to the
select stage's merge (`pipeline.corpus.semantic.partitioned`)."""

from __future__ import annotations

import numpy as np

from pipeline.core.progress import UnitProgress
from pipeline.corpus.semantic.partitioned import (
    GroupResult,
    SemanticResult,
    deal_groups,
    merge_groups,
    prune_group,
    write_groups,
)
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from pipeline.stages.semantic_exact import PartitionedSemantic


class SemanticPruneStage(PartitionedSemantic):
    """SemDeDup, then D4, per group of clusters; the merge writes the audit rows and statistics."""

    name = "semantic_prune"
    inputs = ("prepare", "embed", "semantic_assign")
    unit_noun = "groups"
    task_name = "semantic-prune-group"

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Prune(self, ctx, inputs)


class _Prune(StageWork[int, GroupResult]):
    def __init__(self, stage: Stage, ctx: RunContext, inputs: Inputs) -> None:
        super().__init__(stage, ctx, inputs)
        self.centroids, self.assigned = inputs["semantic_assign"]
        k = self.centroids.k
        members = np.sum([a.members for a in self.assigned], axis=0) if self.assigned else np.zeros(k)
        guests = np.sum([a.guests for a in self.assigned], axis=0) if self.assigned else np.zeros(k)
        flow = [f for a in self.assigned for f in a.flow]
        self.groups = deal_groups(members, guests, flow, self.cfg.run.select_partitions)
        write_groups(ctx.work, self.cfg.run.select_partitions, self.groups)

    def units(self) -> list[int]:
        return list(range(self.cfg.run.select_partitions))

    def run_unit(self, unit: int, progress: UnitProgress | None = None) -> GroupResult:
        return prune_group(
            self.cfg, self.ctx.work, self.inputs["prepare"], self.centroids, self.assigned, self.groups, unit
        )

    def merge(self, results: list[GroupResult]) -> SemanticResult:
        return merge_groups(self.cfg, self.ctx.work, self.inputs["prepare"], self.centroids, results)

    def label(self, unit: int) -> str:
        return f"semantic group {unit}/{self.cfg.run.select_partitions}"

    def log_line(self, r: GroupResult) -> str:
        pruned = {rule: s.get("pruned", 0) for rule, s in r.stats.items()}
        return f"semantic group {r.group}: {r.documents} documents, pruned {pruned}"
