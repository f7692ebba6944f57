"""Stage 2, over the whole corpus at once but on small columns only: choose documents and lay out rows.

Reads (doc_id, content_hash, n_tokens) of every tokenized document, never the tokens, then:
exact dedup -> optional semantic pruning -> per-source token budgets -> routing to target lengths
-> one packing layout per target. Every dropped document gets a `filtered` row with its reason.
The layouts say which token span of which document goes where; stage 3 fills rows from them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.faults import crash_point
from pipeline.core.packing import Layout, pack_best_fit, pack_greedy
from pipeline.core.parquet_io import ParquetSink, sha256_file, trim_heap, write_json_atomic
from pipeline.core.progress import UnitProgress
from pipeline.core.results import PrepareResult, SelectResult, TargetPlan, inputs_key
from pipeline.core.results import load_verified_selection as _load_verified
from pipeline.core.workdir import WorkDir
from pipeline.corpus.index import DocIndex, Drop, Selector, config_name, load_doc_index
from pipeline.corpus.partition import (
    ROW_GROUP,
    PartitionResult,
    check_partitioned,
    dedup_partition,
    select_partitioned,
)
from pipeline.output.report import select_counts
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from schemas.config import ConfigError
from schemas.manifest import StageReport
from schemas.records import FILTERED_SCHEMA, LAYOUT_SCHEMA
from schemas.stage_config import SelectConfig

SELECT_STEP = "select@1"


def _route(
    cfg: SelectConfig, idx: DocIndex, alive: np.ndarray, priority: np.ndarray | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Send each document to one target length; returns positions per target, and the unrouted."""
    targets = cfg.packing.targets
    if len(targets) == 1 and targets[0].token_budget is None:
        return [alive], np.zeros(0, np.int64)
    if priority is not None:
        return _route_longest_first(cfg, idx, alive, priority)
    # plain floats: a per-document loop over a handful of targets is cheaper without numpy calls
    assigned = [0.0] * len(targets)
    weights = [float(t.weight) for t in targets]
    budgets = [float(t.token_budget) if t.token_budget is not None else np.inf for t in targets]
    picks: list[int] = []
    for n in idx.n_tokens[alive].tolist():
        # the open target furthest below its share gets the next document (first one on ties)
        best, best_score = -1, np.inf
        for t in range(len(targets)):
            if assigned[t] < budgets[t]:
                score = assigned[t] / weights[t]
                if score < best_score:
                    best, best_score = t, score
        if best < 0:
            break
        picks.append(best)
        assigned[best] += n
    choice = np.full(len(alive), -1, np.int64)
    choice[: len(picks)] = picks
    per_target = [alive[choice == t] for t in range(len(targets))]
    return per_target, alive[choice < 0]


def _route_longest_first(
    cfg: SelectConfig, idx: DocIndex, alive: np.ndarray, priority: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """Documents by descending `priority` fill the targets from the longest down (a curriculum: the
    highest long-dependency scores go to the longest rows). Each target takes documents until it holds
    its weight's share of the tokens (capped by its token_budget), the document that crosses the line
    included; the shortest target takes the rest while its budget allows. Within a target, documents
    keep canonical order, so packing sees them as it would otherwise.
    """
    targets = cfg.packing.targets
    total = float(idx.n_tokens[alive].sum())
    weights = np.array([t.weight for t in targets], np.float64)
    by_length = sorted(range(len(targets)), key=lambda t: -targets[t].length)
    # highest priority first; ties in canonical order
    order = alive[np.lexsort((alive, -priority[alive]))]
    ntok = idx.n_tokens[order]
    choice = np.full(len(order), -1, np.int64)
    i = 0
    for rank, t in enumerate(by_length):
        limit = targets[t].token_budget
        budget = float(limit) if limit is not None else np.inf
        share = np.inf if rank == len(by_length) - 1 else total * weights[t] / weights.sum()
        cap = min(share, budget)
        held = 0.0
        while i < len(order) and held < cap:
            if held + ntok[i] > budget:
                break  # the budget is a hard limit; the share is not
            choice[i] = t
            held += float(ntok[i])
            i += 1
    per_target = [np.sort(order[choice == t]) for t in range(len(targets))]
    return per_target, np.sort(order[choice < 0])


# `packing.strategy: similarity`'s document order (the semantic package's `similarity_order`), handed
# in by the stage list so that selection never imports the package that builds on its index.
SimilarityOrder = Callable[..., tuple[np.ndarray, np.ndarray | None]]
# A routing key per document of the index (higher first to the longest target), handed in the same way
# (`long_dependency.route: longest_first`: the long-dependency scores, pipeline.longdep.use).
RoutePriority = Callable[[SelectConfig, WorkDir, DocIndex, list[PrepareResult]], np.ndarray]


def _order(
    cfg: SelectConfig,
    work: WorkDir,
    idx: DocIndex,
    members: np.ndarray,
    target_length: int,
    similarity_order: SimilarityOrder | None,
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The order documents are packed in, neighbour similarities if known, and the step name."""
    strategy = cfg.packing.strategy
    if strategy == "similarity":
        if similarity_order is None:
            raise ConfigError("packing.strategy: similarity needs the semantic order; none was given")
        order, sims = similarity_order(cfg, idx, members, target_length=target_length, work=work)
        return members[order], sims, "similarity@2"  # @2: greedy layout with the cutting rule
    if cfg.packing.doc_order == "shuffle":
        rng = np.random.default_rng(cfg.run.seed)
        return members[rng.permutation(len(members))], None, ""
    return members, None, ""


def _layout(cfg: SelectConfig, footprints: np.ndarray, L: int) -> Layout:
    p = cfg.packing
    if p.strategy == "best_fit":
        return pack_best_fit(
            footprints, L, p.last_row, p.open_bins, p.lookahead_docs, min_piece=p.min_piece_tokens
        )
    return pack_greedy(footprints, L, p.last_row, min_piece=p.min_piece_tokens)


def select_and_layout(
    cfg: SelectConfig,
    work: WorkDir,
    prepared: list[PrepareResult],
    selectors: Sequence[Selector],
    similarity_order: SimilarityOrder | None = None,
    route_priority: RoutePriority | None = None,
) -> SelectResult:
    """Run stage 2, or reuse its verified result from an earlier run with the same config.

    `selectors` run in order on what the previous ones kept (the stage list gives exact dedup, the
    configured semantic selectors, then source budgets: `pipeline.stages.plan.corpus_selectors`).
    """
    record = work.select_dir / "select.json"
    key = inputs_key(prepared)
    previous = _load_verified(work, record, key)
    if previous is not None:
        return previous
    started = time.perf_counter()
    sources = [s.name for s in cfg.sources]
    idx = load_doc_index(work, prepared, sources)
    alive = np.arange(len(idx), dtype=np.int64)
    drops: list[Drop] = []
    steps: list[str] = []
    for selector in selectors:
        drop = selector(cfg, work, idx, alive, prepared)
        if drop is None:
            continue
        steps.append(drop.step)
        drops.append(drop)
        alive = np.setdiff1d(alive, drop.index, assume_unique=True)

    priority = route_priority(cfg, work, idx, prepared) if route_priority is not None else None
    per_target, unrouted = _route(cfg, idx, alive, priority)
    if len(unrouted):
        drops.append(
            Drop(
                "route@1",
                "target_budgets_full",
                unrouted,
                ["every target's token_budget was reached"] * len(unrouted),
            )
        )

    plans: list[TargetPlan] = []
    packed = np.zeros(len(sources), np.int64)
    tail = np.zeros(len(sources), np.int64)
    for t_cfg, members in zip(cfg.packing.targets, per_target, strict=True):
        L = t_cfg.length
        ordered, sims, order_step = _order(cfg, work, idx, members, L, similarity_order)
        ntok = idx.n_tokens[ordered]
        lay = _layout(cfg, ntok + 1, L)  # +1: the separator after each document
        strategy = order_step or lay.strategy
        # documents entirely inside a dropped final row are filtered; partly dropped ones stay kept
        if len(lay.dropped_item):
            gone = np.setdiff1d(np.unique(lay.dropped_item), np.unique(lay.item))
            if len(gone):
                drops.append(
                    Drop(
                        "last_row@1",
                        "last_row_dropped",
                        ordered[gone],
                        [f"in the final partial row of length {L}; packing.last_row=drop"] * len(gone),
                    )
                )
            # tokens lost from documents that are still partly in the rows (the rest were filtered)
            partly = np.isin(lay.dropped_item, lay.item)
            d_item = lay.dropped_item[partly]
            d_tok = np.minimum(lay.dropped_end[partly], ntok[d_item]) - np.minimum(
                lay.dropped_start[partly], ntok[d_item]
            )
            np.add.at(tail, idx.source[ordered[d_item]], d_tok)
        c_tok = np.minimum(lay.end, ntok[lay.item]) - np.minimum(lay.start, ntok[lay.item])
        np.add.at(packed, idx.source[ordered[lay.item]], c_tok)
        plans.append(_write_layout(cfg, work, idx, ordered, sims, lay, L, strategy, ntok))
        steps.append(strategy)
        crash_point("layout")

    filtered_file, filtered_sha, by_reason, by_reason_tokens = _write_drops(work, idx, drops, prepared)
    result = SelectResult(
        targets=plans,
        filtered=by_reason,
        filtered_tokens=by_reason_tokens,
        packed_tokens={s: int(packed[i]) for i, s in enumerate(sources)},
        dropped_tail_tokens={s: int(tail[i]) for i, s in enumerate(sources)},
        filtered_file=filtered_file,
        filtered_sha256=filtered_sha,
        steps=steps,
        seconds=round(time.perf_counter() - started, 3),
        inputs_key=key,
    )
    write_json_atomic(record, result.to_json())
    trim_heap()
    return result


def _write_layout(
    cfg: SelectConfig,
    work: WorkDir,
    idx: DocIndex,
    ordered: np.ndarray,
    sims: np.ndarray | None,
    lay: Layout,
    L: int,
    strategy: str,
    ntok: np.ndarray,
) -> TargetPlan:
    # part = rank of a segment among its document's segments, by position in the document
    order = np.lexsort((lay.start, lay.item))
    part = np.zeros(len(lay.item), np.int32)
    if len(order):
        it_sorted = lay.item[order]
        first = np.r_[True, it_sorted[1:] != it_sorted[:-1]]
        group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
        part[order] = (np.arange(len(order)) - group_start).astype(np.int32)
    doc = ordered[lay.item]
    neighbor = np.full(len(lay.item), np.nan, np.float32)
    if sims is not None:
        neighbor = sims[lay.item].astype(np.float32)
    table = pa.table(
        {
            "shard": pa.array(idx.shard[doc]),
            "doc_row": pa.array(idx.row[doc]),
            "start": pa.array(lay.start),
            "end": pa.array(lay.end),
            "row": pa.array(lay.row),
            "row_start": pa.array(lay.row_start),
            "part": pa.array(part),
            "neighbor_similarity": pa.array(neighbor, pa.float32(), mask=np.isnan(neighbor)),
        },
        schema=LAYOUT_SCHEMA,
    )
    name = config_name(L)
    rel = f"layout-{name}.parquet"
    with ParquetSink(work.select_dir / rel, LAYOUT_SCHEMA) as sink:
        _write_chunked(sink, table)
    split = lay.split_items()
    rps = max(1, cfg.output.shard_tokens // L)
    return TargetPlan(
        target_length=L,
        config_name=name,
        strategy=strategy,
        n_rows=lay.n_rows,
        rows_per_shard=rps,
        n_shards=-(-lay.n_rows // rps),
        last_row_pad=int(lay.n_pad[-1]) if lay.n_rows else 0,
        layout_file=rel,
        layout_sha256=sha256_file(work.select_dir / rel),
        documents=len(np.unique(lay.item)),
        split_documents=len(split),
        needless_splits=int((ntok[split] + 1 <= L).sum()),
        content_tokens=int(
            (np.minimum(lay.end, ntok[lay.item]) - np.minimum(lay.start, ntok[lay.item])).sum()
        ),
        dropped_tail_tokens=int(
            (
                np.minimum(lay.dropped_end, ntok[lay.dropped_item])
                - np.minimum(lay.dropped_start, ntok[lay.dropped_item])
            ).sum()
        ),
    )


def _write_chunked(sink: ParquetSink, table: pa.Table) -> None:
    """One row group per ROW_GROUP rows, as the partitioned merge writes (byte-identical files)."""
    for a in range(0, table.num_rows, ROW_GROUP):
        sink.write(table.slice(a, ROW_GROUP))


def _write_drops(
    work: WorkDir, idx: DocIndex, drops: list[Drop], prepared: list[PrepareResult]
) -> tuple[str, str, dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Write the corpus-level `filtered` rows; the lineage columns come from the documents files."""
    by_reason: dict[str, dict[str, int]] = {s: {} for s in idx.sources}
    by_tokens: dict[str, dict[str, int]] = {s: {} for s in idx.sources}
    rel = "filtered-select.parquet"
    with ParquetSink(work.select_dir / rel, FILTERED_SCHEMA) as sink:
        for d in drops:
            if len(d.index) == 0:
                continue
            src = idx.source[d.index]
            for s_i in np.unique(src):
                name = idx.sources[int(s_i)]
                mask = src == s_i
                by_reason[name][d.reason] = by_reason[name].get(d.reason, 0) + int(mask.sum())
                by_tokens[name][d.reason] = by_tokens[name].get(d.reason, 0) + int(
                    idx.n_tokens[d.index[mask]].sum()
                )
            _write_chunked(sink, _drop_table(work, idx, d, prepared))
    return rel, sha256_file(work.select_dir / rel), by_reason, by_tokens


def _drop_table(work: WorkDir, idx: DocIndex, d: Drop, prepared: list[PrepareResult]) -> pa.Table:
    n = len(d.index)
    # uri and record live in the documents files; fetch them per shard, in one read each
    uris: list[str] = [""] * n
    records = np.zeros(n, np.int64)
    sources: list[str] = [idx.sources[int(s)] for s in idx.source[d.index]]
    shards = idx.shard[d.index]
    for s in np.unique(shards):
        where = np.flatnonzero(shards == s)
        path = work.prepare_dir / prepared[int(s)].files["documents"]
        t = pq.read_table(path, columns=["uri", "record"]).take(pa.array(idx.row[d.index[where]]))
        for j, u, r in zip(where, t.column("uri").to_pylist(), t.column("record").to_pylist(), strict=True):
            uris[j], records[j] = u, r
    return pa.table(
        {
            "source": pa.array(sources, pa.string()),
            "uri": pa.array(uris, pa.string()),
            "record": pa.array(records),
            "doc_id": pa.array([idx.doc_id[i] for i in d.index], pa.string()),
            "content_hash": pa.array([h.decode() for h in idx.content_hash[d.index]], pa.string()),
            "n_tokens": pa.array(idx.n_tokens[d.index]),
            "step": pa.array([d.step] * n, pa.string()),
            "reason": pa.array([d.reason] * n, pa.string()),
            "detail": pa.array(d.detail, pa.string()),
            "duplicate_of": pa.array(
                d.duplicate_of if d.duplicate_of is not None else [None] * n, pa.string()
            ),
        },
        schema=FILTERED_SCHEMA,
    )


# What the stage list hands the select stage for a run's config: its corpus selectors, in order, and
# the document order of `packing.strategy: similarity` (None for the other strategies).
SelectorsFor = Callable[[SelectConfig], Sequence[Selector]]
OrderFor = Callable[[SelectConfig], SimilarityOrder | None]
PriorityFor = Callable[[SelectConfig], RoutePriority | None]


class SelectStage(Stage):
    """Choose documents and lay out rows over the whole corpus (`select_and_layout`).

    The selectors (exact dedup, the semantic ones, source budgets) and the similarity order are handed
    in by the stage list (`pipeline.stages.plan`), so this module never imports the semantic package.
    """

    name = "select"
    # tokenizer: embeddings missing or stale since the embed stage are made again here
    sections = ("sources", "tokenizer", "filters", "diversity", "long_dependency", "packing", "output")
    # scatter: the partition files its partition units read (the scatter stage runs only when P > 1);
    # semantic_prune: SemDeDup/D4 drops of a partitioned run (pipeline.stages.semantic_prune)
    inputs = ("prepare", "scatter", "embed", "long_dependency", "semantic_prune")
    unit_noun = "step"
    config_type = SelectConfig
    task_name = "select-and-layout"
    retries = 1

    def __init__(self, selectors: SelectorsFor, order: OrderFor, priority: PriorityFor) -> None:
        self.selectors = selectors
        self.order = order
        self.priority = priority

    def work_dir(self, ctx: RunContext) -> Path:
        return ctx.work.select_dir

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Select(self, ctx, inputs)


class _Select(StageWork[int | None, Any]):
    """One unit over the whole corpus, or (`run.select_partitions` > 1) one unit per hash partition of
    the content hashes, reading that partition's files from the scatter stage
    (`pipeline.stages.scatter`, `pipeline.corpus.partition`), and a streaming merge that lays out
    the rows."""

    def units(self) -> list[int | None]:
        P = self.cfg.run.select_partitions
        if P == 1:
            return [None]  # one step over small columns of the whole corpus
        check_partitioned(self.cfg)
        return list(range(P))

    def run_unit(self, unit: int | None, progress: UnitProgress | None = None) -> Any:
        stage, cfg, prepared = self.stage, self.cfg, self.inputs["prepare"]
        assert isinstance(stage, SelectStage)
        if unit is not None:
            scattered = self.inputs["scatter"]
            return dedup_partition(cfg, self.ctx.work, prepared, unit, inputs_key(prepared), scattered)
        self._forget_other_mode()
        return select_and_layout(
            cfg,
            self.ctx.work,
            prepared,
            stage.selectors(cfg),
            stage.order(cfg),
            stage.priority(cfg),
        )

    def merge(self, results: list[Any]) -> SelectResult:
        if self.cfg.run.select_partitions == 1:
            return results[0]
        semantic = self.inputs.get("semantic_prune")  # its drops enter the merge before the budgets
        extra = semantic.extra_drops(self.ctx.work) if semantic is not None else []
        self._forget_other_mode()
        return select_partitioned(self.cfg, self.ctx.work, self.inputs["prepare"], results, extra)

    def _forget_other_mode(self) -> None:
        """`run.select_partitions` is execution-only (the select folder's key ignores it), which holds
        while P = 1 and P > 1 decide the same. With SemDeDup/D4 partitioned they may not (README
        "Partitioned selection"), so the select record names the semantic partitioning it was made
        with, and a run with another one does not reuse it."""
        mode = self.cfg.run.select_partitions if self.inputs.get("semantic_prune") is not None else 1
        marker = self.ctx.work.select_dir / "semantic-partitions.json"
        seen = int(marker.read_text()) if marker.exists() else 1
        if seen != mode:
            (self.ctx.work.select_dir / "select.json").unlink(missing_ok=True)
            self.ctx.work.select_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(marker, mode)

    def report(self, merged: SelectResult) -> StageReport:
        return select_counts(self.inputs["prepare"], merged)

    def label(self, unit: int | None) -> str:
        return "select" if unit is None else f"select partition {unit}/{self.cfg.run.select_partitions}"

    def advance(self, r: Any) -> tuple[str, dict[str, int]]:
        if isinstance(r, PartitionResult):
            return "select", {"documents": r.documents}
        return "select", {"tokens": sum(t.content_tokens for t in r.targets)}

    def log_line(self, r: Any) -> str:
        if isinstance(r, PartitionResult):
            return f"partition {r.partition}: {r.documents} documents, {r.duplicates} exact duplicates"
        return "; ".join(
            f"{t.config_name}: {t.n_rows} rows in {t.n_shards} shards ({t.strategy}), "
            f"{t.split_documents} documents split"
            for t in r.targets
        )
