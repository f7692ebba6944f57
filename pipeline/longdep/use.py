"""Using long-dependency scores in selection, routing and the run's records (issue 15).

- `long_dependency_filter`: the select stage's selector for `min_score` / `keep_top_fraction`
  (per source, `LongDepConfig.filter_for`); drops are `filtered` rows with reason
  `low_long_dependency` and the score in the detail, so counts reconcile like every other filter.
- `route_priority`: the order `route: longest_first` hands the router (highest scores first).
- `row_scores`: a packed row's score, the token-weighted mean of the scores of the documents whose
  tokens it holds (a split document's whole-document score counts for each of its pieces, weighted
  by the piece's tokens; documents too short to score do not count).
- `manifest_extra`: `extra["long_dependency"]` of the manifest: lineage (method, model id and
  fingerprint, windows, sample counts), counts, and score distributions per source and per target
  (the card draws them). Only what the config and inputs decide: no timings, no cache counts.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.core.results import PrepareResult
from pipeline.core.workdir import WorkDir
from pipeline.corpus.index import DocIndex, Drop
from pipeline.longdep.scorer import METHOD
from pipeline.longdep.store import backend_identity, scores_file
from schemas.config import ConfigError
from schemas.stage_config import SelectConfig

STEP = METHOD  # the scoring method names the filter step in lineage
REASON = "low_long_dependency"
# histogram bins of scores in nats/token (gains of the far context); the ends are open
EDGES: list[float] = [-0.2, 0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0]


def bin_labels() -> list[str]:
    inner = [f"{a:g}–{b:g}" for a, b in itertools.pairwise(EDGES)]
    return [f"< {EDGES[0]:g}", *inner, f"≥ {EDGES[-1]:g}"]


def histogram(values: np.ndarray) -> list[int]:
    v = values[~np.isnan(values)]
    return np.bincount(np.searchsorted(EDGES, v, side="right"), minlength=len(EDGES) + 1).tolist()


def score_column(cfg: SelectConfig) -> str:
    return "score" if cfg.long_dependency.correction == "copy" else "raw_score"


def load_scores(cfg: SelectConfig, work: WorkDir, prepared: list[PrepareResult]) -> np.ndarray:
    """Every document's score in DocIndex order (NaN: too short to score)."""

    parts = []
    for r in prepared:
        path = scores_file(cfg, work, r.shard_id)
        if not path.exists():
            raise ConfigError(
                f"{path}: no long-dependency scores for shard {r.shard_id}; the long_dependency stage "
                "must run before select (long_dependency.enabled: true runs it)"
            )
        t = pq.read_table(path, columns=["content_hash", score_column(cfg)])
        if t.column("content_hash").to_pylist() != _hashes(work, r):
            raise ConfigError(
                f"{path}: its rows are not the documents of shard {r.shard_id} (stale scores); delete the "
                "output folder's .longloom/longdep-* and rerun"
            )
        col = t.column(score_column(cfg)).to_numpy(zero_copy_only=False)
        parts.append(np.asarray(col, np.float64))
    return np.concatenate(parts) if parts else np.zeros(0)


def _hashes(work: WorkDir, r: PrepareResult) -> list[str]:
    path = work.prepare_dir / r.files["documents"]
    return list(pq.read_table(path, columns=["content_hash"]).column("content_hash").to_pylist())


def long_dependency_filter(
    cfg: SelectConfig, work: WorkDir, idx: DocIndex, alive: np.ndarray, prepared: list[PrepareResult]
) -> Drop | None:
    """Per source: drop scored documents below `min_score`, and those outside the top
    `keep_top_fraction` of the source's scored documents (ties by content hash, so the choice does
    not depend on input order). Unscored (too short) documents are kept."""
    ld = cfg.long_dependency
    if not ld.enabled or not ld.filters_any() or len(alive) == 0:
        return None
    scores = load_scores(cfg, work, prepared)
    if len(scores) != len(idx):
        raise ConfigError(
            f"long_dependency: {len(scores)} scores for {len(idx)} documents; the score files are stale "
            "(delete the output folder's .longloom/longdep-* and rerun)"
        )
    col = score_column(cfg)
    dropped: list[np.ndarray] = []
    details: list[str] = []
    for s_i, name in enumerate(idx.sources):
        f = ld.filter_for(name)
        if f.min_score is None and f.keep_top_fraction is None:
            continue
        mine = alive[(idx.source[alive] == s_i) & ~np.isnan(scores[alive])]
        if not len(mine):
            continue
        sc = scores[mine]
        why: dict[int, str] = {}
        if f.keep_top_fraction is not None:
            keep_n = math.ceil(f.keep_top_fraction * len(mine))
            # highest first; ties broken by content hash (stable, independent of input order)
            order = np.lexsort((idx.content_hash[mine], -sc))
            if keep_n < len(mine):
                cutoff = float(sc[order[keep_n - 1]]) if keep_n else float("inf")
                for j in order[keep_n:].tolist():
                    why[j] = (
                        f"{col} {sc[j]:.4f} outside the top {f.keep_top_fraction:g} of source {name!r} "
                        f"({keep_n} of {len(mine)} scored documents kept, cutoff {cutoff:.4f}; "
                        "long_dependency.keep_top_fraction)"
                    )
        if f.min_score is not None:
            for j in np.flatnonzero(sc < f.min_score).tolist():
                why[j] = f"{col} {sc[j]:.4f} < min_score {f.min_score:g} (long_dependency, source {name!r})"
        if why:
            js = sorted(why)
            dropped.append(mine[js])
            details += [why[j] for j in js]
    if not dropped:
        return None
    index = np.concatenate(dropped)
    return Drop(STEP, REASON, index, details) if len(index) else None


def route_priority(
    cfg: SelectConfig, work: WorkDir, idx: DocIndex, prepared: list[PrepareResult]
) -> np.ndarray:
    """Routing keys for `route: longest_first`: the score (unscored documents last)."""
    s = load_scores(cfg, work, prepared)
    return np.where(np.isnan(s), -np.inf, s)


def row_scores(
    cfg: SelectConfig,
    work: WorkDir,
    prepared: list[PrepareResult],
    selected: Any,
    scores: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """config name -> one score per packed row (NaN where no token of the row comes from a scored document)."""
    from pipeline.corpus.index import load_doc_index

    idx = load_doc_index(work, prepared, [s.name for s in cfg.sources])
    if scores is None:
        scores = load_scores(cfg, work, prepared)
    # position of (shard, row) in the index: shards are contiguous in canonical order
    offsets = np.zeros(len(prepared) + 1, np.int64)
    np.add.at(offsets, idx.shard.astype(np.int64) + 1, 1)
    offsets = np.cumsum(offsets)
    out: dict[str, np.ndarray] = {}
    for plan in selected.targets:
        t = pq.read_table(
            work.select_dir / plan.layout_file, columns=["shard", "doc_row", "start", "end", "row"]
        )
        pos = offsets[t.column("shard").to_numpy()] + t.column("doc_row").to_numpy()
        ntok = idx.n_tokens[pos]
        tok = np.minimum(t.column("end").to_numpy(), ntok) - np.minimum(t.column("start").to_numpy(), ntok)
        s = scores[pos]
        ok = ~np.isnan(s)
        rows = t.column("row").to_numpy()
        num = np.bincount(rows[ok], weights=(s[ok] * tok[ok]), minlength=plan.n_rows)
        den = np.bincount(rows[ok], weights=tok[ok].astype(np.float64), minlength=plan.n_rows)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[plan.config_name] = np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)
    return out


def _summary(v: np.ndarray) -> dict[str, Any]:
    x = v[~np.isnan(v)]
    if not len(x):
        return {"count": 0, "histogram": histogram(x)}
    q = np.quantile(x, [0.1, 0.5, 0.9])
    return {
        "count": len(x),
        "mean": round(float(x.mean()), 6),
        "p10": round(float(q[0]), 6),
        "p50": round(float(q[1]), 6),
        "p90": round(float(q[2]), 6),
        "min": round(float(x.min()), 6),
        "max": round(float(x.max()), 6),
        "histogram": histogram(x),
    }


def manifest_extra(
    cfg: SelectConfig, work: WorkDir, prepared: list[PrepareResult], shards: list[Any], selected: Any
) -> dict[str, Any]:
    """extra["long_dependency"]: lineage, counts, distributions per source and per target, and checks."""
    ld = cfg.long_dependency

    idx = load_doc_index_for(cfg, work, prepared)
    scores = load_scores(cfg, work, prepared)
    first = shards[0] if shards else None
    per_source: dict[str, Any] = {}
    for s_i, name in enumerate(idx.sources):
        mine = scores[idx.source == s_i]
        if len(mine):
            per_source[name] = {**_summary(mine), "too_short": int(np.isnan(mine).sum())}
    rows = row_scores(cfg, work, prepared, selected, scores)
    per_target = {name: {"rows": len(v), **_summary(v)} for name, v in rows.items()}
    checks = []
    for r in shards:
        ok = r.scored + r.too_short == r.documents
        checks.append(
            {
                "name": f"long_dependency {r.shard_id}",
                "ok": ok,
                "detail": f"{r.scored} scored + {r.too_short} too short = {r.documents} documents",
            }
        )
    return {
        "method": STEP,
        "model_id": first.model_id if first else None,
        "model_fingerprint": first.model_fingerprint if first else None,
        "backend": backend_identity(ld),
        "settings": ld.score_settings(),
        "score": score_column(cfg),
        "filters": {
            s.name: ld.filter_for(s.name).model_dump(mode="json")
            for s in cfg.sources
            if ld.filter_for(s.name).min_score is not None
            or ld.filter_for(s.name).keep_top_fraction is not None
        },
        "route": ld.route,
        "documents": sum(r.documents for r in shards),
        "scored": sum(r.scored for r in shards),
        "too_short": sum(r.too_short for r in shards),
        "pipeline_tokens": sum(r.pipeline_tokens for r in shards),
        "model_tokens": sum(r.model_tokens for r in shards),
        "positions": sum(r.positions for r in shards),
        "row_score": "token-weighted mean of the scores of the scored documents in the row",
        "bins": bin_labels(),
        "by_source": per_source,
        "by_target": per_target,
        "checks": checks,
    }


def load_doc_index_for(cfg: SelectConfig, work: WorkDir, prepared: list[PrepareResult]) -> DocIndex:
    from pipeline.corpus.index import load_doc_index

    return load_doc_index(work, prepared, [s.name for s in cfg.sources])
