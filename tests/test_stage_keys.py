"""A stage's key is what reuse uses (issue 13): its work folder is named by `Stage.key`.

For every stage that keeps verified unit records under .longloom/, the folder `Stage.work_dir` names
carries the key the stage loop computes (`Stage.key` over the sections the stage and its inputs
depend on), and for a change to any config section, the key changes exactly when the folder does:
reused work is reused exactly when the stage's key matches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.stages.base import Inputs, RunContext
from pipeline.stages.plan import STAGES
from schemas.config import BuildConfig, with_overrides
from tests.conftest import make_config


def stage_keys(cfg: BuildConfig) -> dict[str, tuple[str, Path | None]]:
    """{stage: (key, work folder)} as the stage loop computes them (`run_plan`, without running)."""
    ctx, inputs = RunContext(cfg), Inputs()
    out: dict[str, tuple[str, Path | None]] = {}
    for stage in STAGES:
        depends = stage.depends_on(inputs)
        key = stage.key(ctx, depends)
        inputs.record(stage.name, key, None, None, depends)
        out[stage.name] = (key, stage.work_dir(ctx))
    return out


def base_config(tmp_path: Path) -> BuildConfig:
    cfg = make_config(tmp_path / "out")
    return with_overrides(cfg, "diversity", embedder="static-minilm", chunk_tokens=256)


# One change per config section (and two to `diversity`: one embeddings depend on, one they do not).
CHANGES: list[tuple[str, dict[str, Any]]] = [
    ("sources", {}),  # handled below: a source's licence
    ("tokenizer", {"max_piece_chars": 12345}),
    ("filters", {"min_tokens": 17}),
    ("diversity", {"chunk_tokens": 128}),
    ("diversity", {"progress": True}),
    ("diversity", {"d4": {"keep_fraction": 0.5}}),
    ("packing", {"open_bins": 7}),
    ("procedural", {"samples_per_batch": 3}),
    ("rewriter", {"model": "another"}),
    ("output", {"shard_tokens": 1 << 20}),
    ("output", {"compression_level": 5}),
    ("card", {"pretty_name": "Other"}),
    ("run", {"seed": 99}),
    ("run", {"workers": 1}),
]


def test_work_folders_carry_the_stage_key(tmp_path: Path) -> None:
    keys = stage_keys(base_config(tmp_path))
    with_folders = {name for name, (_, d) in keys.items() if d is not None}
    assert with_folders == {"prepare", "embed", "select", "write", "procedural", "rewriter"}
    for name in with_folders:
        key, folder = keys[name]
        assert folder is not None and folder.name.endswith(f"-{key}"), (name, key, folder)


@pytest.mark.parametrize(
    ("section", "values"), CHANGES, ids=[f"{s}:{','.join(v) or 'licence'}" for s, v in CHANGES]
)
def test_a_key_changes_exactly_when_its_folder_does(
    tmp_path: Path, section: str, values: dict[str, Any]
) -> None:
    cfg = base_config(tmp_path)
    if section == "sources":
        data = cfg.model_dump()
        data["sources"][0]["license"] = "mit"
        changed = BuildConfig.model_validate(data)
    else:
        changed = with_overrides(cfg, section, **values)
    before, after = stage_keys(cfg), stage_keys(changed)
    for name, (key, folder) in before.items():
        key2, folder2 = after[name]
        if folder is not None:
            assert (key != key2) == (folder != folder2), f"{name}: key and folder disagree on {section}"
    # the change is seen by the stages that read the section, and only by what depends on them
    readers = {s.name for s in STAGES if section in s.sections}
    for s in readers:
        if s == "embed" and values.keys() - {"chunk_tokens"}:
            continue  # embeddings depend on a few diversity fields only
        if section in ("card", "publish") or values.keys() & {"progress", "workers"}:
            continue  # execution-only settings never change a key (schemas.config._EXECUTION_ONLY)
        assert before[s][0] != after[s][0], f"{s} reads {section} but its key ignored the change"
