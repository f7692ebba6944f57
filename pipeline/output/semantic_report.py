"""Publish what the diversity stage did: the `pruned` audit table and the manifest's extra["diversity"],
and this run's timings and cache counts for the run report.

The manifest is the same for every run of one config (README "What a run writes"), so it holds only
what the config and the inputs decide; seconds, cache hits and misses, model calls, reused shards and
the cache folder depend on the run and go to report.json (`diversity_run_stats`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.core.results import EmbedResult, SelectResult
from pipeline.core.storage import shown
from pipeline.core.workdir import WorkDir
from pipeline.embedders.documents import cache_dir
from pipeline.output.audit import merge_audit
from schemas.config import BuildConfig
from schemas.manifest import FileEntry
from schemas.records import PRUNED_SCHEMA

RULES = ("semdedup", "d4")


def _json(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.exists() else None


# per-step statistics that describe the run, not the output: report only
RUN_ONLY = ("seconds",)


def embed_summary(results: list[EmbedResult]) -> dict[str, Any]:
    """What the embedding stage produced, the same however the vectors were obtained (manifest)."""
    first = results[0] if results else None
    return {
        "embedder": first.embedder if first else None,
        "cache_key": first.cache_key if first else None,
        "dim": first.dim if first else None,
        "dtype": first.dtype if first else None,
        "chunk_tokens": first.chunk_tokens if first else None,
        "max_chunks": first.max_chunks if first else None,
        "documents": sum(r.documents for r in results),
        "shards": len(results),
        "partial_documents": sum(r.partial_documents for r in results),
        "min_coverage": min((r.min_coverage for r in results), default=1.0),
    }


def embed_run_stats(results: list[EmbedResult]) -> dict[str, Any]:
    """How this run obtained the vectors (report): a reused shard counts as neither hit nor miss."""
    return {
        "shards_reused": sum(r.reused for r in results),
        "cache_hits": sum(r.cache_hits for r in results),
        "cache_misses": sum(r.cache_misses for r in results),
        "model_calls": sum(r.model_calls for r in results),
        "chunks_embedded": sum(r.chunks for r in results),
        "seconds": round(sum(r.seconds for r in results), 3),
    }


def _without_run_fields(stats: dict | None) -> dict | None:
    return None if stats is None else {k: v for k, v in stats.items() if k not in RUN_ONLY}


def _step_stats(work: WorkDir, selected: SelectResult) -> tuple[dict[str, dict | None], dict[str, dict]]:
    steps = {r: _json(work.select_dir / f"diversity-{r}.json") for r in RULES}
    order = {
        str(t.target_length): _json(work.select_dir / f"diversity-order-{t.target_length}.json")
        for t in selected.targets
    }
    return steps, {k: v for k, v in order.items() if v is not None}


def diversity_run_stats(
    cfg: BuildConfig, work: WorkDir, embedded: list[EmbedResult], selected: SelectResult
) -> dict[str, Any]:
    """This run's side of the diversity stage for report.json: timings, cache use, the cache folder."""
    if not cfg.diversity.embedder:
        return {}
    steps, order = _step_stats(work, selected)
    return {
        "embedding": embed_run_stats(embedded),
        "cache_dir": shown(cache_dir(cfg)),
        **{r: {"seconds": s.get("seconds")} for r, s in steps.items() if s is not None},
        "order": {k: {"seconds": v.get("seconds")} for k, v in order.items()},
    }


def diversity_outputs(
    cfg: BuildConfig, work: WorkDir, embedded: list[EmbedResult], selected: SelectResult
) -> tuple[dict[str, list[FileEntry]], dict[str, Any]]:
    """(audit_extra, extra) for finalize_run: audit/pruned/ files and the statistics of every step."""
    if not cfg.diversity.embedder:
        return {}, {}
    d = cfg.diversity
    parts = [work.select_dir / f"pruned-{r}.parquet" for r in RULES]
    parts = [p for p in parts if p.exists()]
    audit: dict[str, list[FileEntry]] = {}
    if parts:
        audit["pruned"] = merge_audit(work.out, "pruned", PRUNED_SCHEMA, parts, cfg.output.compression_level)
    by_rule: dict[str, int] = {}
    for p in parts:
        for step in pq.read_table(p, columns=["step"]).column("step").to_pylist():
            by_rule[step] = by_rule.get(step, 0) + 1
    steps, order = _step_stats(work, selected)
    filtered: dict[str, int] = {}
    for per_source in selected.filtered.values():
        for reason, n in per_source.items():
            filtered[reason] = filtered.get(reason, 0) + n
    extra = {
        "embedding": embed_summary(embedded),
        "semdedup": _without_run_fields(steps["semdedup"]),
        "d4": _without_run_fields(steps["d4"]),
        "order": {k: _without_run_fields(v) for k, v in order.items()},
        "pruned_by_rule": by_rule,
        # the pruned table and the filtered counts are written by different code: they must agree
        "pruned_matches_filtered": by_rule.get("semdedup@1", 0) == filtered.get("semantic_duplicate", 0)
        and by_rule.get("d4@1", 0) == filtered.get("prototypical", 0),
        # cache_dir and progress change how a run goes, not what it writes (schemas.config._EXECUTION_ONLY)
        "config": d.model_dump(mode="json", exclude={"cache_dir", "progress"}),
    }
    return audit, {"diversity": extra}
