"""What the select stage is handed by the stage list: its corpus-level selectors and packing order.

Selection works on the corpus index and must not import the packages that build on that index (the
semantic package imports the index; an import back would be a circle). So the wiring lives here, one
level up: exact dedup, the configured semantic selectors (SemDeDup, D4), then source budgets.
"""

from __future__ import annotations

from pipeline.core.workdir import WorkDir
from pipeline.corpus.exact import exact_dedup, source_budgets
from pipeline.corpus.index import Selector
from pipeline.stages.prepare import PrepareResult
from pipeline.stages.select import SelectResult, SimilarityOrder, select_and_layout
from schemas.config import BuildConfig, ConfigError


def semantic_selectors(cfg: BuildConfig) -> list[Selector]:
    """Corpus-level selectors of the diversity stage (see pipeline.corpus.semantic), when it is configured.

    A configured stage that cannot run is an error, never a silent skip: a run that asked for SemDeDup
    or D4 and got neither would publish a dataset that says it was deduplicated.
    """
    d = cfg.diversity
    wanted = []
    if d.embedder and d.semdedup.enabled:
        wanted.append("diversity.semdedup")
    if d.embedder and d.d4.keep_fraction is not None and d.d4.keep_fraction < 1.0:
        wanted.append("diversity.d4")
    if not wanted:
        return []
    try:
        from pipeline.corpus.semantic import selectors as diversity_selectors
    except ImportError as err:
        raise ConfigError(
            f"{' and '.join(wanted)} configured (diversity.embedder {d.embedder!r}), but the diversity "
            f"stage cannot be loaded: {err}. Install Longloom's dependencies (pip install -e .), "
            "or set diversity.embedder: null to build without it"
        ) from err
    return list(diversity_selectors())


def corpus_selectors(cfg: BuildConfig) -> list[Selector]:
    """The selectors of the select stage, in the order they run on what the previous ones kept."""
    return [exact_dedup, *semantic_selectors(cfg), source_budgets]


def packing_order(cfg: BuildConfig) -> SimilarityOrder | None:
    """`packing.strategy: similarity`'s document order, None for the other strategies."""
    if cfg.packing.strategy != "similarity":
        return None
    from pipeline.corpus.semantic import similarity_order

    return similarity_order


def select(cfg: BuildConfig, work: WorkDir, prepared: list[PrepareResult]) -> SelectResult:
    """The select stage with what the stage list hands it (selectors and order)."""
    return select_and_layout(cfg, work, prepared, corpus_selectors(cfg), packing_order(cfg))
