"""The rewriter stage: batches of contexts through the endpoint, validated, merged into one chat set.

`run_batch` is one Prefect task's work: load its contexts, build every prompt, fetch the answers
concurrently (cache first), turn each into a sample or a counted rejection or failure, and write a
part file. `merge` drops questions repeated across batches, writes `data/rewriter/` (CHAT_SCHEMA) and
`audit/rewriter_rejected/` (every sample not kept, with its raw answer), and adds up the report that
goes into manifest extra["rewriter"]. `run_rewriter` does both in-process, for `pipeline.build`.
"""

from __future__ import annotations

import asyncio
import hashlib
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
from pipeline.core.storage import is_remote, output_path
from pipeline.core.tokenizer import tokenizer_for
from pipeline.core.workdir import WorkDir
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from pipeline.synth.chat import ChatTemplate, chat_table
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
from pipeline.synth.rewriter.contexts import Context, ContextReader, Passage, document_header, head_tokens
from pipeline.synth.rewriter.parsing import ParseFailure, parse_json_answer
from pipeline.synth.rewriter.plan import Batch, RewriterPlan, SamplePlan, make_plan
from pipeline.synth.rewriter.secrets import Redactor, all_secrets, endpoint_host, resolve_api_key
from pipeline.synth.rewriter.strategies import (
    Draft,
    Rejection,
    combine_turns,
    interpret,
    passages_for,
    turn_requests,
)
from pipeline.synth.rewriter.templates import load_template
from schemas.config import BuildConfig, ConfigError
from schemas.manifest import FileEntry, StageReport
from schemas.records import CHAT_SCHEMA, REWRITER_AUDIT_SCHEMA
from schemas.stage_config import RewriterStageConfig
from schemas.synthesis import RewriterConfig

log = logging.getLogger("longloom.rewriter")

STEP = "rewriter@1"
CONFIG_NAME = "rewriter"
REPHRASE_CONFIG = "rewriter_rephrase"  # plain (ungrounded) rephrases: short chats, kept apart from long rows
AUDIT_NAME = "rewriter_rejected"
# Internal part files carry every outcome (accepted ones too) plus the key that finds repeated questions.
_PART_SCHEMA = REWRITER_AUDIT_SCHEMA.append(pa.field("question_key", pa.string()))


def _has_plain_rephrase(cfg: RewriterStageConfig) -> bool:
    """Whether the run asks for rephrases without a long context (they go to REPHRASE_CONFIG)."""
    return any(s.kind == "rephrase" and not s.grounded and s.samples for s in cfg.rewriter.strategies)


def stage_dir(work: WorkDir) -> Path:
    return work.rewriter_dir


def cache_dir(cfg: RewriterStageConfig) -> str | Path:
    """The response cache: `rewriter.cache_dir` (a folder or an fsspec URL), else under the output's work
    folder (for a URL output, this process's mirror of it, stored with it)."""
    rw = cfg.rewriter
    if rw.cache_dir:
        return rw.cache_dir if is_remote(rw.cache_dir) else Path(rw.cache_dir)
    return output_path(cfg.output.dir) / ".longloom" / "rewriter-cache"


@dataclass
class BatchResult:
    index: int
    samples_file: str  # relative to the stage folder
    parts_file: str
    counts: dict[str, dict[str, Any]]  # task -> requested / accepted / rejected{} / failed{}
    usage: dict[str, dict[str, Any]]  # template -> TemplateUsage fields
    requests_sent: int
    seconds: float
    # QA turns of several-turn samples: task -> requested / accepted / rejected{} / failed{}
    turn_counts: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    requests: list[ChatRequest]  # one, or one per QA turn (chunk_qa with turns_per_context > 1)
    ctx: Context | None
    results: list[ChatResult] = field(default_factory=list, repr=False)


async def _fetch_all(client: RewriterClient, jobs: list[_Job], desc: str, show: bool) -> None:
    todo = [(j, k) for j in jobs for k in range(len(j.requests))]
    for j in jobs:
        j.results = [None] * len(j.requests)  # type: ignore[list-item]
    with tqdm(total=len(todo), desc=desc, unit="req", disable=not show, mininterval=1.0, leave=False) as bar:

        async def one(j: _Job, k: int) -> None:
            j.results[k] = await client.complete(j.requests[k])
            bar.update(1)

        async with client:
            await asyncio.gather(*(one(j, k) for j, k in todo))


def _combined_hash(requests: list[ChatRequest]) -> str:
    """The prompt hash of a sample asked in several requests: sha256 of its requests' hashes in order."""
    if len(requests) == 1:
        return requests[0].prompt_hash
    return hashlib.sha256("\n".join(r.prompt_hash for r in requests).encode()).hexdigest()


@dataclass
class _Turn:
    """One QA turn of a several-turn sample: its answer, and what became of it."""

    index: int
    request: ChatRequest
    result: ChatResult
    draft: Draft | None = None
    status: str = "accepted"  # accepted | turn_rejected | turn_failed
    reason: str = "accepted"
    detail: str = ""


def _build_turns(
    j: _Job, chat: ChatTemplate, rw: RewriterConfig, sample_length: int, need: int, redact: Redactor
) -> tuple[list[_Turn], Draft | None, dict[str, Any] | None, tuple[str, str, str] | None]:
    """Verify every turn alone (parse, interpret), then together in the sized context (evidence found,
    outside the tail): a turn that fails is dropped with its reason and the rest assembled again.

    Returns the turns, the draft and record kept (None if the sample is not kept) and, if it is not, the
    sample's (status, reason, detail).
    """
    turns = [_Turn(k, req, res) for k, (req, res) in enumerate(zip(j.requests, j.results, strict=True))]
    seen: set[str] = set()
    for t in turns:
        res = t.result
        if not res.ok:
            t.status, t.reason, t.detail = (
                "turn_failed",
                res.error_reason or "unknown",
                res.error_detail or "",
            )
            continue
        try:
            t.draft = interpret(j.plan, parse_json_answer(res.content, res.finish_reason), rw, 1)
        except (ParseFailure, Rejection) as err:
            t.status, t.reason, t.detail = "turn_rejected", err.reason, err.detail
            continue
        if t.draft.dedup_key in seen:  # the same question twice in one conversation
            t.status, t.reason, t.detail = "turn_rejected", "duplicate_question", "asked by an earlier turn"
        seen.add(t.draft.dedup_key)
    outcome: tuple[str, str, str] | None = None
    draft: Draft | None = None
    rec: dict[str, Any] | None = None
    while True:
        ok = [t for t in turns if t.status == "accepted"]
        if len(ok) < need:
            if not any(t.result.ok for t in turns):
                first = turns[0]
                outcome = ("failed", first.reason, f"no turn was answered: {first.detail}")
            else:
                why = "; ".join(f"turn {t.index} {t.reason}" for t in turns if t.status != "accepted")
                outcome = (
                    "rejected",
                    "too_few_turns",
                    f"{len(ok)} of {len(turns)} turns verified, {need} needed ({why})",
                )
            break
        draft = combine_turns([(t.index, t.draft) for t in ok if t.draft is not None])
        try:
            rec = build_record(j.plan, draft, j.ctx, j.passages, chat, rw, sample_length)
            break
        except Rejection as err:
            bad = next((t for t in ok if t.index == err.group), None)
            if bad is None:
                outcome = ("rejected", err.reason, err.detail)
                break
            bad.status, bad.reason, bad.detail = "turn_rejected", err.reason, err.detail
        except SampleFailure as err:
            outcome = ("failed", err.reason, err.detail)
            break
    if outcome is not None:
        for t in turns:  # turns that passed alone but whose sample is not kept
            if t.status == "accepted":
                t.status, t.reason, t.detail = (
                    "turn_rejected",
                    "sample_not_kept",
                    f"the sample was {outcome[1]}",
                )
        return turns, None, None, (outcome[0], outcome[1], redact(outcome[2]))
    return turns, draft, rec, None


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
    documents = rw.context_format == "documents"
    reader = ContextReader(work.out, tok, document_header(rw.document_header) if documents else None)
    contexts: dict[str, Context] = {}
    jobs: list[_Job] = []
    # room for the sizing margin of pipeline.synth.chat (and for a start up to head_tokens() in)
    min_tokens = sample_length + 512 + (head_tokens(sample_length) if documents else 0)
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
        jobs.append(_Job(p, passages, turn_requests(p, strategy, template, passages, rw), ctx))

    client = RewriterClient(cfg.rewriter, api_key, cache, budget, redact)
    asyncio.run(_fetch_all(client, jobs, f"rewriter batch {batch.index}", rw.progress))

    lineage = run_lineage(cfg, work, tok, [], "rewriter")
    host = endpoint_host(rw.base_url)
    counts: dict[str, dict[str, Any]] = {}
    turn_counts: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j in jobs:
        p = j.plan
        strategy = rw.strategies[p.strategy]
        several = strategy.turns_per_context > 1
        req, res = j.requests[0], j.results[0]
        _bump(counts, p.kind, "requested")
        row = {
            "sample_id": p.sample_id,
            "task": p.kind,
            "template": req.template,
            "template_version": req.template_version,
            "prompt_hash": _combined_hash(j.requests),
            "seed": p.seed,
            "context_row": p.contexts[0].row_id if p.contexts else None,
            # what it took to get the recorded answer (the cached entry keeps it), so a rerun served from
            # the cache writes the same row; a failure is never cached and is asked again every run
            "attempts": sum(r.answer_attempts if r.ok else r.attempts for r in j.results),
            "raw_response": redact(res.content) if res.content is not None else None,
            "question_key": None,
        }
        turn_rows: list[dict[str, Any]] = []
        if several:
            # min_turns is validated to be at most turns_per_context; unset, one verified turn suffices
            turns, kept_draft, built, outcome = _build_turns(
                j, chat, rw, sample_length, strategy.min_turns or 1, redact
            )
            row["raw_response"] = json.dumps(
                [redact(t.result.content) if t.result.content is not None else None for t in turns],
                ensure_ascii=False,
            )
            for t in turns:
                _bump(turn_counts, p.kind, "requested")
                if t.status == "accepted":
                    _bump(turn_counts, p.kind, "accepted")
                    continue
                _bump(turn_counts, p.kind, "failed" if t.status == "turn_failed" else "rejected", t.reason)
                r = t.result
                turn_rows.append(
                    {
                        **row,
                        "sample_id": f"{p.sample_id}/turn-{t.index}",
                        "prompt_hash": t.request.prompt_hash,
                        "attempts": r.answer_attempts if r.ok else r.attempts,
                        "raw_response": redact(r.content) if r.content is not None else None,
                        "status": t.status,
                        "reason": t.reason,
                        "detail": redact(t.detail),
                    }
                )
            if outcome is not None:
                status, reason, detail = outcome
                _bump(counts, p.kind, status, reason)
                parts.append({**row, "status": status, "reason": reason, "detail": detail})
                parts += turn_rows
                continue
            assert kept_draft is not None and built is not None
            draft, rec = kept_draft, built
        else:
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
                parts.append(
                    {**row, "status": "rejected", "reason": err.reason, "detail": redact(err.detail)}
                )
                continue
            except SampleFailure as err:
                _bump(counts, p.kind, "failed", err.reason)
                parts.append({**row, "status": "failed", "reason": err.reason, "detail": redact(err.detail)})
                continue
        passages_info = rec.pop("_passages")
        context_rows = rec.pop("_context_rows")
        cut = rec.pop("_cut")
        if several:  # the passage of each kept turn, in the order of the conversation
            passages_info = [passages_info[g] for g in draft.groups]
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
                    # documents format: where the context starts and how it ends
                    **({"context_cut": cut} if cut is not None else {}),
                    # the answer's own facts only: whether it came from the cache and how many
                    # attempts this run made change from run to run, and go to the run's report
                    "response": {
                        "finish_reason": res.finish_reason,
                        "prompt_tokens": res.prompt_tokens,
                        "completion_tokens": res.completion_tokens,
                        "response_model": res.response_model,
                        "json_mode": res.json_mode_used,
                    }
                    if not several
                    else [
                        {
                            "finish_reason": r.finish_reason,
                            "prompt_tokens": r.prompt_tokens,
                            "completion_tokens": r.completion_tokens,
                            "response_model": r.response_model,
                            "json_mode": r.json_mode_used,
                        }
                        for r in (j.results[g] for g in draft.groups)
                    ],
                },
            ),
            model={
                "model": rw.model,
                "endpoint_host": host,
                "template": req.template,
                "template_version": req.template_version,
                "prompt_hash": row["prompt_hash"],
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
        parts += turn_rows

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
        batch.index,
        samples_rel,
        parts_rel,
        counts,
        usage,
        budget.used,
        round(time.perf_counter() - t0, 3),
        turn_counts,
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
    # a turn's audit row ("<sample>/turn-k") follows its sample's row (the sort is stable)
    rank = np.array([order[s.split("/", 1)[0]] for s in table.column("sample_id").to_pylist()], np.int64)
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
    turn_counts: dict[str, dict[str, Any]] = {}
    for r in results:
        for task, c in r.turn_counts.items():
            mine = turn_counts.setdefault(task, _empty_counts())
            mine["requested"] += c["requested"]
            mine["accepted"] += c["accepted"]
            for st in ("rejected", "failed"):
                for k, v in c[st].items():
                    mine[st][k] = mine[st].get(k, 0) + v

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
    if turn_counts and dup_of:
        # the verified turns of a sample dropped as a repeat leave the output with it
        n_questions = dict(
            zip(
                samples.column("sample_id").to_pylist(),
                (len(q) for q in samples.column("questions").to_pylist()),
                strict=True,
            )
        )
        for sid, task in zip(ids, tasks, strict=True):
            if sid in dup_of and task in turn_counts:
                k = n_questions.get(sid, 0)
                turn_counts[task]["accepted"] -= k
                turn_counts[task]["rejected"]["duplicate_sample"] = (
                    turn_counts[task]["rejected"].get("duplicate_sample", 0) + k
                )
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
    configs: dict[str, list[FileEntry]] = {}
    if _has_plain_rephrase(cfg):
        # plain rephrases are short chats with no long context: their own config, so a trainer that
        # wants long-context rows does not get a few hundred tokens among the sample_length rows
        plain = pc.and_(pc.equal(kept.column("task"), "rephrase"), pc.equal(kept.column("context_tokens"), 0))
        short = kept.filter(plain)
        longest = int(pc.max(short.column("length")).as_py() or 1) if short.num_rows else 1
        configs[CONFIG_NAME] = _write_sharded(
            out,
            f"data/{CONFIG_NAME}",
            "train",
            kept.filter(pc.invert(plain)),
            CHAT_SCHEMA,
            rows_per_file,
            level,
        )
        configs[REPHRASE_CONFIG] = _write_sharded(
            out,
            f"data/{REPHRASE_CONFIG}",
            "train",
            short,
            CHAT_SCHEMA,
            max(1, cfg.output.shard_tokens // longest),
            level,
        )
    else:
        configs[CONFIG_NAME] = _write_sharded(
            out, f"data/{CONFIG_NAME}", "train", kept, CHAT_SCHEMA, rows_per_file, level
        )
    audit_files = _write_sharded(
        out, f"audit/{AUDIT_NAME}", AUDIT_NAME, audit, REWRITER_AUDIT_SCHEMA, 1_000_000, level
    )

    stats = _report(cfg, plan, results, counts, kept, audit)
    if turn_counts:
        stats.update(_turn_report(turn_counts, kept, audit))
        stats["checks"].append(
            {
                "name": "rewriter: QA turns requested = accepted + rejected + failed",
                "ok": stats["qa_turns"]["reconciles"],
                "detail": json.dumps({k: v for k, v in stats["qa_turns"].items() if k != "by_task"}),
            }
        )
        stats["reconciles"] = bool(stats["reconciles"] and stats["qa_turns"]["reconciles"])
    write_json_atomic(sdir / "report.json", stats)
    report = StageReport(
        seconds=round(sum(r.seconds for r in results) + time.perf_counter() - t0, 3),
        items_in=stats["requested"],
        items_out=stats["accepted"],
        tokens_out=int(pc.sum(kept.column("length")).as_py() or 0) if kept.num_rows else 0,
        notes={"acceptance_rate": stats["acceptance_rate"]},
    )
    return RewriterOutput(configs, {AUDIT_NAME: audit_files}, stats, report)


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
    # documents format: where contexts start and how they end, recounted from the rows' params (a
    # word end is the fallback where no clean end sized the sample exactly)
    cuts: Counter[str] = Counter()
    for params in kept.column("params").to_pylist() if kept.num_rows else []:
        cut = json.loads(params).get("context_cut")
        if cut:
            cuts[f"{cut['start']}->{cut['end']}"] += 1
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
        **(
            {
                "context_cuts": dict(sorted(cuts.items())),
                "context_word_ends": sum(n for k, n in cuts.items() if k.endswith("->word")),
            }
            if cuts
            else {}
        ),
        "usage": {k: u.as_dict() for k, u in sorted(usage.items())},
        "totals": total.as_dict(),
        "currency_note": "cost = tokens x rewriter.prices[model] per million",
        "batches": len(results),
    }


def _turn_report(turn_counts: dict[str, dict[str, Any]], kept: pa.Table, audit: pa.Table) -> dict[str, Any]:
    """QA turns of several-turn samples: counts by outcome, recounted from the files written (turns in
    the kept samples' `questions`, turn rows in the audit), and turns per kept sample."""
    requested = sum(c["requested"] for c in turn_counts.values())
    accepted = sum(c["accepted"] for c in turn_counts.values())
    rejected: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for c in turn_counts.values():
        rejected.update(c["rejected"])
        failed.update(c["failed"])
    several = {t for t in turn_counts}
    per_sample = (
        [
            len(q)
            for q, t in zip(
                kept.column("questions").to_pylist(), kept.column("task").to_pylist(), strict=True
            )
            if t in several
        ]
        if kept.num_rows
        else []
    )
    audit_by = Counter(
        (st, r)
        for st, r in zip(audit.column("status").to_pylist(), audit.column("reason").to_pylist(), strict=True)
        if st.startswith("turn_")
    )
    # turns that leave with a sample dropped as a repeat are audited by that sample's row
    in_rows = {r: n for r, n in rejected.items() if r != "duplicate_sample"}
    files_ok = (
        sum(per_sample) == accepted
        and {r: n for (st, r), n in audit_by.items() if st == "turn_failed"} == dict(failed)
        and {r: n for (st, r), n in audit_by.items() if st == "turn_rejected"} == in_rows
    )
    return {
        "qa_turns": {
            "requested": requested,
            "accepted": accepted,
            "rejected": dict(sorted(rejected.items())),
            "failed": dict(sorted(failed.items())),
            "per_sample": _dist_summary(np.asarray(per_sample, float)),
            "reconciles": bool(
                requested == accepted + sum(rejected.values()) + sum(failed.values()) and files_ok
            ),
            "by_task": turn_counts,
        }
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
