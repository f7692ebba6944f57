"""Config for synthesized long-range-dependency chat samples (issues 4 and 5)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ProceduralConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False


class RewriterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
