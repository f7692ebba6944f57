"""The rewriter stage: batches of contexts through the endpoint, validated, merged into one chat set.

`run_batch` is one Prefect task's work: load its contexts, build every prompt, fetch the answers
concurrently (cache first), turn each into a sample or a counted rejection or failure, and write a
part file. `merge` drops questions repeated across batches, writes `data/rewriter/` (CHAT_SCHEMA) and
`audit/rewriter_rejected/` (every sample not kept, with its raw answer), and adds up the report that
goes into manifest extra["rewriter"]. `run_rewriter` does both in-process, for `pipeline.build`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.core.lineage import run_lineage
from pipeline.core.parquet_io import ParquetSink, write_json_atomic
from pipeline.core.progress import UnitProgress
from pipeline.core.results import SelectResult
from pipeline.core.storage import output_path
from pipeline.core.tokenizer import tokenizer_for
from pipeline.core.workdir import WorkDir
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from pipeline.synth.chat import chat_table
from pipeline.synth.chat import load_template as load_chat_template
from pipeline.synth.rewriter.assemble import SampleFailure, build_record, generator_name, params_json
from pipeline.synth.rewriter.cache import ResponseCache
from pipeline.synth.rewriter.client import (
    ChatRequest,
    ChatResult,
    RequestBudget,
    RewriterClient,
    TemplateUsage,
)
from pipeline.synth.rewriter.contexts import Context, ContextReader, Passage
from pipeline.synth.rewriter.parsing import ParseFailure, parse_json_answer
from pipeline.synth.rewriter.plan import Batch, RewriterPlan, SamplePlan, make_plan
from pipeline.synth.rewriter.secrets import Redactor, all_secrets, endpoint_host, resolve_api_key
from pipeline.synth.rewriter.strategies import Rejection, build_request, interpret, passages_for
from pipeline.synth.rewriter.templates import load_template
from schemas.config import BuildConfig, ConfigError
from schemas.manifest import FileEntry, StageReport
from schemas.records import CHAT_SCHEMA, REWRITER_AUDIT_SCHEMA
from schemas.stage_config import RewriterStageConfig

log = logging.getLogger("longloom.rewriter")

STEP = "rewriter@1"
CONFIG_NAME = "rewriter"
AUDIT_NAME = "rewriter_rejected"
# Internal part files carry every outcome (accepted ones too) plus the key that finds repeated questions.
_PART_SCHEMA = REWRITER_AUDIT_SCHEMA.append(pa.field("question_key", pa.string()))


def stage_dir(work: WorkDir) -> Path:
    return work.rewriter_dir


def cache_dir(cfg: RewriterStageConfig) -> Path:
    rw = cfg.rewriter
    # under the output's work folder: for a URL output, this process's mirror of it (stored with it)
    return (
        Path(rw.cache_dir) if rw.cache_dir else output_path(cfg.output.dir) / ".longloom" / "rewriter-cache"
    )


@dataclass
class BatchResult:
    index: int
    samples_file: str  # relative to the stage folder
    parts_file: str
    counts: dict[str, dict[str, Any]]  # task -> requested / accepted / rejected{} / failed{}
    usage: dict[str, dict[str, Any]]  # template -> TemplateUsage fields
    requests_sent: int
    seconds: float


def _empty_counts() -> dict[str, Any]:
    return {"requested": 0, "accepted": 0, "rejected": {}, "failed": {}}


def _bump(counts: dict[str, dict[str, Any]], task: str, status: str, reason: str | None = None) -> None:
    c = counts.setdefault(task, _empty_counts())
    if status in ("requested", "accepted"):
        c[status] += 1
    else:
        assert reason is not None
        c[status][reason] = c[status].get(reason, 0) + 1


@dataclass
class _Job:
    plan: SamplePlan
    passages: list[Passage]
    request: ChatRequest | None
    ctx: Context | None
    error: tuple[str, str] | None = None  # failed before any request: (reason, detail)
    result: ChatResult | None = field(default=None, repr=False)


async def _fetch_all(client: RewriterClient, jobs: list[_Job], desc: str, show: bool) -> None:
    todo = [j for j in jobs if j.request is not None]
    with tqdm(total=len(todo), desc=desc, unit="req", disable=not show, mininterval=1.0, leave=False) as bar:

        async def one(j: _Job) -> None:
            assert j.request is not None
            j.result = await client.complete(j.request)
            bar.update(1)

        async with client:
            await asyncio.gather(*(one(j) for j in todo))


def run_batch(cfg: RewriterStageConfig, work: WorkDir, batch: Batch, sample_length: int) -> BatchResult:
    """One batch of contexts: prompts, answers, validation; writes the batch's part files."""
    t0 = time.perf_counter()
    rw = cfg.rewriter
    tok = tokenizer_for(cfg)
    chat = load_chat_template(rw.chat_template, tok, cfg.base_dir)
    api_key = resolve_api_key(rw)
    redact = Redactor(all_secrets(rw, api_key))
    cache = ResponseCache(cache_dir(cfg))
    budget = RequestBudget(batch.budget)
    reader = ContextReader(work.out, tok)
    contexts: dict[str, Context] = {}
    jobs: list[_Job] = []
    min_tokens = sample_length + 512  # room for the sizing margin of pipeline.synth.chat
    for p in batch.plans:
        strategy = rw.strategies[p.strategy]
        template = load_template(p.template)
        ctx = None
        if p.grounded:
            key = p.contexts[0].row_id
            if key not in contexts:
                contexts[key] = reader.context(list(p.contexts), min_tokens)
            ctx = contexts[key]
        passages = passages_for(p, ctx, rw, sample_length)
        jobs.append(_Job(p, passages, build_request(p, strategy, template, passages, rw), ctx))

    client = RewriterClient(cfg.rewriter, api_key, cache, budget, redact)
    asyncio.run(_fetch_all(client, jobs, f"rewriter batch {batch.index}", rw.progress))

    lineage = run_lineage(cfg, work, tok, [], "rewriter")
    host = endpoint_host(rw.base_url)
    counts: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j in jobs:
        p, res, req = j.plan, j.result, j.request
        assert res is not None and req is not None
        _bump(counts, p.kind, "requested")
        row = {
            "sample_id": p.sample_id,
            "task": p.kind,
            "template": req.template,
            "template_version": req.template_version,
            "prompt_hash": req.prompt_hash,
            "seed": p.seed,
            "context_row": p.contexts[0].row_id if p.contexts else None,
            # what it took to get the recorded answer (the cached entry keeps it), so a rerun served from
            # the cache writes the same row; a failure is never cached and is asked again every run
            "attempts": res.answer_attempts if res.ok else res.attempts,
            "raw_response": redact(res.content) if res.content is not None else None,
            "question_key": None,
        }
        if not res.ok:
            reason, detail = res.error_reason or "unknown", redact(res.error_detail or "")
            _bump(counts, p.kind, "failed", reason)
            parts.append({**row, "status": "failed", "reason": reason, "detail": detail})
            continue
        try:
            obj = parse_json_answer(res.content, res.finish_reason)
            draft = interpret(p, obj, rw, len(j.passages))
            rec = build_record(p, draft, j.ctx, j.passages, chat, rw, sample_length)
        except (ParseFailure, Rejection) as err:
            _bump(counts, p.kind, "rejected", err.reason)
            parts.append({**row, "status": "rejected", "reason": err.reason, "detail": redact(err.detail)})
            continue
        except SampleFailure as err:
            _bump(counts, p.kind, "failed", err.reason)
            parts.append({**row, "status": "failed", "reason": err.reason, "detail": redact(err.detail)})
            continue
        passages_info = rec.pop("_passages")
        context_rows = rec.pop("_context_rows")
        rec.update(
            sample_id=p.sample_id,
            task=p.kind,
            generator=generator_name(p.kind),
            seed=p.seed,
            params=params_json(
                p,
                draft,
                {
                    "passages": passages_info,
                    "context_rows": context_rows,
                    # the answer's own facts only: whether it came from the cache and how many
                    # attempts this run made change from run to run, and go to the run's report
                    "response": {
                        "finish_reason": res.finish_reason,
                        "prompt_tokens": res.prompt_tokens,
                        "completion_tokens": res.completion_tokens,
                        "response_model": res.response_model,
                        "json_mode": res.json_mode_used,
                    },
                },
            ),
            model={
                "model": rw.model,
                "endpoint_host": host,
                "template": req.template,
                "template_version": req.template_version,
                "prompt_hash": req.prompt_hash,
                "sampling": req.sampling_json,
            },
            lineage={
                **lineage,
                "steps": [STEP, generator_name(p.kind), f"{req.template}@{req.template_version}"],
            },
        )
        records.append(rec)
        _bump(counts, p.kind, "accepted")
        parts.append(
            {**row, "status": "accepted", "reason": "accepted", "detail": "", "question_key": draft.dedup_key}
        )

    d = stage_dir(work) / "batches"
    samples_rel = f"batches/samples-{batch.index:05d}.parquet"
    parts_rel = f"batches/parts-{batch.index:05d}.parquet"
    d.mkdir(parents=True, exist_ok=True)
    with ParquetSink(stage_dir(work) / samples_rel, CHAT_SCHEMA, cfg.output.compression_level) as sink:
        sink.write(chat_table(records, loss_mask=cfg.output.loss_mask))
    with ParquetSink(stage_dir(work) / parts_rel, _PART_SCHEMA, cfg.output.compression_level) as sink:
        sink.write(pa.Table.from_pylist(parts, schema=_PART_SCHEMA))
    usage = {k: v.as_dict() for k, v in client.usage.items()}
    result = BatchResult(
        batch.index, samples_rel, parts_rel, counts, usage, budget.used, round(time.perf_counter() - t0, 3)
    )
    acc = sum(c["accepted"] for c in counts.values())
    log.info(
        "rewriter batch %d: %d samples, %d accepted, %d HTTP requests, %d cache hits (%.1fs)",
        batch.index,
        len(jobs),
        acc,
        budget.used,
        cache.hits,
        result.seconds,
    )
    return result


# --- merge ------------------------------------------------------------------------------------------------


@dataclass
class RewriterOutput:
    extra_configs: dict[str, list[FileEntry]]
    audit_extra: dict[str, list[FileEntry]]
    stats: dict[str, Any]
    report: StageReport


def _dist_summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"n": 0}
    q = np.percentile(values, [0, 10, 50, 90, 100])
    return {
        "n": int(values.size),
        "min": float(q[0]),
        "p10": float(q[1]),
        "p50": float(q[2]),
        "p90": float(q[3]),
        "max": float(q[4]),
        "mean": round(float(values.mean()), 1),
    }


def _write_sharded(
    out: Path, rel_dir: str, stem: str, table: pa.Table, schema: pa.Schema, rows_per_file: int, level: int
) -> list[FileEntry]:
    """`table` as `<rel_dir>/<stem>-k-of-n.parquet` files of at most `rows_per_file` rows (one file if empty)."""
    n_files = max(1, -(-table.num_rows // rows_per_file))
    entries = []
    for k in range(n_files):
        rel = f"{rel_dir}/{stem}-{k:05d}-of-{n_files:05d}.parquet"
        sink = ParquetSink(out / rel, schema, level)
        try:
            sink.write(table.slice(k * rows_per_file, rows_per_file))
        except BaseException:
            sink.abort()
            raise
        sha = sink.close()
        entries.append(FileEntry(path=rel, sha256=sha, bytes=(out / rel).stat().st_size, rows=sink.rows))
    return entries


def _in_plan_order(table: pa.Table, order: dict[str, int]) -> pa.Table:
    rank = np.array([order[s] for s in table.column("sample_id").to_pylist()], np.int64)
    return table.take(pa.array(np.argsort(rank, kind="stable"), pa.int64()))


def merge(
    cfg: RewriterStageConfig, work: WorkDir, plan: RewriterPlan, results: list[BatchResult]
) -> RewriterOutput:
    """Drop repeated questions across the run, write the chat set and the audit table, add up the report."""
    t0 = time.perf_counter()
    sdir = stage_dir(work)
    results = sorted(results, key=lambda r: r.index)
    parts = (
        pa.concat_tables([pq.read_table(sdir / r.parts_file) for r in results])
        if results
        else _PART_SCHEMA.empty_table()
    )
    samples = (
        pa.concat_tables([pq.read_table(sdir / r.samples_file) for r in results])
        if results
        else CHAT_SCHEMA.empty_table()
    )
    order = {p.sample_id: i for i, p in enumerate(pl for b in plan.batches for pl in b.plans)}
    parts = _in_plan_order(parts, order)

    counts: dict[str, dict[str, Any]] = {}
    for r in results:
        for task, c in r.counts.items():
            mine = counts.setdefault(task, _empty_counts())
            mine["requested"] += c["requested"]
            mine["accepted"] += c["accepted"]
            for status in ("rejected", "failed"):
                for k, v in c[status].items():
                    mine[status][k] = mine[status].get(k, 0) + v
    for u in plan.unplanned:
        _bump(counts, u["task"], "requested")
        _bump(counts, u["task"], "failed", u["reason"])

    # repeated questions: the first (in plan order) stays, later ones become rejections
    first_of: dict[str, str] = {}
    dup_of: dict[str, str] = {}
    status = parts.column("status").to_pylist()
    keys = parts.column("question_key").to_pylist()
    ids = parts.column("sample_id").to_pylist()
    tasks = parts.column("task").to_pylist()
    for sid, st, key, task in zip(ids, status, keys, tasks, strict=True):
        if st != "accepted":
            continue
        if key in first_of:
            dup_of[sid] = first_of[key]
            counts[task]["accepted"] -= 1
            _bump(counts, task, "rejected", "duplicate_question")
        else:
            first_of[key] = sid
    audit_rows = []
    for i, (sid, st) in enumerate(zip(ids, status, strict=True)):
        if st == "accepted" and sid not in dup_of:
            continue
        row = {f.name: parts.column(f.name)[i].as_py() for f in REWRITER_AUDIT_SCHEMA}
        if sid in dup_of:
            row.update(
                status="rejected", reason="duplicate_question", detail=f"same question as {dup_of[sid]}"
            )
        audit_rows.append(row)
    for u in plan.unplanned:
        audit_rows.append(
            {
                "sample_id": u["sample_id"],
                "task": u["task"],
                "status": "failed",
                "reason": u["reason"],
                "detail": u["detail"],
                "attempts": 0,
            }
        )
    audit = pa.Table.from_pylist(audit_rows, schema=REWRITER_AUDIT_SCHEMA)
    keep_mask = pc.invert(pc.is_in(samples.column("sample_id"), pa.array(list(dup_of), pa.string())))
    kept = samples.filter(keep_mask)
    kept = _in_plan_order(kept, order)

    out = work.out
    level = cfg.output.compression_level
    rows_per_file = max(1, cfg.output.shard_tokens // max(1, plan.sample_length))
    data_files = _write_sharded(out, f"data/{CONFIG_NAME}", "train", kept, CHAT_SCHEMA, rows_per_file, level)
    audit_files = _write_sharded(
        out, f"audit/{AUDIT_NAME}", AUDIT_NAME, audit, REWRITER_AUDIT_SCHEMA, 1_000_000, level
    )

    stats = _report(cfg, plan, results, counts, kept, audit)
    write_json_atomic(sdir / "report.json", stats)
    report = StageReport(
        seconds=round(sum(r.seconds for r in results) + time.perf_counter() - t0, 3),
        items_in=stats["requested"],
        items_out=stats["accepted"],
        tokens_out=int(pc.sum(kept.column("length")).as_py() or 0) if kept.num_rows else 0,
        notes={"acceptance_rate": stats["acceptance_rate"]},
    )
    return RewriterOutput({CONFIG_NAME: data_files}, {AUDIT_NAME: audit_files}, stats, report)


def _report(
    cfg: RewriterStageConfig,
    plan: RewriterPlan,
    results: list[BatchResult],
    counts: dict[str, dict[str, Any]],
    kept: pa.Table,
    audit: pa.Table,
) -> dict[str, Any]:
    rw = cfg.rewriter
    usage: dict[str, TemplateUsage] = {}
    for r in results:
        for name, fields in r.usage.items():
            usage.setdefault(name, TemplateUsage()).merge(TemplateUsage(**fields))
    total = TemplateUsage()
    for each in usage.values():
        total.merge(each)
    requested = sum(c["requested"] for c in counts.values())
    accepted = sum(c["accepted"] for c in counts.values())
    rejected: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for c in counts.values():
        rejected.update(c["rejected"])
        failed.update(c["failed"])
    # recount from the files written, so a bookkeeping slip shows up as reconciles: false
    audit_by = Counter(
        zip(audit.column("status").to_pylist(), audit.column("reason").to_pylist(), strict=True)
    )
    files_ok = (
        kept.num_rows == accepted
        and {r: n for (s, r), n in audit_by.items() if s == "rejected"} == dict(rejected)
        and {r: n for (s, r), n in audit_by.items() if s == "failed"} == dict(failed)
    )
    configured = sum(s.samples for s in rw.strategies)
    reconciles = (
        requested == configured == accepted + sum(rejected.values()) + sum(failed.values()) and files_ok
    )
    dist = kept.column("dependency_distance").to_numpy() if kept.num_rows else np.zeros(0)
    tasks = kept.column("task").to_pylist() if kept.num_rows else []
    by_task_dist = {t: _dist_summary(dist[np.asarray([x == t for x in tasks])]) for t in sorted(set(tasks))}
    depths = (
        [e["depth"] for ev in kept.column("evidence").to_pylist() for e in ev if e["label"] == "quote"]
        if kept.num_rows
        else []
    )
    hist = np.histogram(np.asarray(depths, float), bins=10, range=(0, 1))[0].tolist() if depths else [0] * 10
    checks = [
        {
            "name": "rewriter: requested = accepted + rejected + failed",
            "ok": requested == configured == accepted + sum(rejected.values()) + sum(failed.values()),
            "detail": f"{requested} = {accepted} + {sum(rejected.values())} + {sum(failed.values())} "
            f"({configured} configured)",
        },
        {
            "name": "rewriter: files match counts",
            "ok": bool(files_ok),
            "detail": f"{kept.num_rows} samples written, {audit.num_rows} audit rows",
        },
    ]
    return {
        "step": STEP,
        "checks": checks,
        "model": rw.model,
        "endpoint_host": endpoint_host(rw.base_url),
        "context_config": plan.context_config,
        "sample_length": plan.sample_length,
        "requested": requested,
        "accepted": accepted,
        "rejected": dict(sorted(rejected.items())),
        "failed": dict(sorted(failed.items())),
        "acceptance_rate": round(accepted / requested, 4) if requested else 0.0,
        "reconciles": bool(reconciles),
        "by_task": counts,
        "skipped_inputs": plan.skipped_inputs,
        "dependency_distance": by_task_dist,
        "evidence_depth_histogram": hist,
        "usage": {k: u.as_dict() for k, u in sorted(usage.items())},
        "totals": total.as_dict(),
        "currency_note": "cost = tokens x rewriter.prices[model] per million",
        "batches": len(results),
    }


def check_rewriter(cfg: RewriterStageConfig) -> None:
    """Config problems found before any work starts: templates, chat template, targets, inputs."""
    from pipeline.synth.chat import TEMPLATES
    from pipeline.synth.rewriter.inputs import load_conversations
    from pipeline.synth.rewriter.plan import template_for
    from pipeline.synth.rewriter.templates import TemplateError

    rw = cfg.rewriter
    errors: list[str] = []
    if rw.chat_template not in TEMPLATES and not rw.chat_template.startswith(("hf:", "jinja:")):
        errors.append(
            f"rewriter.chat_template: {rw.chat_template!r} is not one of {sorted(TEMPLATES)}, "
            f"hf:<tokenizer folder or hub id> or jinja:<template>"
        )
    else:
        try:
            load_chat_template(rw.chat_template, tokenizer_for(cfg), cfg.base_dir)
        except Exception as err:
            errors.append(f"rewriter.chat_template: {err}")
    lengths = [t.length for t in cfg.packing.targets]
    if rw.context_target is not None and rw.context_target not in lengths:
        errors.append(
            f"rewriter.context_target: {rw.context_target} is not a packing target length {lengths}"
        )
    for i, st in enumerate(rw.strategies):
        try:
            t = load_template(template_for(st))
            if t.kind != st.kind:
                errors.append(
                    f"rewriter.strategies.{i}.template: {t.name!r} is for {t.kind!r}, not {st.kind!r}"
                )
        except TemplateError as err:
            errors.append(f"rewriter.strategies.{i}.template: {err}")
        if st.kind == "rephrase":
            try:
                next(
                    iter(load_conversations(st.inputs, Path(cfg.base_dir), st.max_input_chars, Counter())),
                    None,
                )
            except FileNotFoundError as err:
                errors.append(f"rewriter.strategies.{i}.inputs: {err}")
    if errors:
        raise ConfigError("invalid rewriter configuration:\n  - " + "\n  - ".join(errors))


# What this run spent (requests, cache hits, tokens, cost): it differs between a first run and a cached
# rerun of the same config, so it belongs in the run report, never in the manifest's identity.
RUN_DEPENDENT = ("usage", "totals", "currency_note")


def manifest_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The stage's statistics that only the config and inputs decide (manifest extra["rewriter"])."""
    return {k: v for k, v in stats.items() if k not in RUN_DEPENDENT}


def run_report_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """{"rewriter": what this run spent} for report.json."""
    return {"rewriter": {k: stats[k] for k in RUN_DEPENDENT if k in stats}}


def run_rewriter(cfg: RewriterStageConfig, work: WorkDir, selected: SelectResult) -> RewriterOutput:
    """The whole stage in this process, batch after batch (what pipeline.build.run_build calls)."""
    plan = make_plan(cfg, selected)
    results = [run_batch(cfg, work, b, plan.sample_length) for b in plan.batches]
    return merge(cfg, work, plan, results)


def summary_line(stats: dict[str, Any]) -> str:
    t = stats["totals"]
    return (
        f"rewriter: {stats['accepted']}/{stats['requested']} accepted ({stats['acceptance_rate']:.0%}); "
        f"rejected {json.dumps(stats['rejected'])}; failed {json.dumps(stats['failed'])}; "
        f"{t['requests']} HTTP requests, {t['cache_hits']} cache hits, "
        f"{t['prompt_tokens']}+{t['completion_tokens']} tokens, cost {t['cost']:.4f}"
    )


class RewriterStage(Stage):
    """LLM-rewritten long-context samples (`pipeline.stages.rewriter`)."""

    name = "rewriter"
    sections = ("rewriter", "tokenizer", "packing", "output")
    inputs = ("select", "write")
    unit_noun = "batches"
    config_type = RewriterStageConfig
    task_name = "rewriter-batch"
    retries = 1

    def enabled(self, cfg: BuildConfig) -> bool:
        return cfg.rewriter.enabled

    def work_dir(self, ctx: RunContext) -> Path:
        return ctx.work.rewriter_dir

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Rewriter(self, ctx, inputs)


class _Rewriter(StageWork[Any, Any]):
    def __init__(self, stage: Stage, ctx: RunContext, inputs: Inputs) -> None:
        from pipeline.synth.rewriter.plan import make_plan

        super().__init__(stage, ctx, inputs)
        self.plan = make_plan(self.cfg, inputs["select"])

    def units(self) -> list[Any]:
        return list(self.plan.batches)

    def run_unit(self, unit: Any, progress: UnitProgress | None = None) -> Any:
        return run_batch(self.cfg, self.ctx.work, unit, self.plan.sample_length)

    def merge(self, results: list[Any]) -> Any:
        return merge(self.cfg, self.ctx.work, self.plan, results)

    def report(self, merged: Any) -> StageReport:
        return merged.report

    def log_line(self, r: Any) -> str:
        acc = sum(c["accepted"] for c in r.counts.values())
        return f"rewriter batch: {acc} accepted, {r.requests_sent} HTTP requests ({r.seconds:.1f}s)"
