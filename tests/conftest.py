"""Shared fixtures: configs built from the bundled sample data, written into temporary folders.

Fixed costs are paid once per test session: one Prefect API for every flow-run test, and one build of
each bundled-sample config that several test files read (read-only; a test that changes files copies
them first, and the fixture checks at the end of the session that nobody wrote into them).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from schemas.config import BuildConfig, parse_config

if TYPE_CHECKING:
    from schemas.manifest import Manifest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# Parallel runs (pytest-xdist, `--dist loadgroup` in pyproject's addopts). Every file is one work unit,
# so its module fixtures are built once, on one worker; a test may still name an `xdist_group` of its
# own to share a worker with tests of other files. Units are handed out in collection order, so the
# files that take longest go first (measured; the rest keep pytest's order): a long file started
# last would leave the other workers idle at the end.
# Slowest first by the seconds each file took in a parallel run (November 30, `--junitxml`, summed per
# file; session fixtures count for the file that started them).
SLOW_FILES_FIRST: tuple[str, ...] = (
    "test_diversity.py",
    "test_warm_build.py",
    "test_resume.py",
    "test_flow.py",
    "test_longdep_stage.py",
    "test_publish.py",
    "test_longdep.py",
    "test_chat_models.py",
    "test_build.py",
    "test_ops_prefect.py",
    "test_card.py",
    "test_token_exact.py",
    "test_secrets.py",
    "test_procedural_flow.py",
    "test_ops_kept_server.py",
    "test_export.py",
    "test_parallel_safety.py",
)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: pytest's order within
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


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
def prefect_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real `prefect server start` subprocess (own PREFECT_HOME, free port); yields a client env."""
    from tests.opskit import prefect_server as start

    with start(tmp_path_factory.mktemp("prefect-home")) as env:
        yield env


@pytest.fixture(scope="session")
def prefect_harness(prefect_server: dict[str, str]):  # type: ignore[no-untyped-def]
    """In-process flow runs against the session's real Prefect API (the `prefect_server` above).

    What `prefect.testing.utilities.prefect_test_harness` does, minus starting a second server of its
    own (a fresh one took 18 s of CPU here): this process's Prefect settings point at the session
    server. Tests find their runs by flow-run id, so sharing its database with the subprocess tests
    changes nothing they check.
    """
    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with contextlib.ExitStack() as stack:
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}))
        # also the process-global settings, as the harness does, for contexts copied before this one
        stack.enter_context(
            prefect.context._temporary_global_settings_context(prefect.context.get_settings_context())
        )
        yield
        # send buffered run logs and events before the server goes away (the harness does the same)
        with contextlib.suppress(RuntimeError):
            APILogWorker.drain_all()
        EventsWorker.drain_all()


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """Fail the session if a test changed, added or removed a file of a shared build."""
    before = _tree_digest(folder)
    yield
    after = _tree_digest(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into the shared build {folder} (copy it first): {changed[:10]}"


@pytest.fixture(scope="session")
def sample_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BuildConfig, Manifest]]:
    """The bundled sample config as it ships (procedural samples included), built once in-process.

    Shared read-only by the files that only read a default sample run (test_build, test_card, test_flow).
    """
    from pipeline.build import run_build

    cfg = make_config(tmp_path_factory.mktemp("sample") / "out")
    manifest = run_build(cfg)
    with _read_only(Path(cfg.output.dir)):
        yield cfg, manifest


@pytest.fixture(scope="session")
def sample_build_without_procedural(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[BuildConfig, Manifest]]:
    """The bundled sample with procedural samples off, built once in-process; shared read-only by
    test_card and test_publish (which copies it before publishing)."""
    from pipeline.build import run_build

    cfg = make_config(tmp_path_factory.mktemp("card") / "out", procedural={"enabled": False})
    manifest = run_build(cfg, command="longloom build data/sample.yaml")
    with _read_only(Path(cfg.output.dir)):
        yield cfg, manifest


@pytest.fixture(scope="session")
def small_shard_reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An uninterrupted `longloom build --no-prefect` (a real process) of the small-shard sample config
    (tests/opskit.py `write_config`): the output that resumed (test_resume) and scaled-out (test_dask)
    runs of the same config must equal. Read-only. Holds the output's digest, its folder, and how long
    the run took on this machine now (the random-kill test times its kills by it)."""
    import time

    from tests.opskit import output_digest, run_cli, write_config

    folder = tmp_path_factory.mktemp("reference")
    cfg = write_config(folder, folder / "out")
    t0 = time.monotonic()
    done = run_cli(["build", str(cfg), "--no-prefect"])
    seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    digest = output_digest(folder / "out")
    with _read_only(folder / "out"):
        yield {**digest, "seconds": seconds, "folder": folder}
