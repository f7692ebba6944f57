"""Embedding-based diversity: semantic pruning (SemDeDup, D4) and similarity packing order.

The select stage calls `selectors()` (each returns None unless `diversity:` enables it) and, for
`packing.strategy: similarity`, `similarity_order(cfg, idx, members)`. Embeddings come from the
embedding stage (`pipeline.embed_stage`), which runs between prepare and select.
"""

from __future__ import annotations

from pipeline.diversity.order import similarity_order
from pipeline.diversity.prune import d4, semdedup
from pipeline.diversity.report import diversity_outputs, diversity_run_stats
from pipeline.select import Selector


def selectors() -> list[Selector]:
    """Corpus-level selectors, in order: SemDeDup, then D4 on what SemDeDup kept."""
    return [semdedup, d4]


__all__ = ["diversity_outputs", "diversity_run_stats", "selectors", "similarity_order"]
