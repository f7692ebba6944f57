"""Planning the rewriter's work: every requested sample gets an id, a seed, its context rows and
passage depths up front, and samples are grouped into batches of contexts (one Prefect task each).

Planning is deterministic (run seed + sample id), so a rerun asks the same prompts and finds them in
the response cache. Samples that cannot be planned (no context rows, no input conversations left)
are recorded as failed, so requested = accepted + rejected + failed holds from the start.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.results import SelectResult, TargetPlan
from pipeline.synth.rewriter.contexts import ContextRef, context_refs
from pipeline.synth.rewriter.inputs import Conversation, load_conversations
from schemas.config import ConfigError
from schemas.stage_config import RewriterStageConfig
from schemas.synthesis import RewriterConfig, RewriterStrategy

DEFAULT_TEMPLATE = {"chunk_qa": "chunk_qa", "multi_hop": "multi_hop", "session_state": "session_state"}
MAX_EXTRA_ROWS = 3  # rows after the first that a context may borrow when one row is too short


@dataclass(frozen=True)
class SamplePlan:
    sample_id: str
    strategy: int  # index into rewriter.strategies
    kind: str
    template: str
    seed: int
    contexts: tuple[ContextRef, ...]  # the context row, then rows it may borrow (empty: no context)
    depths: tuple[float, ...]  # passage depths, fractions of the usable context
    conversation: Conversation | None = None

    @property
    def grounded(self) -> bool:
        return bool(self.contexts)


@dataclass
class Batch:
    index: int
    plans: list[SamplePlan]
    budget: int | None  # this batch's share of the run's request budget


@dataclass
class RewriterPlan:
    batches: list[Batch]
    unplanned: list[dict[str, str]]  # failed before any request: sample_id, task, reason, detail
    requested: dict[str, int]  # per task
    skipped_inputs: dict[str, int] = field(default_factory=dict)
    context_config: str = ""
    sample_length: int = 0

    @property
    def n_planned(self) -> int:
        return sum(len(b.plans) for b in self.batches)


def template_for(s: RewriterStrategy) -> str:
    if s.template:
        return s.template
    if s.kind == "rephrase":
        return "rephrase_grounded" if s.grounded else "rephrase"
    return DEFAULT_TEMPLATE[s.kind]


def sample_seed(run_seed: int, sample_id: str) -> int:
    return (
        int.from_bytes(hashlib.sha256(f"{run_seed}:{sample_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF
    )


def context_target(cfg: RewriterStageConfig, selected: SelectResult) -> TargetPlan:
    """The packing target whose rows are the contexts (rewriter.context_target, or the smallest)."""
    rw = cfg.rewriter
    want = rw.context_target or min(t.length for t in cfg.packing.targets)
    for t in selected.targets:
        if t.target_length == want:
            return t
    raise ConfigError(
        f"rewriter.context_target: {want} is not a packing target length; "
        f"choose one of {[t.target_length for t in selected.targets]}"
    )


def _depths(
    rw: RewriterConfig, s: RewriterStrategy, k: int, n: int, rng: np.random.Generator
) -> tuple[float, ...]:
    # multi_hop: passages for one question; chunk_qa with turns_per_context: one passage per QA turn
    hops = s.hops if s.kind == "multi_hop" else s.turns_per_context if s.kind == "chunk_qa" else 1
    if rw.chunk_depths:
        return tuple(rw.chunk_depths[(k * hops + j) % len(rw.chunk_depths)] for j in range(hops))
    head = 1.0 - rw.reject_tail_fraction  # passages come from before the tail that would be rejected
    if hops == 1:
        # stratified over the strategy's samples, so depths cover the context evenly
        return (head * (k + rng.uniform(0.05, 0.95)) / max(1, n),)
    # one passage per stratum, kept off the strata edges so neighbours stay far apart
    return tuple(head * (j + rng.uniform(0.15, 0.85)) / hops for j in range(hops))


def make_plan(cfg: RewriterStageConfig, selected: SelectResult) -> RewriterPlan:
    rw = cfg.rewriter
    target = context_target(cfg, selected)
    refs = context_refs(target)
    sample_length = rw.sample_length or target.target_length
    plans: list[SamplePlan] = []
    unplanned: list[dict[str, str]] = []
    requested: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    grounded_k = 0
    for si, s in enumerate(rw.strategies):
        requested[s.kind] += s.samples
        convs: list[Conversation] = []
        if s.kind == "rephrase":
            it = load_conversations(s.inputs, Path(cfg.base_dir), s.max_input_chars, skipped)
            convs = [c for _, c in zip(range(s.samples), it, strict=False)]
        grounded = s.kind != "rephrase" or s.grounded
        for k in range(s.samples):
            sid = f"{s.kind}-{si}-{k:06d}"
            seed = sample_seed(cfg.run.seed, sid)
            if s.kind == "rephrase" and k >= len(convs):
                unplanned.append(
                    {
                        "sample_id": sid,
                        "task": s.kind,
                        "reason": "no_input",
                        "detail": "input conversations used up",
                    }
                )
                continue
            if grounded and not refs:
                unplanned.append(
                    {
                        "sample_id": sid,
                        "task": s.kind,
                        "reason": "no_context",
                        "detail": f"{target.config_name} has no rows",
                    }
                )
                continue
            ctx: tuple[ContextRef, ...] = ()
            if grounded:
                first = grounded_k % len(refs)
                ctx = tuple(refs[(first + j) % len(refs)] for j in range(min(len(refs), 1 + MAX_EXTRA_ROWS)))
                grounded_k += 1
            rng = np.random.default_rng(seed)
            plans.append(
                SamplePlan(
                    sample_id=sid,
                    strategy=si,
                    kind=s.kind,
                    template=template_for(s),
                    seed=seed,
                    contexts=ctx,
                    depths=_depths(rw, s, k, s.samples, rng) if grounded else (),
                    conversation=convs[k] if s.kind == "rephrase" else None,
                )
            )
    batches = _batches(plans, rw.contexts_per_task)
    _share_budget(batches, rw.request_budget)
    return RewriterPlan(batches, unplanned, dict(requested), dict(skipped), target.config_name, sample_length)


def _batches(plans: list[SamplePlan], per_task: int) -> list[Batch]:
    """Grounded samples grouped by context row, `per_task` rows per batch; the others `per_task` at a time."""
    by_row: dict[str, list[SamplePlan]] = {}
    loose: list[SamplePlan] = []
    for p in plans:
        if p.grounded:
            by_row.setdefault(p.contexts[0].row_id, []).append(p)
        else:
            loose.append(p)
    groups: list[list[SamplePlan]] = []
    rows = sorted(by_row)
    for i in range(0, len(rows), per_task):
        groups.append([p for r in rows[i : i + per_task] for p in by_row[r]])
    for i in range(0, len(loose), per_task):
        groups.append(loose[i : i + per_task])
    return [Batch(i, g, None) for i, g in enumerate(groups)]


def _share_budget(batches: list[Batch], budget: int | None) -> None:
    """Each batch gets a share of the run's request budget in proportion to its samples, so the run
    never exceeds the budget whatever runs where, with no coordination between workers."""
    if budget is None:
        return
    total = sum(len(b.plans) for b in batches)
    if not total:
        return
    shares = [budget * len(b.plans) // total for b in batches]
    for i in range(budget - sum(shares)):
        shares[i % len(shares)] += 1
    for b, share in zip(batches, shares, strict=True):
        b.budget = share
