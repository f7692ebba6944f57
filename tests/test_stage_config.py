"""Each stage receives only the config sections it declares (issue 13).

`Stage.sections` is the truth three ways, checked here: the protocol its functions are typed with
(`Stage.config_type`, schemas/stage_config.py) names exactly those sections; the view the executor
hands a stage raises on any other section, naming the stage and the section; and a real build of the
bundled sample reads, per stage, exactly the sections the stage declares (no more: the view would
raise; no fewer: a declared section nobody reads would make the stage's key change for nothing).
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from pipeline.stages.plan import STAGES
from schemas.config import BuildConfig
from schemas.stage_config import RUN_LEVEL, WITH_SECTION, ConfigView, RunLevel
from tests.conftest import make_config

SECTIONS = [name for name in BuildConfig.model_fields if name not in ("run", "base_dir", "output_named")]


# Declared sections the sample's path does not read, and why they are declared anyway.
NOT_ON_THE_SAMPLE_PATH: dict[str, set[str]] = {
    # select embeds the documents whose embeddings are missing or stale (diversity on; the sample has it off)
    "select": {"tokenizer"},
    # procedural.target_lengths unset defaults to the packing targets (the sample sets them)
    "procedural": {"packing"},
}


def protocol_members(proto: type) -> set[str]:
    """Attribute names a Protocol class (and the protocols it extends) declares."""
    names: set[str] = set()
    for klass in proto.__mro__:
        if klass is object or not getattr(klass, "_is_protocol", False):
            continue
        names |= {n for n in vars(klass) if not n.startswith("_")}
    return names


def test_each_stage_protocol_names_exactly_its_sections() -> None:
    run_level = protocol_members(RunLevel)
    assert run_level == set(RUN_LEVEL)
    for stage in STAGES:
        if stage.config_type is BuildConfig:  # finalize records the whole config in the manifest
            assert set(stage.sections) == set(SECTIONS), stage.name
            continue
        declared = protocol_members(stage.config_type) - run_level - set(WITH_SECTION)
        assert declared == set(stage.sections), f"{stage.name}: {stage.config_type.__name__} names {declared}"


def test_an_undeclared_section_raises_naming_stage_and_section(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "out")
    for stage in STAGES:
        view = stage.config(cfg)
        for section in stage.sections:
            assert getattr(view, section) is getattr(cfg, section)
        assert view.run is cfg.run and view.resolve("x") == cfg.resolve("x")
        undeclared = [s for s in SECTIONS if s not in stage.sections]
        if not undeclared:
            assert isinstance(view, BuildConfig)  # finalize
            continue
        for section in undeclared:
            with pytest.raises(AttributeError, match=rf"stage '{stage.name}' reads config '{section}'"):
                getattr(view, section)
        with pytest.raises(AttributeError):
            view.model_dump()  # the whole config is not a section
        with pytest.raises(AttributeError, match="read-only"):
            view.run = cfg.run
        # Dask workers receive a stage's work, and its view, pickled
        again = pickle.loads(pickle.dumps(view))
        assert getattr(again, stage.sections[0]) == getattr(cfg, stage.sections[0])
        with pytest.raises(AttributeError, match=rf"stage '{stage.name}'"):
            getattr(again, undeclared[0])


def test_the_sample_build_reads_exactly_the_declared_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.build import run_stages

    read: dict[str, set[str]] = defaultdict(set)
    original = ConfigView.__getattr__

    def recording(self: ConfigView, name: str) -> Any:
        value = original(self, name)  # raises on an undeclared section, failing the build
        section = WITH_SECTION.get(name, name)
        if section in SECTIONS:
            read[object.__getattribute__(self, "_stage")].add(section)
        return value

    monkeypatch.setattr(ConfigView, "__getattr__", recording)
    cfg = make_config(tmp_path / "out")
    inputs = run_stages(cfg, command="longloom build sample.yaml")
    assert inputs["finalize"].ok
    ran = [s for s in STAGES if s.name in inputs.results and s.config_type is not BuildConfig]
    assert {s.name for s in ran} >= {"prepare", "select", "write", "procedural"}
    for stage in ran:
        unread = set(stage.sections) - read[stage.name] - NOT_ON_THE_SAMPLE_PATH.get(stage.name, set())
        assert not unread, f"{stage.name} declares {sorted(unread)} but read only {sorted(read[stage.name])}"
