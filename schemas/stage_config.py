"""What each stage may read of the build config: typed protocols for the type checker, a view at run time.

A stage declares the config sections its output depends on (`Stage.sections`). Those sections are
the truth twice over:

- statically, each stage's functions take a protocol below (`PrepareConfig`, `EmbedConfig`, ...)
  naming exactly its sections as read-only attributes; `BuildConfig` satisfies every protocol
  structurally, and mypy rejects a stage function that reads a section its protocol lacks;
- at run time, the executor hands each stage a `ConfigView` (`Stage.config(cfg)`): a frozen object
  holding only the declared sections plus the run-level facts (`RUN_LEVEL`: the seed in `run`, the
  config file's folder and path resolution), whose undeclared attributes raise an AttributeError
  that names the stage and the section.

So reading a stage's `sections` tells everything its output depends on, and its key (a hash of those
sections) is right by construction.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the protocols only name the section types; nothing here needs them at run time
    from schemas.config import (
        FilterConfig,
        OutputConfig,
        PackingConfig,
        RunConfig,
        SourceConfig,
        TokenizerConfig,
    )
    from schemas.diversity import DiversityConfig
    from schemas.longdep import LongDepConfig
    from schemas.publish import CardConfig, PublishConfig
    from schemas.synthesis import ProceduralConfig, RewriterConfig


# Run-level attributes every stage may read whatever it declares: the seed (and execution settings)
# in `run`, and where relative input paths start (`base_dir`, `resolve`).
RUN_LEVEL: frozenset[str] = frozenset({"run", "base_dir", "resolve"})
# Attributes that come with a section: `source(name)` looks a source up, so it belongs to `sources`.
WITH_SECTION: dict[str, str] = {"source": "sources"}


# ---- one protocol per section (read-only), and the run-level part every stage has ---------------------


class RunLevel(Protocol):
    @property
    def run(self) -> RunConfig: ...
    @property
    def base_dir(self) -> str: ...
    def resolve(self, path: str) -> Path: ...


class HasSources(RunLevel, Protocol):
    @property
    def sources(self) -> list[SourceConfig]: ...
    def source(self, name: str) -> SourceConfig: ...


class HasTokenizer(RunLevel, Protocol):
    @property
    def tokenizer(self) -> TokenizerConfig: ...


class HasFilters(RunLevel, Protocol):
    @property
    def filters(self) -> FilterConfig: ...


class HasDiversity(RunLevel, Protocol):
    @property
    def diversity(self) -> DiversityConfig: ...


class HasPacking(RunLevel, Protocol):
    @property
    def packing(self) -> PackingConfig: ...


class HasOutput(RunLevel, Protocol):
    @property
    def output(self) -> OutputConfig: ...


class HasProcedural(RunLevel, Protocol):
    @property
    def procedural(self) -> ProceduralConfig: ...


class HasRewriter(RunLevel, Protocol):
    @property
    def rewriter(self) -> RewriterConfig: ...


class HasCard(RunLevel, Protocol):
    @property
    def card(self) -> CardConfig: ...


class HasPublish(RunLevel, Protocol):
    @property
    def publish(self) -> PublishConfig: ...


class HasLongDependency(RunLevel, Protocol):
    @property
    def long_dependency(self) -> LongDepConfig: ...


# ---- one protocol per stage: exactly the sections its `Stage.sections` declares -----------------------


class PrepareConfig(HasSources, HasTokenizer, HasFilters, Protocol):
    """prepare: read, filter, tokenize."""


class EmbedConfig(HasDiversity, HasTokenizer, Protocol):
    """embed: the embedder, its cache and chunking, and the tokenizer whose ids it may embed."""


class LongDepStageConfig(HasLongDependency, HasTokenizer, Protocol):
    """long_dependency: the scoring model and its windows, and the tokenizer that decodes prepared ids."""


class SelectConfig(
    HasSources, HasTokenizer, HasFilters, HasDiversity, HasLongDependency, HasPacking, HasOutput, Protocol
):
    """select: exact dedup, semantic selection (embedding what the embed stage left missing), source
    budgets, routing and layout into output shards."""


class SemanticStageConfig(HasSources, HasTokenizer, HasFilters, HasDiversity, Protocol):
    """semantic_exact / semantic_assign / semantic_prune (partitioned select): exact dedup by hash
    partition, then SemDeDup and D4 per group of clusters (embedding what the embed stage left missing)."""


class WriteConfig(HasTokenizer, HasPacking, HasOutput, Protocol):
    """write: rows from the layouts, lineage, Parquet settings."""


class ProceduralStageConfig(HasProcedural, HasTokenizer, HasPacking, HasOutput, Protocol):
    """procedural: task mix, lengths, haystacks, chat template, Parquet settings of its files."""


class RewriterStageConfig(HasRewriter, HasTokenizer, HasPacking, HasOutput, Protocol):
    """rewriter: LLM endpoint, strategies, lengths, chat template, Parquet settings of its files."""


class PublishStageConfig(HasPublish, HasOutput, Protocol):
    """publish: the hub target, and the output folder it uploads."""


class ConfigView:
    """A frozen view of a `BuildConfig` that lets one stage read only the sections it declares.

    Reading a declared section (or a run-level attribute, `RUN_LEVEL`) returns the config's own
    object; reading any other attribute raises an AttributeError naming the stage and the section,
    so a stage that starts depending on an undeclared section fails its first test instead of
    silently reusing stale work. Picklable (Dask workers receive the stage's work with its view).
    """

    def __init__(self, stage: str, cfg: Any, sections: Iterable[str]) -> None:
        declared = frozenset(sections)
        allowed = declared | RUN_LEVEL | {a for a, s in WITH_SECTION.items() if s in declared}
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_allowed", allowed)

    def __getattr__(self, name: str) -> Any:
        # only called for names the instance lacks; private and dunder names are never config
        # sections (and pickle probes them on a half-built instance)
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._allowed:
            return getattr(self._cfg, name)
        section = WITH_SECTION.get(name, name)
        raise AttributeError(
            f"stage {self._stage!r} reads config {section!r}, which it does not declare: add "
            f"{section!r} to its Stage.sections (and its config protocol in schemas/stage_config.py) "
            "if its output depends on it, or stop reading it"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the config view of stage {self._stage!r} is read-only")

    def __repr__(self) -> str:
        return f"ConfigView({self._stage!r}, {sorted(self._allowed - RUN_LEVEL)})"
