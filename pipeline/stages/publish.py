"""The publish stage: push the finished output to the hub when `publish:` asks for it.

Runs after finalize (and after the run report is written, so it is uploaded with the rest), only when
every reconciliation check passed; how files are planned and uploaded is `pipeline.output.publish`.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.progress import UnitProgress
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from schemas.config import BuildConfig
from schemas.stage_config import PublishStageConfig


class PublishStage(Stage):
    """Push the finished output to the hub when `publish:` asks for it and every check passed."""

    name = "publish"
    sections = ("publish", "output")
    inputs = ("finalize",)
    unit_noun = "step"
    config_type = PublishStageConfig
    task_name = "publish"
    retries = 1

    def enabled(self, cfg: BuildConfig) -> bool:
        return cfg.publish.enabled

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Publish(self, ctx, inputs)


class _Publish(StageWork[None, dict[str, Any] | None]):
    def units(self) -> list[None]:
        # a run whose reconciliation failed is not published (`longloom publish --allow-failed-checks`)
        return [None] if self.inputs["finalize"].ok else []

    def run_unit(self, unit: None, progress: UnitProgress | None = None) -> dict[str, Any]:
        from pipeline.core.storage import output_path  # a URL output: this process's mirror of it
        from pipeline.output.publish import publish_configured

        res = publish_configured(output_path(self.cfg.output.dir), self.cfg.publish)
        return {
            "repo_id": res.plan.repo_id,
            "commit": res.commit,
            "uploaded": [c.path for c in res.plan.of("add", "update")],
            "deleted": [c.path for c in res.plan.of("delete")],
            "plan": res.plan.lines(),
        }

    def merge(self, results: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        return results[0] if results else None

    def log_line(self, r: dict[str, Any] | None) -> str | None:
        return "\n".join(r["plan"]) if r else None
