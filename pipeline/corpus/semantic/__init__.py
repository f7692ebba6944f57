"""Embedding-based diversity: semantic pruning (SemDeDup, D4) and similarity packing order.

The stage list (`pipeline.stages.plan`) hands the select stage `selectors()` (each returns None
unless `diversity:` enables it) and, for `packing.strategy: similarity`, `similarity_order(cfg, idx,
members)`; this package imports the corpus index, never the select stage. Embeddings come from the
embedding stage (`pipeline.stages.embed`), which runs between prepare and select.
"""

from __future__ import annotations

from pipeline.corpus.index import Selector
from pipeline.corpus.semantic.order import similarity_order
from pipeline.corpus.semantic.prune import d4, semdedup


def selectors() -> list[Selector]:
    """Corpus-level selectors, in order: SemDeDup, then D4 on what SemDeDup kept."""
    return [semdedup, d4]


__all__ = ["selectors", "similarity_order"]
