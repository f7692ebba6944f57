"""Figures for the dataset card, recounted from the Parquet files the run wrote.

The manifest says what the run meant to write; these counts say what the files hold. The card
prints the recount and cross-checks it against the manifest, so neither can drift unnoticed.
Only small columns are read (lengths and segment lineage, never token ids or text), a record
batch at a time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.manifest import FileEntry, Manifest, TargetSummary

# Histogram bins: powers of two, bin i covers [EDGES[i], EDGES[i+1]); 0 gets its own bin.
EDGES: list[int] = [0, *(1 << k for k in range(41))]
_SEGMENT_FIELDS = (
    "source",
    "doc_tokens",
    "row_token_start",
    "row_token_end",
    "part",
    "is_split",
    "separator_after",
)
_CHAT_COLUMNS = (
    "task",
    "generator",
    "length",
    "context_tokens",
    "target_length",
    "dependency_distance",
    "loss_mask",
)
_MODEL_FIELDS = ("model", "endpoint_host", "template", "template_version", "prompt_hash")
BATCH_ROWS = 256


@dataclass
class Histogram:
    """Counts of values in power-of-two bins, with their exact count, sum and maximum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(EDGES) - 1))
    count: int = 0
    total: int = 0
    max: int = 0

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        v = values.astype(np.int64, copy=False)
        idx = np.searchsorted(np.asarray(EDGES, dtype=np.int64), v, side="right") - 1
        for i, n in enumerate(np.bincount(idx, minlength=len(self.counts)).tolist()):
            self.counts[i] += n
        self.count += len(v)
        self.total += int(v.sum())
        self.max = max(self.max, int(v.max()))

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


def trimmed(hists: dict[str, Histogram]) -> tuple[list[int], dict[str, list[int]]]:
    """The common bin range with any non-zero count, as (edges, counts per series)."""
    used = [i for i in range(len(EDGES) - 1) if any(h.counts[i] for h in hists.values())]
    if not used:
        return [0, 1], {k: [0] for k in hists}
    lo, hi = used[0], used[-1] + 1
    return EDGES[lo : hi + 1], {k: h.counts[lo:hi] for k, h in hists.items()}


@dataclass
class SourceInRows:
    """One source's share of one pretraining config."""

    tokens: int = 0  # document tokens in rows
    segments: int = 0
    documents: int = 0  # documents whose first piece is here
    split_documents: int = 0
    doc_tokens: Histogram = field(default_factory=Histogram)  # whole-document lengths


@dataclass
class PretrainStats:
    config_name: str
    target_length: int
    files: int = 0
    bytes: int = 0
    rows: int = 0
    tokens: int = 0
    content_tokens: int = 0
    separator_tokens: int = 0
    pad_tokens: int = 0
    segments: int = 0
    max_segments_per_row: int = 0
    has_text: bool = False  # rows carry their decoded `text`
    lengths: Counter[int] = field(default_factory=Counter)  # row length -> rows
    sources: dict[str, SourceInRows] = field(default_factory=dict)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.sources.values())

    @property
    def split_documents(self) -> int:
        return sum(s.split_documents for s in self.sources.values())


@dataclass
class TaskStats:
    rows: int = 0
    tokens: int = 0
    context_tokens: int = 0
    supervised_tokens: int = 0  # loss_mask ones (the tokens a trainer learns)
    masked_tokens: int = 0  # tokens of the rows that carry a loss_mask
    generators: Counter[str] = field(default_factory=Counter)
    dependency_distance: Histogram = field(default_factory=Histogram)


@dataclass
class ChatStats:
    """A synthesized chat set: task mix, lengths, dependency distances, models used."""

    config_name: str
    files: int = 0
    bytes: int = 0
    rows: int = 0
    tokens: int = 0
    target_lengths: Counter[int] = field(default_factory=Counter)
    tasks: dict[str, TaskStats] = field(default_factory=dict)
    models: Counter[tuple[str, ...]] = field(default_factory=Counter)  # _MODEL_FIELDS values -> rows


@dataclass
class EvalTaskStats:
    questions: int = 0
    prompt_tokens: int = 0
    samples: set[str] = field(default_factory=set)  # sample_id of the samples the questions are about
    dependency_distance: Histogram = field(default_factory=Histogram)


@dataclass
class EvalStats:
    """An evaluation export: one row per question of a synthesized sample (not a sample itself)."""

    config_name: str
    files: int = 0
    bytes: int = 0
    rows: int = 0  # questions
    prompt_tokens: int = 0
    target_lengths: Counter[int] = field(default_factory=Counter)
    tasks: dict[str, EvalTaskStats] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(len(t.samples) for t in self.tasks.values())


@dataclass
class TableStats:
    """Any other table (audit tables, sets a later stage adds): rows, columns, and drops by reason."""

    name: str
    folder: str
    files: int = 0
    bytes: int = 0
    rows: int = 0
    columns: list[str] = field(default_factory=list)
    table: str | None = None  # the `longloom.table` tag of its schema, e.g. "filtered@1"
    by_reason: Counter[tuple[str, str, str]] = field(
        default_factory=Counter
    )  # (source, step, reason) -> rows
    tokens_by_reason: Counter[tuple[str, str, str]] = field(default_factory=Counter)


@dataclass
class CardStats:
    pretrain: list[PretrainStats]
    chat: list[ChatStats]
    tables: list[TableStats]  # extra configs that are neither chat sets nor evaluation exports
    audit: list[TableStats]
    evals: list[EvalStats] = field(default_factory=list)

    def source_tokens(self) -> dict[str, int]:
        """Document tokens per source over every pretraining config."""
        out: Counter[str] = Counter()
        for p in self.pretrain:
            for name, s in p.sources.items():
                out[name] += s.tokens
        return dict(out)


def table_tag(path: Path) -> str | None:
    meta = pq.read_schema(path).metadata or {}
    tag = meta.get(b"longloom.table")
    return tag.decode() if tag else None


def _np(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(a.to_numpy(zero_copy_only=False))


def pretrain_stats(out: Path, t: TargetSummary) -> PretrainStats:
    s = PretrainStats(config_name=t.config_name, target_length=t.target_length)
    columns = ["length", "n_pad", "n_segments", *(f"segments.list.element.{f}" for f in _SEGMENT_FIELDS)]
    for shard in t.shards:
        path = out / shard.path
        s.files += 1
        s.bytes += path.stat().st_size
        s.has_text = "text" in pq.read_schema(path).names
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
            s.rows += batch.num_rows
            lengths = _np(batch.column("length"))
            s.tokens += int(lengths.sum())
            s.lengths.update(lengths.tolist())
            s.pad_tokens += int(_np(batch.column("n_pad")).sum())
            n_seg = _np(batch.column("n_segments"))
            s.max_segments_per_row = max(s.max_segments_per_row, int(n_seg.max(initial=0)))
            _add_segments(s, pc.list_flatten(batch.column("segments")))
    return s


def _add_segments(s: PretrainStats, segs: pa.StructArray) -> None:
    span = _np(segs.field("row_token_end")).astype(np.int64) - _np(segs.field("row_token_start"))
    first = _np(segs.field("part")) == 0
    split = _np(segs.field("is_split")).astype(bool)
    doc_tokens = _np(segs.field("doc_tokens"))
    s.segments += len(segs)
    s.content_tokens += int(span.sum())
    s.separator_tokens += int(_np(segs.field("separator_after")).astype(bool).sum())
    codes = pc.dictionary_encode(segs.field("source"))
    names = codes.dictionary.to_pylist()
    idx = _np(codes.indices)
    for k, name in enumerate(names):
        m = idx == k
        src = s.sources.setdefault(name, SourceInRows())
        src.tokens += int(span[m].sum())
        src.segments += int(m.sum())
        src.documents += int((m & first).sum())
        src.split_documents += int((m & first & split).sum())
        src.doc_tokens.add(doc_tokens[m & first])


def chat_stats(out: Path, name: str, files: list[FileEntry]) -> ChatStats:
    s = ChatStats(config_name=name)
    for e in files:
        path = out / e.path
        s.files += 1
        s.bytes += path.stat().st_size
        have = set(pq.read_schema(path).names)
        columns = [c for c in _CHAT_COLUMNS if c in have] + (["model"] if "model" in have else [])
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=columns):
            _add_chat(s, batch)
    return s


def _add_chat(s: ChatStats, batch: pa.RecordBatch) -> None:
    n = batch.num_rows
    s.rows += n
    col = batch.schema.names
    tasks = batch.column("task").to_pylist() if "task" in col else ["(unknown)"] * n
    gens = batch.column("generator").to_pylist() if "generator" in col else [""] * n
    length = _np(batch.column("length")) if "length" in col else np.zeros(n, np.int64)
    ctx = _np(batch.column("context_tokens")) if "context_tokens" in col else np.zeros(n, np.int64)
    dist = _np(batch.column("dependency_distance")) if "dependency_distance" in col else None
    s.tokens += int(length.sum())
    if "target_length" in col:
        s.target_lengths.update(batch.column("target_length").to_pylist())
    for i, task in enumerate(tasks):
        ts = s.tasks.setdefault(task, TaskStats())
        ts.rows += 1
        ts.tokens += int(length[i])
        ts.context_tokens += int(ctx[i])
        if gens[i]:
            ts.generators[gens[i]] += 1
    if "loss_mask" in col:
        lm = batch.column("loss_mask")
        offs = lm.offsets.to_numpy()
        cs = np.r_[0, np.cumsum(lm.values.to_numpy(zero_copy_only=False).astype(np.int64))]
        sup, lens = cs[offs[1:]] - cs[offs[:-1]], np.diff(offs)
        for i, task in enumerate(tasks):
            if lm[i].is_valid:
                s.tasks[task].supervised_tokens += int(sup[i])
                s.tasks[task].masked_tokens += int(lens[i])
    if dist is not None:
        task_arr = np.asarray(tasks, dtype=object)
        for task in set(tasks):
            s.tasks[task].dependency_distance.add(dist[task_arr == task])
    if "model" in col:
        for m in batch.column("model").to_pylist():
            if m:
                s.models[tuple(str(m.get(f) or "") for f in _MODEL_FIELDS)] += 1


def table_stats(out: Path, name: str, files: list[FileEntry]) -> TableStats:
    folder = str(Path(files[0].path).parent) if files else name
    s = TableStats(name=name, folder=folder)
    for e in files:
        path = out / e.path
        s.files += 1
        s.bytes += path.stat().st_size
        schema = pq.read_schema(path)
        s.columns = schema.names
        s.table = table_tag(path)
        pf = pq.ParquetFile(path)
        s.rows += pf.metadata.num_rows
        if "source" in schema.names and "reason" in schema.names:
            cols = ["source", "reason"] + [c for c in ("step", "n_tokens") if c in schema.names]
            for batch in pf.iter_batches(batch_size=65_536, columns=cols):
                src = batch.column("source").to_pylist()
                rsn = batch.column("reason").to_pylist()
                step = batch.column("step").to_pylist() if "step" in cols else [""] * batch.num_rows
                tok = batch.column("n_tokens").to_pylist() if "n_tokens" in cols else None
                for i in range(batch.num_rows):
                    key = (src[i], step[i] or "", rsn[i])
                    s.by_reason[key] += 1
                    if tok is not None:
                        s.tokens_by_reason[key] += int(tok[i] or 0)
    return s


def eval_stats(out: Path, name: str, files: list[FileEntry]) -> EvalStats:
    s = EvalStats(config_name=name)
    columns = ["sample_id", "task", "prompt_tokens", "target_length", "dependency_distance"]
    for e in files:
        path = out / e.path
        s.files += 1
        s.bytes += path.stat().st_size
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=columns):
            s.rows += batch.num_rows
            tokens = _np(batch.column("prompt_tokens")).astype(np.int64)
            dist = _np(batch.column("dependency_distance")).astype(np.int64)
            s.prompt_tokens += int(tokens.sum())
            s.target_lengths.update(batch.column("target_length").to_pylist())
            samples = batch.column("sample_id").to_pylist()
            for i, task in enumerate(batch.column("task").to_pylist()):
                t = s.tasks.setdefault(task, EvalTaskStats())
                t.questions += 1
                t.prompt_tokens += int(tokens[i])
                t.samples.add(samples[i])
                t.dependency_distance.add(dist[i : i + 1])
    return s


def table_kind(out: Path, files: list[FileEntry]) -> str:
    """ "chat" (synthesized samples), "eval" (one row per question) or "table" (anything else).

    The `longloom.table` tag decides; untagged files are told apart by their columns. An
    evaluation export also has `task` and `dependency_distance`, so it must never count as samples.
    """
    if not files:
        return "table"
    path = out / files[0].path
    tag = (table_tag(path) or "").split("@")[0]
    if tag in ("chat", "eval"):
        return tag
    names = set(pq.read_schema(path).names)
    if tag:
        return "table"
    if {"eval_id", "prompt_tokens"} <= names:
        return "eval"
    return "chat" if {"task", "dependency_distance", "messages"} <= names else "table"


def is_chat(out: Path, files: list[FileEntry]) -> bool:
    return table_kind(out, files) == "chat"


def collect(out: Path, manifest: Manifest) -> CardStats:
    """Recount every config and audit table of a finished run from its files."""
    chat, evals, tables = [], [], []
    for name, files in manifest.extra_configs.items():
        if not files:
            continue
        kind = table_kind(out, files)
        if kind == "chat":
            chat.append(chat_stats(out, name, files))
        elif kind == "eval":
            evals.append(eval_stats(out, name, files))
        else:
            tables.append(table_stats(out, name, files))
    return CardStats(
        pretrain=[pretrain_stats(out, t) for t in manifest.targets],
        chat=chat,
        tables=tables,
        audit=[table_stats(out, name, files) for name, files in manifest.audit.items() if files],
        evals=evals,
    )
