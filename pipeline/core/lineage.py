"""Lineage: what every output row records of how it was made (the run's part of `LINEAGE_TYPE`).

The steps rows went through (gathered from the stage results) and the per-run lineage struct (config
hash of the row's kind, tokenizer, version, seed, steps). Row-level lineage (sources, spans) is
written by the stages that build rows.
"""

from __future__ import annotations

from typing import Any

from pipeline import __version__
from pipeline.core.results import PrepareResult, SelectResult
from pipeline.core.tokenizer import Tokenizer
from pipeline.core.workdir import WorkDir
from schemas.stage_config import RunLevel


def lineage_steps(prepared: list[PrepareResult], selected: SelectResult) -> list[str]:
    """The versioned steps rows went through, in order, without repeats."""
    seen: dict[str, None] = {}
    for r in prepared:
        for s in r.steps:
            seen.setdefault(s)
    for s in selected.steps:
        seen.setdefault(s)
    return list(seen)


def run_lineage(
    cfg: RunLevel, work: WorkDir, tok: Tokenizer, steps: list[str], kind: str = "pretraining"
) -> dict[str, Any]:
    """The per-run part of every output row's lineage (LINEAGE_TYPE) for one kind of row.

    `config_hash` is the hash of the config sections rows of this `kind` depend on (ROW_SECTIONS), so a
    change elsewhere in the config leaves them byte-identical; the manifest lists these hashes.
    """
    return {
        "config_hash": work.row_keys[kind],
        "tokenizer": tok.identity.name,
        "tokenizer_hash": tok.identity.vocab_hash,
        "longloom_version": __version__,
        "seed": cfg.run.seed,
        "steps": steps,
    }
