"""Embedding-based diversity: semantic pruning (SemDeDup, D4) and similarity packing order.

The select stage calls `selectors()` (each returns None unless `diversity:` enables it) and, for
`packing.strategy: similarity`, `similarity_order(cfg, idx, members)`. Embeddings come from the
embedding stage (`pipeline.stages.embed`), which runs between prepare and select.
"""

from __future__ import annotations

from pipeline.corpus.semantic.order import similarity_order
from pipeline.corpus.semantic.prune import d4, semdedup
from pipeline.output.semantic_report import diversity_outputs
from pipeline.stages.select import Selector


def selectors() -> list[Selector]:
    """Corpus-level selectors, in order: SemDeDup, then D4 on what SemDeDup kept."""
    return [semdedup, d4]


__all__ = ["diversity_outputs", "selectors", "similarity_order"]
