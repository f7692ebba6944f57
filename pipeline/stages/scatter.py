"""The scatter stage: the first phase of partitioned selection (`run.select_partitions` > 1 only).

One unit per prepared shard reads that shard's `doc_id`, `content_hash` and `n_tokens` columns once
and writes one small file per hash partition (`pipeline.corpus.partition.scatter_shard`). The select
stage's partition units then read only their partition's files, one per shard, so the corpus's
hashes are read once in all instead of once per partition (a map-side shuffle, as in MapReduce).

It is a stage of its own because the stage protocol has one phase of units per stage: every scatter
unit must finish before any partition unit starts. It declares the select stage's config sections
and writes into the select stage's folder: it is part of selection, refuses what partitioned
selection refuses (before any work), and is redone whenever selection is.
"""

from __future__ import annotations

from pipeline.core.progress import UnitProgress
from pipeline.corpus.partition import ScatterResult, check_partitioned, scatter_shard
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from pipeline.stages.select import SelectStage
from schemas.config import BuildConfig
from schemas.stage_config import SelectConfig


class ScatterStage(Stage):
    """Split every prepared shard's hashes by partition for the select stage's partition units."""

    name = "scatter"
    sections = SelectStage.sections
    inputs = ("prepare",)
    unit_noun = "shards"
    config_type = SelectConfig
    task_name = "select-scatter"

    def enabled(self, cfg: BuildConfig) -> bool:
        return cfg.run.select_partitions > 1

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Scatter(self, ctx, inputs)


class _Scatter(StageWork[int, ScatterResult]):
    def units(self) -> list[int]:
        check_partitioned(self.cfg)
        return list(range(len(self.inputs["prepare"])))

    def run_unit(self, unit: int, progress: UnitProgress | None = None) -> ScatterResult:
        return scatter_shard(self.cfg, self.ctx.work, self.inputs["prepare"], unit)

    def label(self, unit: int) -> str:
        return f"scatter {self.inputs['prepare'][unit].shard_id}"

    def advance(self, result: ScatterResult) -> tuple[str, dict[str, int]]:
        return self.stage.name, {"documents": result.documents}
