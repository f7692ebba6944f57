"""The procedural stage: plan samples, generate them in batches over the packed rows, and account for them.

Runs after the pretraining rows are written (its haystacks are those rows) and before finalize.
`plan_procedural` fixes every sample's id and seed up front, so a sample is the same whichever batch
or worker makes it. `generate_batch` writes one chat file and one eval file per batch (atomic, and
skipped on a rerun when the recorded checksums still match); `summarize_procedural` checks the files
against the plan and reports the dependency-distance distribution per task.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from pipeline.core.lineage import lineage_steps, run_lineage
from pipeline.core.parquet_io import ParquetSink, sha256_file, write_json_atomic
from pipeline.core.progress import UnitProgress
from pipeline.core.results import group_by_target
from pipeline.core.tokenizer import Tokenizer, tokenizer_for
from pipeline.core.workdir import WorkDir
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from pipeline.synth.chat import (
    AssemblyError,
    ChatTemplate,
    Haystack,
    HaystackTooShort,
    chat_table,
    load_template,
)
from pipeline.synth.procedural import GENERATORS
from pipeline.synth.procedural.base import Draft
from pipeline.synth.procedural.pool import RowPool, pool_from_shards
from pipeline.synth.procedural.sample import BuiltSample, build_sample
from schemas.config import BuildConfig, ConfigError
from schemas.manifest import FileEntry, ShardEntry, StageReport
from schemas.procedural import ProceduralConfig
from schemas.records import CHAT_SCHEMA, EVAL_SCHEMA
from schemas.stage_config import ProceduralStageConfig, RunLevel

PROCEDURAL_STEP = "procedural@1"
log = logging.getLogger("longloom")


class SampleSpec(BaseModel):
    sample_id: str
    label: str
    task_index: int
    target_length: int
    index: int  # within (task, target length)
    seed: int


class ProceduralBatch(BaseModel):
    k: int
    n: int
    specs: list[SampleSpec]


class SampleStat(BaseModel):
    sample_id: str
    label: str
    task: str
    target_length: int
    length: int
    context_tokens: int
    distances: list[int]  # per question
    depths: list[float]  # per evidence piece
    seconds: float
    repeated_rows: bool
    retokenized: bool = False  # the haystack's reused row ids had to be replaced by a full tokenization


class BatchResult(BaseModel):
    k: int
    chat: FileEntry
    eval: FileEntry | None
    stats: list[SampleStat]
    reused: bool = False  # set when a rerun found this batch already written and verified


@dataclass
class ProceduralSummary:
    extra_configs: dict[str, list[FileEntry]]
    extra: dict[str, Any]  # goes to manifest extra["procedural"]
    samples: int
    tokens: int
    batches: int = 0
    reused: int = 0


def target_lengths(cfg: ProceduralStageConfig) -> list[int]:
    p = cfg.procedural
    return list(p.target_lengths) if p.target_lengths else [t.length for t in cfg.packing.targets]


def sample_seed(base: int, label: str, target_length: int, index: int) -> int:
    """A 63-bit seed per sample, independent of batching and of other tasks."""
    ss = np.random.SeedSequence([base, zlib.crc32(label.encode()), target_length, index])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & np.uint64(2**63 - 1))


def bound_task(cfg: RunLevel, task: Any) -> Any:
    """The task as its generator sees it: relative dataset paths start at the config file's folder."""
    if getattr(task, "task", None) in ("qa", "icl") and task.base_dir is None:
        return task.model_copy(update={"base_dir": str(cfg.base_dir)})
    return task


def check_procedural(cfg: ProceduralStageConfig) -> None:
    """Config problems found before any work starts: template vs tokenizer, targets too short for a task."""
    from pipeline.core.tokenizer import TokenizerError
    from pipeline.synth.chat import load_template
    from pipeline.synth.procedural.sample import chat_messages

    p = cfg.procedural
    tok = tokenizer_for(cfg)
    try:
        template = load_template(p.chat_template, tok, cfg.base_dir)
    except (TokenizerError, ValueError) as err:
        raise ConfigError(f"procedural.chat_template: {err}") from None
    shortest = min(target_lengths(cfg))
    for i, task in enumerate(p.tasks):
        try:
            draft = GENERATORS[task.task].draft(
                bound_task(cfg, task), np.random.default_rng(0), 0, p.depth_range
            )
        except ValueError as err:
            raise ConfigError(f"procedural.tasks.{i} ({task.label}): {err}") from None
        msgs, ctx, _ = chat_messages(draft, p.system_prompt)
        msgs[ctx]["content"] = draft.instruction + draft.queries[0].question
        fixed = 0 if p.length_counts == "context_only" else template.render(msgs).counted(p.length_counts)
        needles = int(sum(tok.count_batch([n.text + "\n" for n in draft.needles])))
        need = fixed + needles + 64
        if need > shortest:
            raise ConfigError(
                f"procedural.tasks.{i} ({task.label}): needs about {need} tokens before any haystack text, "
                f"more than the shortest target length {shortest}; use fewer needles or longer targets"
            )


def plan_procedural(cfg: ProceduralStageConfig) -> list[ProceduralBatch]:
    p = cfg.procedural
    base = p.seed if p.seed is not None else cfg.run.seed
    specs = [
        SampleSpec(
            sample_id=f"{task.label}-{L}-{i:05d}",
            label=task.label,
            task_index=ti,
            target_length=L,
            index=i,
            seed=sample_seed(base, task.label, L, i),
        )
        for L in target_lengths(cfg)
        for ti, task in enumerate(p.tasks)
        for i in range(task.samples)
    ]
    size = p.samples_per_batch
    chunks = [specs[a : a + size] for a in range(0, len(specs), size)]
    return [ProceduralBatch(k=k, n=len(chunks), specs=c) for k, c in enumerate(chunks)]


def pool_shards(written: list[list[ShardEntry]]) -> list[tuple[str, int]]:
    """(path relative to the output folder, rows) of every pretraining shard, in target then shard order."""
    return [(e.path, e.rows) for entries in written for e in entries]


def _paths(cfg: ProceduralStageConfig, b: ProceduralBatch) -> tuple[str, str | None]:
    name = f"train-{b.k:05d}-of-{b.n:05d}.parquet"
    ev = cfg.procedural.eval_config_name
    return f"data/{cfg.procedural.config_name}/{name}", (f"data/{ev}/{name}" if ev else None)


def _record_path(work: WorkDir, b: ProceduralBatch) -> Path:
    return work.procedural_dir / f"{b.k:05d}-of-{b.n:05d}.json"


def _verified(work: WorkDir, b: ProceduralBatch) -> BatchResult | None:
    rec = _record_path(work, b)
    try:
        res = BatchResult.model_validate_json(rec.read_text())
    except (OSError, ValueError):  # missing, truncated or from another version: redo it, like other stages
        return None
    for f in (res.chat, res.eval):
        if f is not None and (not (work.out / f.path).exists() or sha256_file(work.out / f.path) != f.sha256):
            return None
    if [s.sample_id for s in res.stats] != [s.sample_id for s in b.specs]:
        return None
    return res


def generate_batch(
    cfg: ProceduralStageConfig,
    work: WorkDir,
    batch: ProceduralBatch,
    shards: list[tuple[str, int]],
    steps: list[str],
) -> BatchResult:
    """Generate, verify and write one batch of samples (or return its verified result from a rerun)."""
    done = _verified(work, batch)
    if done is not None:
        return done.model_copy(update={"reused": True})
    p = cfg.procedural
    tok = tokenizer_for(cfg)
    template = load_template(p.chat_template, tok, cfg.base_dir)
    pool = pool_from_shards(work.out, shards)
    lineage_base = run_lineage(
        cfg, work, tok, [*steps, PROCEDURAL_STEP], "procedural"
    )  # each sample sets its seed
    chat_rel, eval_rel = _paths(cfg, batch)
    stats: list[SampleStat] = []
    chat_sink = ParquetSink(work.out / chat_rel, CHAT_SCHEMA, cfg.output.compression_level)
    eval_sink = (
        ParquetSink(work.out / eval_rel, EVAL_SCHEMA, cfg.output.compression_level) if eval_rel else None
    )
    pending: list[dict[str, Any]] = []
    pending_tokens = 0
    try:
        for spec in batch.specs:
            t0 = time.perf_counter()
            task = bound_task(cfg, p.tasks[spec.task_index])
            gen = GENERATORS[task.task]
            rng = np.random.default_rng(spec.seed)
            draft = gen.draft(task, rng, spec.index, p.depth_range)
            built, rows, repeated, retokenized = _build_with_haystack(
                pool, tok, draft, template, spec, p, lineage_base
            )
            row_steps = next((r["lineage"]["steps"] for r in rows if r.get("lineage")), None)
            if row_steps:
                built.record["lineage"]["steps"] = [
                    *row_steps,
                    *(s for s in built.record["lineage"]["steps"] if s not in row_steps),
                ]
            pending.append(built.record)
            pending_tokens += len(built.record["input_ids"])
            if eval_sink is not None:
                eval_sink.write(_eval_table(built.eval_records))
            if pending_tokens >= cfg.output.row_group_tokens:
                chat_sink.write(chat_table(pending, loss_mask=cfg.output.loss_mask))
                pending, pending_tokens = [], 0
            stats.append(
                SampleStat(
                    sample_id=spec.sample_id,
                    label=spec.label,
                    task=draft.task,
                    target_length=spec.target_length,
                    length=built.record["length"],
                    context_tokens=built.record["context_tokens"],
                    distances=[q["dependency_distance"] for q in built.record["questions"]],
                    depths=[round(float(e["depth"]), 5) for e in built.record["evidence"]],
                    seconds=round(time.perf_counter() - t0, 4),
                    repeated_rows=repeated,
                    retokenized=retokenized,
                )
            )
        if pending:
            chat_sink.write(chat_table(pending, loss_mask=cfg.output.loss_mask))
        chat_sha = chat_sink.close()
        eval_sha = eval_sink.close() if eval_sink is not None else None
    except BaseException:
        chat_sink.abort()
        if eval_sink is not None:
            eval_sink.abort()
        raise
    chat_entry = FileEntry(
        path=chat_rel, sha256=chat_sha, bytes=(work.out / chat_rel).stat().st_size, rows=chat_sink.rows
    )
    eval_entry = None
    if eval_rel and eval_sink is not None and eval_sha is not None:
        eval_entry = FileEntry(
            path=eval_rel, sha256=eval_sha, bytes=(work.out / eval_rel).stat().st_size, rows=eval_sink.rows
        )
    res = BatchResult(k=batch.k, chat=chat_entry, eval=eval_entry, stats=stats)
    write_json_atomic(_record_path(work, batch), res.model_dump(mode="json"))
    return res


def _build_with_haystack(
    pool: RowPool,
    tok: Tokenizer,
    draft: Draft,
    template: ChatTemplate,
    spec: SampleSpec,
    p: ProceduralConfig,
    lineage: dict[str, Any],
) -> tuple[BuiltSample, list[dict[str, Any]], bool, bool]:
    """Build one sample, gathering more rows while the haystack is short, and re-tokenizing the haystack
    in full if the ids reused from the rows ever disagree with the verifying tokenization."""
    start_row = int(np.random.default_rng([spec.seed, 1]).integers(pool.n_rows))
    if draft.filler is None:
        want = spec.target_length + 1024
    else:  # a dense context takes only its prose share from the rows
        want = int(draft.filler.prose * spec.target_length * 1.1) + 1024
    retokenized = False
    for _ in range(4):
        hay, rows, repeated = pool.haystack(tok, start_row, want)
        try:
            try:
                built = _build(draft, hay, template, spec, p, lineage)
            except AssemblyError as err:
                if isinstance(err, HaystackTooShort) or not hay.reused_ids:
                    raise
                log.warning(
                    "%s: reused row ids disagree with the text (%s); re-tokenizing", spec.sample_id, err
                )
                retokenized = True
                built = _build(draft, hay.retokenized(), template, spec, p, lineage)
            return built, rows, repeated, retokenized
        except HaystackTooShort as err:
            want = int(want * 1.1) + err.needed - err.available
    raise RuntimeError(f"{spec.sample_id}: could not gather a long enough haystack")


def _build(
    draft: Draft,
    hay: Haystack,
    template: ChatTemplate,
    spec: SampleSpec,
    p: ProceduralConfig,
    lineage: dict[str, Any],
) -> BuiltSample:
    return build_sample(
        draft,
        hay,
        template,
        spec.target_length,
        p.length_counts,
        p.system_prompt,
        spec.sample_id,
        spec.seed,
        lineage,
    )


def _eval_table(records: list[dict[str, Any]]) -> pa.Table:
    cols = {f.name: pa.array([r[f.name] for r in records], f.type) for f in EVAL_SCHEMA}
    return pa.table(cols, schema=EVAL_SCHEMA)


# --- accounting -----------------------------------------------------------------------------------------


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, np.float64)
    q = np.quantile(a, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    keys = ("min", "p10", "p25", "p50", "p75", "p90", "max")
    out = {k: round(float(v), 4) for k, v in zip(keys, q, strict=True)}
    out["mean"] = round(float(a.mean()), 4)
    return out


def _histogram(values: list[float]) -> list[int]:
    """Counts over ten equal bins of [0, 1]."""
    counts, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=10, range=(0.0, 1.0))
    return [int(c) for c in counts]


def summarize_procedural(
    cfg: ProceduralStageConfig, work: WorkDir, results: list[BatchResult]
) -> ProceduralSummary:
    """Check the files against the plan and describe what was made, per task and per target length."""
    p = cfg.procedural
    plan = plan_procedural(cfg)
    results = sorted(results, key=lambda r: r.k)
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    planned = [s.sample_id for b in plan for s in b.specs]
    made = [s.sample_id for r in results for s in r.stats]
    check("procedural: samples made = samples planned", planned == made, f"{len(made)} of {len(planned)}")
    stats = [s for r in results for s in r.stats]
    bad_len = [s.sample_id for s in stats if s.length != s.target_length]
    check(
        "procedural: every sample is exactly its target length",
        not bad_len,
        ", ".join(bad_len[:5]) or f"{len(stats)} samples ({p.length_counts})",
    )
    chat_rows = sum(r.chat.rows for r in results)
    check(
        "procedural: chat rows = samples", chat_rows == len(stats), f"{chat_rows} rows, {len(stats)} samples"
    )
    if p.eval_config_name:
        questions = sum(len(s.distances) for s in stats)
        eval_rows = sum(r.eval.rows for r in results if r.eval)
        check(
            "procedural: eval rows = questions",
            eval_rows == questions,
            f"{eval_rows} rows, {questions} questions",
        )
    files = [f for r in results for f in (r.chat, r.eval) if f is not None]
    bad = [f.path for f in files if sha256_file(work.out / f.path) != f.sha256]
    check("procedural: file checksums", not bad, ", ".join(bad) or f"{len(files)} files match")

    by_task: dict[str, list[SampleStat]] = defaultdict(list)
    for s in stats:
        by_task[s.label].append(s)
    tasks: dict[str, Any] = {}
    for label, ss in by_task.items():
        dist = [d for s in ss for d in s.distances]
        rel = [d / s.target_length for s in ss for d in s.distances]
        tasks[label] = {
            "task": ss[0].task,
            "samples": len(ss),
            "questions": len(dist),
            "dependency_distance_tokens": _quantiles([float(d) for d in dist]),
            "dependency_distance_relative": _quantiles(rel),
            "dependency_distance_histogram": _histogram(rel),  # tenths of the target length
            "evidence_depth_histogram": _histogram([d for s in ss for d in s.depths]),
            "by_target_length": {
                str(L): _quantiles([float(d) for s in ss if s.target_length == L for d in s.distances])
                for L in sorted({s.target_length for s in ss})
            },
        }
    by_length: dict[str, Any] = {}
    for L in sorted({s.target_length for s in stats}):
        ss = [s for s in stats if s.target_length == L]
        by_length[str(L)] = {
            "samples": len(ss),
            "repeated_rows": sum(s.repeated_rows for s in ss),
            "retokenized_haystacks": sum(s.retokenized for s in ss),
        }
    extra = {
        "samples": len(stats),
        "questions": sum(len(s.distances) for s in stats),
        "tokens": sum(s.length for s in stats),
        "chat_template": p.chat_template,
        "length_counts": p.length_counts,
        "config_name": p.config_name,
        "eval_config_name": p.eval_config_name,
        "generators": sorted({GENERATORS[t.task].step for t in p.tasks}),
        "tasks": tasks,
        "target_lengths": by_length,
        "checks": checks,
        "ok": all(c["ok"] for c in checks),
    }
    configs = {p.config_name: [r.chat for r in results]}
    if p.eval_config_name:
        configs[p.eval_config_name] = [r.eval for r in results if r.eval]
    # per-sample seconds stay out of `extra`: the manifest must be byte-identical across runs
    return ProceduralSummary(
        configs, extra, len(stats), sum(s.length for s in stats), len(results), sum(r.reused for r in results)
    )


def run_procedural(
    cfg: ProceduralStageConfig, work: WorkDir, written: list[list[ShardEntry]], steps: list[str]
) -> ProceduralSummary:
    """Every batch in this process, one after another (the library path of `run_build`)."""
    shards = pool_shards(written)
    results = []
    for b in plan_procedural(cfg):
        results.append(generate_batch(cfg, work, b, shards, steps))
        log.info("procedural batch %d/%d: %d samples", b.k + 1, b.n, len(b.specs))
    return summarize_procedural(cfg, work, results)


def describe(extra: dict[str, Any]) -> list[str]:
    """Summary lines for the end-of-run log, from the manifest's extra["procedural"]."""
    e = extra
    lines = [f"  procedural: {e['samples']} samples, {e['questions']} questions, {e['tokens']} tokens"]
    for label, t in e["tasks"].items():
        d = t["dependency_distance_tokens"]
        lines.append(
            f"    {label}: {t['samples']} samples; dependency distance p10/p50/p90 = "
            f"{d.get('p10', 0):.0f}/{d.get('p50', 0):.0f}/{d.get('p90', 0):.0f} tokens"
        )
    return lines


class ProceduralStage(Stage):
    """Procedural long-range chat samples over the packed rows (`pipeline.stages.procedural`)."""

    name = "procedural"
    sections = ("procedural", "tokenizer", "packing", "output")
    inputs = ("prepare", "select", "write")
    unit_noun = "batches"
    config_type = ProceduralStageConfig
    task_name = "procedural-batch"

    def enabled(self, cfg: BuildConfig) -> bool:
        return cfg.procedural.enabled

    def work_dir(self, ctx: RunContext) -> Path:
        return ctx.work.procedural_dir

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Procedural(self, ctx, inputs)


class _Procedural(StageWork[Any, Any]):
    def __init__(self, stage: Stage, ctx: RunContext, inputs: Inputs) -> None:
        super().__init__(stage, ctx, inputs)
        selected, written = inputs["select"], inputs["write"]
        self.steps = lineage_steps(inputs["prepare"], selected)
        self.shards = pool_shards(group_by_target(selected, [w.entry for w in written]))

    def units(self) -> list[Any]:
        return list(plan_procedural(self.cfg))

    def run_unit(self, unit: Any, progress: UnitProgress | None = None) -> Any:
        return generate_batch(self.cfg, self.ctx.work, unit, self.shards, self.steps)

    def merge(self, results: list[Any]) -> Any:
        return summarize_procedural(self.cfg, self.ctx.work, results)

    def report(self, merged: Any) -> StageReport:
        return StageReport(items_out=merged.samples, tokens_out=merged.tokens)

    def reused(self, results: list[Any], merged: Any) -> int:
        return int(merged.reused)

    def label(self, unit: Any) -> str:
        return f"batch {unit.k + 1}/{unit.n}"

    def advance(self, r: Any) -> tuple[str, dict[str, int]]:
        return "procedural", {"samples": len(r.stats)}

    def log_line(self, r: Any) -> str:
        return f"procedural batch: {len(r.stats)} samples ({', '.join(sorted({s.label for s in r.stats}))})"
