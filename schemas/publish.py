"""Config for the dataset card and hub publishing (issue 6).

Neither section changes a byte of the data, so both are left out of the config hash.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

REPO_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$"


class CardConfig(BaseModel):
    """What goes into the generated README.md beyond what the manifest and rows say."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=True,
        description="Write the full dataset card; False writes only the `configs:` metadata `datasets` needs.",
    )
    plots: bool = Field(default=True, description="Draw the histograms under images/ (matplotlib).")
    pretty_name: str | None = Field(default=None, description="Card title; defaults to run.name.")
    description: str | None = Field(
        default=None, description="A paragraph of your own, placed under the generated summary."
    )
    tags: list[str] = Field(default_factory=list, description="Extra hub tags, added to the generated ones.")
    limitations: list[str] = Field(
        default_factory=list, description="Extra known limitations, added to the generated ones."
    )


class PublishConfig(BaseModel):
    """Push the output folder to a Hugging Face-compatible hub as a dataset repo (`HF_ENDPOINT`, `HF_TOKEN`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=False, description="Publish at the end of every flow run.")
    repo_id: str | None = Field(
        default=None, pattern=REPO_ID_PATTERN, description="ORG/NAME of the dataset repo."
    )
    private: bool = Field(default=False, description="Create the repo private (ignored if it exists).")
    revision: str = Field(default="main", description="Branch to commit to.")
    include_audit: bool = Field(
        default=True, description="Also upload the audit tables (filtered, quarantine, pruned, ...)."
    )
    delete_stale: bool = Field(
        default=True,
        description="Delete files under data/, audit/ and images/ on the hub that this run did not write.",
    )

    @model_validator(mode="after")
    def _repo_when_enabled(self) -> PublishConfig:
        if self.enabled and not self.repo_id:
            raise ValueError("publish.enabled needs publish.repo_id (ORG/NAME of the dataset repo)")
        return self
