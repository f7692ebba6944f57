"""The embed stage, one prepared shard at a time: its documents' vectors for semantic selection.

How documents are chunked, embedded, cached and stored is `pipeline.embedders.documents`; this module
is the stage's unit (`embed_shard`) over the prepare stage's results.
"""

from __future__ import annotations

from pipeline.core.results import EmbedResult, PrepareResult
from pipeline.core.workdir import WorkDir
from pipeline.embedders.documents import chunk_spans, embed_dir, embed_documents, embed_key
from schemas.stage_config import EmbedConfig

# what tests and tools import from here, besides the stage's unit
__all__ = ["chunk_spans", "embed_dir", "embed_documents", "embed_key", "embed_shard"]


def embed_shard(cfg: EmbedConfig, work: WorkDir, prepared: PrepareResult) -> EmbedResult:
    """Embed one prepared shard (or reuse its verified result)."""
    docs = work.prepare_dir / prepared.files["documents"]
    return embed_documents(cfg, work, prepared.shard_id, docs, prepared.sha256.get("documents"))
