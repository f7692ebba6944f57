"""The embed stage, one prepared shard at a time: its documents' vectors for semantic selection.

How documents are chunked, embedded, cached and stored is `pipeline.embedders.documents`; this module
is the stage's unit (`embed_shard`) over the prepare stage's results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.progress import UnitProgress
from pipeline.core.results import EmbedResult, PrepareResult
from pipeline.core.workdir import WorkDir
from pipeline.embedders.base import EmbedderError
from pipeline.embedders.documents import chunk_spans, embed_dir, embed_documents, embed_key
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from schemas.config import BuildConfig
from schemas.manifest import StageReport
from schemas.stage_config import EmbedConfig

# what tests and tools import from here, besides the stage's unit
__all__ = ["chunk_spans", "embed_dir", "embed_documents", "embed_key", "embed_shard"]


def embed_shard(cfg: EmbedConfig, work: WorkDir, prepared: PrepareResult) -> EmbedResult:
    """Embed one prepared shard (or reuse its verified result)."""
    docs = work.prepare_dir / prepared.files["documents"]
    return embed_documents(cfg, work, prepared.shard_id, docs, prepared.sha256.get("documents"))


class EmbedStage(Stage):
    """Embed each prepared shard's documents for semantic selection (`pipeline.stages.embed`)."""

    name = "embed"
    sections = ("diversity", "tokenizer")
    inputs = ("prepare",)
    config_type = EmbedConfig
    task_name = "embed-shard"
    no_retry_on = (EmbedderError,)  # a model that cannot be loaded fails the same way on every try

    def enabled(self, cfg: BuildConfig) -> bool:
        return bool(cfg.diversity.embedder)

    def key(self, ctx: RunContext, depends: frozenset[str]) -> str:
        # embeddings depend on a few fields of `diversity` only (not on its selection settings)
        return embed_key(ctx.cfg, ctx.work)

    def work_dir(self, ctx: RunContext) -> Path:
        return embed_dir(ctx.cfg, ctx.work)

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Embed(self, ctx, inputs)


class _Embed(StageWork[PrepareResult, Any]):
    def units(self) -> list[PrepareResult]:
        return list(self.inputs["prepare"])

    def run_unit(self, unit: PrepareResult, progress: UnitProgress | None = None) -> Any:
        return embed_shard(self.cfg, self.ctx.work, unit)

    def needs(self, unit: PrepareResult) -> list[Path]:
        """The prepared shard's documents and tokens, and its own embeddings and record (reuse check)."""
        work = self.ctx.work
        own = [embed_dir(self.cfg, work) / f"{unit.shard_id}{ext}" for ext in (".npy", ".json")]
        return [*(work.prepare_dir / unit.files[k] for k in ("documents", "tokens")), *own]

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
