"""The long-dependency stage (issue 15): score every kept document of each prepared shard.

Units are prepared shards. A shard's documents are read as token ids (the prepare stage's tokens
file), decoded with the pipeline tokenizer, re-tokenized by the scoring model's own tokenizer and
scored with `long_dependency@2` (`pipeline.longdep.scorer`): both lengths are recorded. Scores come
from the score cache where it has them (keyed by model fingerprint, text hash and settings), so an
interrupted run resumes; the model is loaded only on a cache miss, once per process.

Output per shard: `<work>/.longloom/longdep-<key>/<shard_id>.parquet`, one row per document,
row-aligned with the shard's documents file (`LONGDEP_SCORES_SCHEMA`), and a JSON record with its
checksum and the lineage (method, model id and fingerprint, windows, sample counts), so a rerun
verifies and skips the shard. The select stage reads these files (`pipeline.longdep.use`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.core.parquet_io import ParquetSink, read_tokens_into, sha256_file, write_json_atomic
from pipeline.core.progress import UnitProgress
from pipeline.core.results import PrepareResult, tokens_file_of
from pipeline.core.tokenizer import tokenizer_for
from pipeline.core.workdir import WorkDir
from pipeline.longdep.backends import BackendError, LogprobModel, make_backend
from pipeline.longdep.cache import ScoreCache
from pipeline.longdep.scorer import METHOD, score_documents
from pipeline.longdep.store import cache_dir, longdep_dir, scores_file
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from schemas.config import BuildConfig
from schemas.longdep import LONGDEP_SCORES_SCHEMA, LongDepConfig
from schemas.manifest import StageReport
from schemas.stage_config import LongDepStageConfig


@dataclass
class LongDepShardResult:
    """What scoring one shard did; persisted as its completion record (the lineage of its scores)."""

    shard_id: str
    source: str
    documents: int
    scored: int
    too_short: int
    file: str  # relative to the longdep folder
    sha256: str
    documents_sha256: str  # of the documents table the scores are row-aligned with
    method: str
    model_id: str
    model_fingerprint: str
    settings: dict[str, Any]
    pipeline_tokens: int  # the documents' tokens with the pipeline tokenizer
    model_tokens: int  # ... and with the scoring model's tokenizer
    positions: int  # scored target positions (spans x span_tokens)
    cache_hits: int
    cache_misses: int
    seconds: float
    reused: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "reused": False}


_MODELS: dict[str, LogprobModel] = {}
_MODELS_LOCK = threading.Lock()


def model_for(ld: LongDepConfig) -> LogprobModel:
    """The configured model, loaded once per process (the offline Gemma takes ~11 s to load)."""
    key = json.dumps(ld.backend.model_dump(mode="json"), sort_keys=True)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = make_backend(ld)
        return _MODELS[key]


def load_verified(cfg: BuildConfig, work: WorkDir, shard_id: str, docs_sha: str) -> LongDepShardResult | None:
    rec = longdep_dir(cfg, work) / f"{shard_id}.json"
    if not rec.exists():
        return None
    try:
        res = LongDepShardResult(**json.loads(rec.read_text()))
    except (ValueError, TypeError):
        return None
    path = longdep_dir(cfg, work) / res.file
    if res.documents_sha256 != docs_sha or not path.exists() or sha256_file(path) != res.sha256:
        return None
    res.reused = True
    res.cache_hits = res.cache_misses = 0
    res.seconds = 0.0
    return res


def _texts(cfg: BuildConfig, tokens_path: Path, starts: np.ndarray, lengths: np.ndarray) -> Iterator[str]:
    """Each document's text, decoded from its pipeline token ids (one document in memory at a time)."""
    tok = tokenizer_for(cfg)
    fd = os.open(tokens_path, os.O_RDONLY)
    try:
        for start, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            ids = np.empty(n, np.int32)
            if n:
                read_tokens_into(fd, ids, start)
            yield tok.decode(ids)
    finally:
        os.close(fd)


def score_shard(
    cfg: BuildConfig, work: WorkDir, prepared: PrepareResult, progress: UnitProgress | None = None
) -> LongDepShardResult:
    """Score every document of one prepared shard (or reuse its verified result)."""
    ld = cfg.long_dependency
    docs = work.prepare_dir / prepared.files["documents"]
    docs_sha = prepared.sha256.get("documents") or sha256_file(docs)
    previous = load_verified(cfg, work, prepared.shard_id, docs_sha)
    if previous is not None:
        return previous
    started = time.perf_counter()
    meta = pq.read_table(docs, columns=["doc_id", "content_hash", "n_tokens", "token_start"])
    n_tok = meta.column("n_tokens").to_numpy().astype(np.int64)
    model = model_for(ld)
    cache = ScoreCache(cache_dir(cfg))
    texts = _texts(cfg, tokens_file_of(docs), meta.column("token_start").to_numpy(), n_tok)
    with tqdm(
        total=meta.num_rows,
        desc=f"long_dependency {prepared.shard_id}",
        unit="doc",
        disable=not ld.progress,
        leave=False,
    ) as bar:

        def tick(i: int, hit: bool) -> None:
            bar.update(1)
            if progress is not None:
                progress({"docs": i + 1, "cached": cache.hits})

        results = score_documents(texts, model, ld, cache, tick)
    table = pa.table(
        {
            "doc_id": meta.column("doc_id"),
            "content_hash": meta.column("content_hash"),
            "n_tokens": pa.array(n_tok),
            "model_tokens": pa.array([r.n_tokens for r in results], pa.int64()),
            "status": pa.array([r.status for r in results], pa.string()),
            "score": pa.array([r.score for r in results], pa.float64()),
            "raw_score": pa.array([r.raw_score for r in results], pa.float64()),
            "copy_fraction": pa.array([r.copy_fraction for r in results], pa.float64()),
            "spans": pa.array([r.spans for r in results], pa.int32()),
            "positions": pa.array([r.positions for r in results], pa.int32()),
            "profile": pa.array(
                [json.dumps(r.profile, sort_keys=True) if r.status == "scored" else None for r in results],
                pa.string(),
            ),
        },
        schema=LONGDEP_SCORES_SCHEMA,
    )
    final = scores_file(cfg, work, prepared.shard_id)
    with ParquetSink(final, LONGDEP_SCORES_SCHEMA) as sink:
        sink.write(table)
    scored = sum(r.status == "scored" for r in results)
    res = LongDepShardResult(
        shard_id=prepared.shard_id,
        source=prepared.source,
        documents=meta.num_rows,
        scored=scored,
        too_short=meta.num_rows - scored,
        file=final.name,
        sha256=sha256_file(final),
        documents_sha256=docs_sha,
        method=METHOD,
        model_id=model.model_id,
        model_fingerprint=model.fingerprint,
        settings=ld.score_settings(),
        pipeline_tokens=int(n_tok.sum()),
        model_tokens=sum(r.n_tokens for r in results),
        positions=sum(r.positions for r in results),
        cache_hits=cache.hits,
        cache_misses=cache.misses,
        seconds=round(time.perf_counter() - started, 3),
    )
    write_json_atomic(longdep_dir(cfg, work) / f"{prepared.shard_id}.json", res.to_json())
    return res


# ---- the stage ------------------------------------------------------------------------------------


class LongDepStage(Stage):
    """Score each prepared shard's documents for long-range dependency (this module)."""

    name = "long_dependency"
    # the section, and the tokenizer that decodes the prepared ids into the text the model re-tokenizes
    sections = ("long_dependency", "tokenizer")
    inputs = ("prepare",)
    config_type = LongDepStageConfig
    task_name = "long-dependency-shard"
    no_retry_on = (BackendError, ImportError)  # a model that cannot load fails the same way every time

    def enabled(self, cfg: BuildConfig) -> bool:
        return cfg.long_dependency.enabled

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _LongDep(self, ctx, inputs)


class _LongDep(StageWork[PrepareResult, LongDepShardResult]):
    def units(self) -> list[PrepareResult]:
        return list(self.inputs["prepare"])

    def run_unit(self, unit: PrepareResult, progress: UnitProgress | None = None) -> LongDepShardResult:
        return score_shard(self.cfg, self.ctx.work, unit, progress)

    def report(self, merged: list[LongDepShardResult]) -> StageReport:
        return StageReport(
            items_in=sum(r.documents for r in merged),
            items_out=sum(r.scored for r in merged),
            tokens_in=sum(r.pipeline_tokens for r in merged),
            notes={"too_short": sum(r.too_short for r in merged)},
        )

    def label(self, unit: PrepareResult) -> str:
        return unit.shard_id

    def advance(self, r: LongDepShardResult) -> tuple[str, dict[str, int]]:
        return r.shard_id, {"docs": r.documents}

    def log_line(self, r: LongDepShardResult) -> str:
        return (
            f"{r.shard_id}: {r.scored} of {r.documents} documents scored for long dependency "
            f"({r.too_short} too short; {r.cache_hits} cache hits, {r.cache_misses} misses"
            f"{', reused' if r.reused else ''})"
        )
