"""Config for embedding-based pruning and related-document grouping (issue 3)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DiversityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    embedder: str | None = Field(
        default=None,
        description="None disables embedding; 'minilm' is the bundled all-MiniLM-L6-v2.",
    )
