"""Publish what the diversity stage did: the `pruned` audit table and the manifest's extra["diversity"]."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.core.workdir import WorkDir
from pipeline.output.audit import merge_audit
from pipeline.stages.embed import EmbedResult, cache_dir
from pipeline.stages.select import SelectResult
from schemas.config import BuildConfig
from schemas.manifest import FileEntry
from schemas.records import PRUNED_SCHEMA

RULES = ("semdedup", "d4")


def _json(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.exists() else None


def embed_summary(results: list[EmbedResult]) -> dict[str, Any]:
    """Totals over the shards of the embedding stage (a reused shard counts as neither hit nor miss)."""
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
        "shards_reused": sum(r.reused for r in results),
        "cache_hits": sum(r.cache_hits for r in results),
        "cache_misses": sum(r.cache_misses for r in results),
        "model_calls": sum(r.model_calls for r in results),
        "chunks_embedded": sum(r.chunks for r in results),
        "partial_documents": sum(r.partial_documents for r in results),
        "min_coverage": min((r.min_coverage for r in results), default=1.0),
        "seconds": round(sum(r.seconds for r in results), 3),
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
    steps = {r: _json(work.select_dir / f"diversity-{r}.json") for r in RULES}
    order = {
        str(t.target_length): _json(work.select_dir / f"diversity-order-{t.target_length}.json")
        for t in selected.targets
    }
    filtered: dict[str, int] = {}
    for per_source in selected.filtered.values():
        for reason, n in per_source.items():
            filtered[reason] = filtered.get(reason, 0) + n
    extra = {
        "embedding": embed_summary(embedded),
        "cache_dir": str(cache_dir(cfg)),
        "semdedup": steps["semdedup"],
        "d4": steps["d4"],
        "order": {k: v for k, v in order.items() if v is not None},
        "pruned_by_rule": by_rule,
        # the pruned table and the filtered counts are written by different code: they must agree
        "pruned_matches_filtered": by_rule.get("semdedup@1", 0) == filtered.get("semantic_duplicate", 0)
        and by_rule.get("d4@1", 0) == filtered.get("prototypical", 0),
        "config": d.model_dump(mode="json"),
    }
    return audit, {"diversity": extra}
