"""The semantic_exact stage: exact dedup by hash partition ahead of partitioned SemDeDup/D4.

The first of three stages (semantic_exact, semantic_assign, semantic_prune) that run SemDeDup/D4 as
units of their own when `run.select_partitions` > 1 and SemDeDup or D4 is configured (with one
partition both run inside the single select unit). This one runs the select stage's own hash-partition
units (`dedup_partition`) first, because SemDeDup works on what exact dedup kept; the select stage
reuses their records. The design, and what differs from one partition, is
`pipeline.corpus.semantic.partitioned`. `PartitionedSemantic` is what the three stages share.
"""

from __future__ import annotations

from pipeline.core.progress import UnitProgress
from pipeline.core.results import PrepareResult, inputs_key
from pipeline.corpus.partition import PartitionResult, check_partitioned, dedup_partition
from pipeline.corpus.semantic.partitioned import wanted
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from schemas.config import BuildConfig
from schemas.stage_config import SemanticStageConfig

SECTIONS = ("sources", "tokenizer", "filters", "diversity")


class PartitionedSemantic(Stage):
    """What the three stages share: their sections, and when they run."""

    sections = SECTIONS
    config_type = SemanticStageConfig
    retries = 1

    def enabled(self, cfg: BuildConfig) -> bool:
        return cfg.run.select_partitions > 1 and wanted(cfg)


class SemanticExactStage(PartitionedSemantic):
    """Exact dedup by hash partition, before SemDeDup (which works on what it kept)."""

    name = "semantic_exact"
    inputs = ("prepare", "scatter")
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
        scattered = self.inputs["scatter"]  # the partition files the scatter stage wrote
        return dedup_partition(self.cfg, self.ctx.work, prepared, unit, inputs_key(prepared), scattered)

    def label(self, unit: int) -> str:
        return f"semantic exact {unit}/{self.cfg.run.select_partitions}"
