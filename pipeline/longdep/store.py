"""Where long-dependency scores live: the per-run score folder and files, the score cache folder, and
which part of the backend config names the model (what keys them). Shared by the scoring stage and the
select-side uses of the scores (`pipeline.longdep.use`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.core.storage import is_remote
from pipeline.core.workdir import WorkDir
from pipeline.longdep.scorer import METHOD
from schemas.longdep import LongDepConfig
from schemas.stage_config import HasLongDependency

# backend fields that choose where a model runs, not which model it is (left out of the folder key)
_PLACEMENT = {"device", "threads", "api_key", "timeout_seconds"}


def backend_identity(ld: LongDepConfig) -> dict[str, Any]:
    """Which model scores (no placement, no secrets: the URL is recorded redacted)."""
    return {k: v for k, v in ld.backend.model_dump(mode="json").items() if k not in _PLACEMENT}


def longdep_dir(cfg: HasLongDependency, work: WorkDir) -> Path:
    """Per-run score files: keyed by the prepared documents, the model and the score settings."""
    ld = cfg.long_dependency
    blob = json.dumps([METHOD, backend_identity(ld), ld.score_settings()], sort_keys=True).encode()
    return work.root / f"longdep-{work.prepare_key}-{hashlib.sha256(blob).hexdigest()[:12]}"


def scores_file(cfg: HasLongDependency, work: WorkDir, shard_id: str) -> Path:
    return longdep_dir(cfg, work) / f"{shard_id}.parquet"


def cache_dir(cfg: HasLongDependency) -> str | Path:
    """The score cache: `long_dependency.cache_dir` (a folder or an fsspec URL), else under the user's
    cache folder."""
    ld = cfg.long_dependency
    if ld.cache_dir:
        return ld.cache_dir if is_remote(ld.cache_dir) else Path(ld.cache_dir).expanduser()
    root = os.environ.get("LONGLOOM_CACHE", str(Path.home() / ".cache" / "longloom"))
    return Path(root) / "longdep"
