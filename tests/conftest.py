"""Shared fixtures: configs built from the bundled sample data, written into temporary folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.config import BuildConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def sample_dict() -> dict[str, Any]:
    return yaml.safe_load((DATA / "sample.yaml").read_text())


def make_config(out: Path, base_dir: Path = DATA, **overrides: Any) -> BuildConfig:
    """The sample config with its output in `out`, and top-level sections replaced by `overrides`."""
    data = sample_dict()
    data["output"] = {**data.get("output", {}), "dir": str(out)}
    for key, value in overrides.items():
        data[key] = value
    return parse_config(data, base_dir=base_dir)


@pytest.fixture
def sample_config(tmp_path: Path) -> BuildConfig:
    return make_config(tmp_path / "out")


@pytest.fixture(scope="session")
def prefect_harness():  # type: ignore[no-untyped-def]
    """A real, temporary Prefect API for flow-run tests (one per test session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real `prefect server start` subprocess (own PREFECT_HOME, free port); yields a client env."""
    from tests.opskit import prefect_server as start

    with start(tmp_path_factory.mktemp("prefect-home")) as env:
        yield env
