"""Config for synthesized long-range-dependency chat samples (issues 4 and 5)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from schemas.procedural import ProceduralConfig as ProceduralConfig  # issue 4: the `procedural:` section


class RewriterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
