"""The layout shows the pipeline (issue 13): a stage is found in one hop, a concept in one module.

- every stage of `STAGES` is defined in `pipeline/stages/<its name>.py`, next to its code; the stage
  list (`plan.py`) defines no stage;
- lineage (the steps rows went through, the per-run lineage struct) is one module, pipeline/core/lineage.py;
- every module under `pipeline/`, `schemas/` and `flows/` says in a docstring what it is for.
Read with `ast`, except the stage list, which is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.stages.base import Stage
from pipeline.stages.plan import STAGES

ROOT = Path(__file__).resolve().parent.parent


def defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}


def test_each_stage_is_defined_in_its_own_module() -> None:
    for stage in STAGES:
        module = type(stage).__module__
        assert module == f"pipeline.stages.{stage.name}", f"stage {stage.name!r} is defined in {module}"
        assert (ROOT / "pipeline" / "stages" / f"{stage.name}.py").is_file()
    plan = ast.parse((ROOT / "pipeline" / "stages" / "plan.py").read_text(encoding="utf-8"))
    classes = [n.name for n in plan.body if isinstance(n, ast.ClassDef)]
    assert not classes, f"the stage list defines classes: {classes}"
    assert all(isinstance(s, Stage) for s in STAGES)
    assert [s.name for s in STAGES][-2:] == ["finalize", "publish"]  # publishing is a stage, the last


def test_lineage_is_one_module() -> None:
    where: dict[str, list[str]] = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for name in defined_names(path) & {"lineage_steps", "run_lineage"}:
            where.setdefault(name, []).append(path.relative_to(ROOT).as_posix())
    assert where == {
        "lineage_steps": ["pipeline/core/lineage.py"],
        "run_lineage": ["pipeline/core/lineage.py"],
    }


def test_every_module_has_a_docstring() -> None:
    missing = [
        path.relative_to(ROOT).as_posix()
        for package in ("pipeline", "schemas", "flows")
        for path in sorted((ROOT / package).rglob("*.py"))
        if not (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip()
    ]
    assert not missing, f"modules without a docstring saying what they are for: {missing}"
