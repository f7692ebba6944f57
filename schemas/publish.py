"""Config for the dataset card and hub publishing (issue 6)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class CardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True


class PublishConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    repo_id: str | None = None
