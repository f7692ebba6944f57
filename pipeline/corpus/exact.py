"""Corpus-level selectors that need no model: exact dedup on content hashes, per-source token budgets."""

from __future__ import annotations

import numpy as np

from pipeline.core.results import PrepareResult
from pipeline.core.workdir import WorkDir
from pipeline.corpus.filters import stable_uniform
from pipeline.corpus.index import DocIndex, Drop
from schemas.stage_config import SelectConfig


def exact_dedup(
    cfg: SelectConfig, work: WorkDir, idx: DocIndex, alive: np.ndarray, _: list[PrepareResult]
) -> Drop | None:
    """Drop every later copy of a text already seen (canonical order: sources, files, lines)."""
    if not cfg.filters.exact_dedup or len(alive) == 0:
        return None
    hashes = idx.content_hash[alive]
    _uniq, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    keeper = first[inverse]  # position (within alive) of the first copy of each document's text
    dup = np.flatnonzero(keeper != np.arange(len(alive)))
    if len(dup) == 0:
        return None
    kept_ids = [idx.doc_id[alive[keeper[d]]] for d in dup]
    return Drop(
        "exact_dedup@1",
        "exact_duplicate",
        alive[dup],
        [f"same sha256 as {k}" for k in kept_ids],
        duplicate_of=kept_ids,
    )


def source_budgets(
    cfg: SelectConfig, work: WorkDir, idx: DocIndex, alive: np.ndarray, _: list[PrepareResult]
) -> Drop | None:
    """Per-source token budgets: a seeded random sample of each source's documents up to its budget."""
    dropped: list[np.ndarray] = []
    details: list[str] = []
    for s_i, name in enumerate(idx.sources):
        budget = cfg.source(name).token_budget
        if budget is None:
            continue
        mine = alive[idx.source[alive] == s_i]
        hashes = [h.decode() for h in idx.content_hash[mine]]
        order = np.argsort(stable_uniform(cfg.run.seed, f"source_budget@1/{name}", hashes), kind="stable")
        within = np.cumsum(idx.n_tokens[mine[order]]) <= budget
        over = mine[order[~within]]
        dropped.append(over)
        details += [f"source {name!r} reached sources[].token_budget={budget}"] * len(over)
    if not dropped:
        return None
    all_over = np.concatenate(dropped)
    return Drop("source_budget@1", "source_budget", all_over, details) if len(all_over) else None
