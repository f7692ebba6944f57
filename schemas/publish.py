"""Config for the dataset card and hub publishing (issue 6).

Neither section changes a byte of the data, so both are left out of the config hash.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REPO_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$"


def repo_id_problem(repo_id: str) -> str | None:
    """Why the hub would refuse `repo_id` as a dataset repo name, or None if it is acceptable.

    Longloom's own pattern (ORG/NAME, no bare names) is checked first, then huggingface_hub's
    validator, which knows the hub's further rules ("--", "..", a trailing "." or ".git", names
    over 96 characters): an id the hub would refuse is caught here, not as a failed upload.
    """
    import re

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not re.fullmatch(REPO_ID_PATTERN, repo_id):
        return (
            "expected ORG/NAME (letters, digits, '-', '_' and '.', each part starting with a letter or digit)"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        # the hub client's wording, without its repetition of the id (the caller names it)
        return str(err).replace(f": '{repo_id}'", "").rstrip(".")
    return None


class SourceLink(BaseModel):
    """Where a source's text came from and where its licence is written, for the card's Sources table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    origin: str | None = Field(default=None, description="Address of the upstream dataset or project.")
    license_url: str | None = Field(
        default=None, description="Address of the licence text (default: the SPDX page of a known licence)."
    )


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
    sources: dict[str, SourceLink] = Field(
        default_factory=dict,
        description="Per source name: its upstream origin and licence link, shown in the card's Sources table.",
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

    @field_validator("repo_id")
    @classmethod
    def _hub_accepts_repo_id(cls, v: str | None) -> str | None:
        if v is not None and (problem := repo_id_problem(v)):
            raise ValueError(f"{problem}; the hub would refuse this repo id")
        return v

    @model_validator(mode="after")
    def _repo_when_enabled(self) -> PublishConfig:
        if self.enabled and not self.repo_id:
            raise ValueError("publish.enabled needs publish.repo_id (ORG/NAME of the dataset repo)")
        return self
