"""The stage protocol: what a stage of the build is, independent of who runs it.

A `Stage` is an entry of the one ordered list (`pipeline.stages.plan.STAGES`). For a run it is
*bound* to the run context and the merged results of the stages before it, giving its `StageWork`:

- `key`: the hash of the config sections its output depends on (its own and, transitively, its
  inputs') and the run seed; its work folder is named by it (`Stage.work_dir`), so verified work is
  reused exactly when the key matches;
- `units()`: the independent pieces of work (input shards, output shards, batches);
- `run_unit(unit)`: one piece, pure with respect to its inputs and outputs on disk (safe to retry,
  to run on another machine, to skip when its verified record exists);
- `merge(results)`: the stage's result from its units' results, in unit order.

Executors are loops over the list and own only *how* units run: `pipeline.build.run_build` calls
`run_unit` one after another in this process, `flows.build` maps it as Prefect tasks (threads or
Dask). The design follows datatrove's `PipelineStep` with separate executors and NeMo Curator's
backend-independent stages. Nothing here imports Prefect.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pipeline.core import storage
from pipeline.core.progress import UnitProgress
from pipeline.core.workdir import WorkDir, folder_key
from schemas.config import BuildConfig
from schemas.manifest import StageReport
from schemas.stage_config import ConfigView

U = TypeVar("U")  # a unit of work
R = TypeVar("R")  # what one unit returns


@dataclass(frozen=True)
class RunContext:
    """Run-level facts: the whole config, the command line, the seed and the folders.

    A stage's output depends only on the config sections it declares (`Stage.sections`) and the
    run-level seed; its key hashes exactly those, so reading a stage's `sections` says what it needs.
    The whole config is for the executor and the stage's key; a stage's units read `StageWork.cfg`,
    the view holding only its sections (`Stage.config`).
    """

    cfg: BuildConfig
    command: str | None = None

    @property
    def seed(self) -> int:
        return self.cfg.run.seed

    @property
    def work(self) -> WorkDir:
        return WorkDir(self.cfg)  # cheap, and rebuilt where a unit runs (picklable context)


@dataclass
class Inputs:
    """What a stage is bound to: the run's input shards (listed by the preflight), the merged results
    of the stages that already ran (by stage name), their keys, and their manifest counts."""

    shards: list[Any] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    reports: dict[str, StageReport] = field(default_factory=dict)
    # the config sections each stage's output depends on, its inputs' included
    depends: dict[str, frozenset[str]] = field(default_factory=dict)

    def record(
        self, name: str, key: str, merged: Any, report: StageReport | None, depends: frozenset[str]
    ) -> None:
        self.results[name] = merged
        self.keys[name] = key
        self.depends[name] = depends
        if report is not None:
            self.reports[name] = report

    def __getitem__(self, name: str) -> Any:
        return self.results[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.results.get(name, default)


class StageWork(ABC, Generic[U, R]):
    """One stage bound to one run: its units, how to run one, how to merge their results.

    On an output folder in an object store, a process that only runs units (a Dask worker) holds in
    its mirror only what it fetched (`pipeline.core.storage.Mirror`). A stage that says what a unit
    reads (`needs`) gets those files fetched before each `run_unit`; any other stage gets every stored
    file fetched when it is bound, as before.
    """

    def __init__(self, stage: Stage, ctx: RunContext, inputs: Inputs) -> None:
        self.stage = stage
        self.ctx = ctx
        # the stage's config: only its declared sections plus the run-level seed and paths
        self.cfg: Any = stage.config(ctx.cfg)
        self.inputs = inputs
        self.depends = stage.depends_on(inputs)
        self.key = stage.key(ctx, self.depends)
        if type(self).needs is StageWork.needs:
            storage.fetch(ctx.cfg.output.dir, None)  # no list of what a unit reads: everything

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        run = cls.__dict__.get("run_unit")
        if run is None or getattr(run, "_fetches_needs", False):
            return

        # every executor calls run_unit (in this process, Prefect tasks, Dask workers): the fetch
        # goes with it, so no executor can forget it
        @functools.wraps(run)
        def run_unit(self: StageWork[U, R], unit: U, progress: UnitProgress | None = None) -> R:
            out = self.ctx.cfg.output.dir
            if storage.is_remote(out) and type(self).needs is not StageWork.needs:
                storage.fetch(out, self.needs(unit))  # a local folder has everything already
            return run(self, unit, progress)

        run_unit._fetches_needs = True  # type: ignore[attr-defined]
        cls.run_unit = run_unit  # type: ignore[method-assign]

    def needs(self, unit: U) -> list[Path] | None:
        """The files and folders of the output folder that `run_unit(unit)` reads, its own outputs and
        records included (what its reuse check verifies). None: everything (the default). It may
        fetch what it must read to answer (`storage.fetch`), e.g. a layout naming the input shards."""
        return None

    @abstractmethod
    def units(self) -> list[U]: ...

    @abstractmethod
    def run_unit(self, unit: U, progress: UnitProgress | None = None) -> R: ...

    def merge(self, results: list[R]) -> Any:
        return results

    def report(self, merged: Any) -> StageReport | None:
        """The stage's counts for the manifest (None: the stage adds no entry)."""
        return None

    def reused(self, results: list[R], merged: Any) -> int:
        """How many units reused a verified earlier result."""
        return sum(bool(getattr(r, "reused", False)) for r in results)

    def label(self, unit: U) -> str:
        """The unit's name in progress bars and logs."""
        return self.stage.name

    def advance(self, result: R) -> tuple[str, dict[str, int]]:
        """(label, counts) a progress reporter shows when a unit finishes."""
        return self.stage.name, {}

    def log_line(self, result: R) -> str | None:
        """One line for the run log when a unit finishes (None: nothing to say)."""
        return None


class Stage(ABC):
    """An entry of the stage list: its name, the config sections it reads, the stages it reads."""

    name: ClassVar[str]
    sections: ClassVar[tuple[str, ...]]  # BuildConfig sections the stage's output depends on
    # the protocol (schemas.stage_config) its functions take: exactly `sections` plus the run level
    config_type: ClassVar[type]
    inputs: ClassVar[tuple[str, ...]] = ()  # earlier stages whose merged results it reads
    unit_noun: ClassVar[str] = "shards"
    task_name: ClassVar[str]  # the Prefect task name of its units (kept stable for the UI and tests)
    # Prefect retries of a unit: None = the run's `run.retries`; a number = fixed for this stage
    retries: ClassVar[int | None] = None
    # errors a retry cannot mend (a model that cannot load): the unit fails at once
    no_retry_on: ClassVar[tuple[type[BaseException], ...]] = ()

    def enabled(self, cfg: BuildConfig) -> bool:
        return True

    def config(self, cfg: BuildConfig) -> Any:
        """What the stage's units are handed of the config: a view holding only `sections` plus the
        run-level seed and paths (`schemas.stage_config`); reading anything else raises."""
        return ConfigView(self.name, cfg, self.sections)

    def depends_on(self, inputs: Inputs) -> frozenset[str]:
        """The config sections the stage's output depends on: its own and its inputs' (transitively)."""
        return frozenset(self.sections).union(*(inputs.depends.get(n, ()) for n in self.inputs))

    def key(self, ctx: RunContext, depends: frozenset[str]) -> str:
        """The hash of `depends` and the run seed (16 hex digits): what names the stage's work folder."""
        return folder_key(ctx.cfg, depends)

    def work_dir(self, ctx: RunContext) -> Path | None:
        """The folder under .longloom/ holding the stage's verified unit records (None: it keeps none).
        Its name carries the stage's key."""
        return None

    @abstractmethod
    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork: ...
