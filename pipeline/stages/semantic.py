"""The partitioned semantic stages: SemDeDup/D4 as units when `run.select_partitions` > 1.

Three stages of the stage list, enabled only when the select stage is partitioned and SemDeDup or D4
is configured (with one partition both run inside the single select unit): exact dedup by hash
partition (the select stage's own units, run first; their records are reused there), assignment of
every shard's vectors to the centroids fitted in the bind, and SemDeDup/D4 per group of clusters. The
design, and what differs from one partition, is `pipeline.corpus.semantic.partitioned`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.progress import UnitProgress
from pipeline.core.results import PrepareResult, inputs_key
from pipeline.corpus.partition import PartitionResult, check_partitioned, dedup_partition
from pipeline.corpus.semantic.partitioned import (
    AssignResult,
    Centroids,
    GroupResult,
    SemanticResult,
    assign_shard,
    deal_groups,
    fit_centroids,
    merge_groups,
    prune_group,
    wanted,
    write_groups,
)
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from schemas.config import BuildConfig
from schemas.stage_config import SemanticStageConfig

SECTIONS = ("sources", "tokenizer", "filters", "diversity")


class _Partitioned(Stage):
    """What the three stages share: their sections, and when they run."""

    sections = SECTIONS
    config_type = SemanticStageConfig
    retries = 1

    def enabled(self, cfg: BuildConfig) -> bool:
        return cfg.run.select_partitions > 1 and wanted(cfg)


class SemanticExactStage(_Partitioned):
    """Exact dedup by hash partition, before SemDeDup (which works on what it kept)."""

    name = "semantic_exact"
    inputs = ("prepare",)
    unit_noun = "partitions"
    task_name = "semantic-exact-partition"

    def enabled(self, cfg: BuildConfig) -> bool:
        on = super().enabled(cfg)
        if on:  # what a partitioned select still refuses, before any stage runs (not after this one)
            check_partitioned(cfg)
        return on

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Exact(self, ctx, inputs)


class _Exact(StageWork[int, PartitionResult]):
    def units(self) -> list[int]:
        return list(range(self.cfg.run.select_partitions))

    def run_unit(self, unit: int, progress: UnitProgress | None = None) -> PartitionResult:
        prepared: list[PrepareResult] = self.inputs["prepare"]
        return dedup_partition(self.cfg, self.ctx.work, prepared, unit, inputs_key(prepared))

    def label(self, unit: int) -> str:
        return f"semantic exact {unit}/{self.cfg.run.select_partitions}"


class SemanticAssignStage(_Partitioned):
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


class SemanticPruneStage(_Partitioned):
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


def semantic_stages() -> list[Any]:
    """The three stages, in the order they run (before the select stage)."""
    return [SemanticExactStage(), SemanticAssignStage(), SemanticPruneStage()]
