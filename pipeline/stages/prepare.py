"""Stage 1, one input shard at a time: read, hash, tokenize, filter; write tokenized documents.

Shards are independent, so this stage maps over shards in parallel (threads, processes or a Dask
cluster). Its output per shard is three Parquet files (documents kept, documents filtered, input
quarantined) and a JSON record of counts that later stages and the manifest add up. A shard whose
record exists and whose files still match their checksums is not redone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import storage
from pipeline.core.faults import crash_point
from pipeline.core.parquet_io import (
    Background,
    ParquetSink,
    TokenFileSink,
    sha256_file,
    trim_heap,
    write_json_atomic,
)
from pipeline.core.progress import UnitProgress
from pipeline.core.results import PrepareResult, tokens_file_of
from pipeline.core.tokenizer import Tokenizer, tokenizer_for
from pipeline.core.workdir import WorkDir
from pipeline.corpus.filters import DocColumns, filters_for_source
from pipeline.output.report import prepare_counts
from pipeline.readers import InputShard, list_input_shards, read_shard
from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
from schemas.config import ConfigError
from schemas.manifest import StageReport
from schemas.records import DOC_SCHEMA, FILTERED_SCHEMA, QUARANTINE_SCHEMA
from schemas.stage_config import HasSources, HasTokenizer, PrepareConfig

# The format of a prepared shard's files; a record of another format is redone, never reused.
PREPARE_STEP = "prepare@2"  # @2: token ids in a raw file beside the documents table
READ_AHEAD = 1  # input batches read ahead of the one being tokenized
# Text per input batch. At its peak a batch costs 10-20x its text in memory (raw lines, parsed
# objects, Python and Arrow copies of the text, tokenizer output; up to four batches are alive: one read, one tokenized, two queued for writing), so
# 4 MB keeps a prepare task near 160 MB above the interpreter, and two concurrent tasks well under
# 1 GB, while the tokenizer threads still get hundreds of documents (or 64K-character pieces of a
# long one) per call. Larger batches measured no faster here.
BATCH_BYTES = 4 << 20
T = TypeVar("T")


def input_stamp(cfg: HasSources, shard: InputShard) -> str:
    """A cheap fingerprint of a shard's input (path, size and mtime of every file in it).

    A completion record is reused only while the stamp matches, so an input that grew or was
    replaced, or a new file that shifts shard numbering, is read again rather than trusted.
    """
    h = hashlib.sha256(f"{shard.kind}|{shard.uri}|{shard.index}|{shard.hf_num_shards}".encode())
    if storage.is_remote(shard.uri):  # an object's size and ETag: the same on every machine
        h.update(f"|{storage.info(shard.uri)}".encode())
        return h.hexdigest()[:32]
    path = storage.input_path(cfg, shard.uri)
    if path.is_file():
        st = path.stat()
        h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
    elif path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                p = Path(root) / name
                try:
                    st = p.lstat()
                except OSError:
                    continue
                h.update(f"|{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    else:  # a hub dataset: its revision is all we know without downloading
        h.update(f"|hub|{cfg.source(shard.source).revision}".encode())
    return h.hexdigest()[:32]


def content_hashes(texts: list[str]) -> list[str]:
    return [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]


def arrow_content_hashes(col: pa.Array) -> list[str]:
    """sha256 hex of each string of a (large_)string array, hashed in place from Arrow's buffer."""
    col = col.cast(pa.large_string()) if col.type != pa.large_string() else col
    if col.null_count:
        raise ValueError("document text may not be null")
    offsets = np.frombuffer(col.buffers()[1], np.int64)[col.offset : col.offset + len(col) + 1].tolist()
    data = col.buffers()[2]
    mv = memoryview(data) if data is not None else memoryview(b"")
    sha = hashlib.sha256
    return [sha(mv[a:b]).hexdigest() for a, b in itertools.pairwise(offsets)]


class TokenMismatchError(ConfigError):
    """The configured tokenizer gave other ids than the reference implementation (tokenizer.verify)."""


class TokenVerifier:
    """`tokenizer.verify`: re-tokenizes a seeded sample of a shard's documents (at least its first)
    with an independent implementation of the same vocabulary and stops the run at any difference."""

    def __init__(self, cfg: HasTokenizer, tok: Tokenizer, shard_id: str) -> None:
        self.fraction = cfg.tokenizer.verify
        ref = tok.reference() if self.fraction > 0 else None
        self.ref_name = ref[0] if ref is not None else ""
        self.ref: Callable[[str], list[int]] | None = ref[1] if ref is not None else None
        self.tok_name = tok.name
        # seeded per shard, so the sample does not depend on which worker runs the shard or when
        shard_key = int(hashlib.sha256(shard_id.encode()).hexdigest()[:15], 16)
        self.rng = np.random.default_rng([cfg.run.seed, shard_key])
        self.first = True
        self.checked = 0

    def check(self, docs: pa.Table, texts: list[str], ids: np.ndarray, offsets: np.ndarray) -> None:
        if self.ref is None or not texts:
            return
        picked = self.rng.random(len(texts)) < self.fraction
        if self.first:
            picked[0] = True
            self.first = False
        for i in np.flatnonzero(picked):
            got = ids[offsets[i] : offsets[i + 1]].tolist()
            want = self.ref(texts[i])
            self.checked += 1
            if got == want:
                continue
            pos = next(
                (k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            row = {c: docs.column(c)[int(i)].as_py() for c in ("source", "uri", "record", "doc_id")}
            raise TokenMismatchError(
                f"tokenizer.verify: document {row['source']}/{row['uri']}#{row['record']} (id {row['doc_id']}): "
                f"{self.tok_name} differs from the reference ({self.ref_name}) at token {pos}: "
                f"{got[pos : pos + 3]} vs {want[pos : pos + 3]} ({len(got)} vs {len(want)} ids); "
                f"the tokenizer is not exact on this input: choose an exact one (see README, Tokenizers)"
            )


def _add(counter: dict[str, int], key: str, n: int) -> None:
    if n:
        counter[key] = counter.get(key, 0) + n


def shard_files(shard_id: str) -> dict[str, str]:
    """The files a prepared shard is made of, by kind, relative to the stage folder."""
    return {
        "documents": f"documents/{shard_id}.parquet",
        "filtered": f"filtered/{shard_id}.parquet",
        "quarantine": f"quarantine/{shard_id}.parquet",
        "tokens": f"tokens/{shard_id}.int32",
    }


def prepare_shard(
    cfg: PrepareConfig, shard: InputShard, work: WorkDir, progress: UnitProgress | None = None
) -> PrepareResult:
    """Read one input shard to tokenized, filtered documents (or reuse a verified earlier result).

    `progress`, if given, is called after every batch with the records, tokens and documents so far.
    """
    done = work.prepare_record(shard.shard_id)
    stamp = input_stamp(cfg, shard)
    previous = load_verified(work, shard.shard_id, stamp)
    if previous is not None:
        return previous
    started = time.perf_counter()
    tok = tokenizer_for(cfg)
    verifier = TokenVerifier(cfg, tok, shard.shard_id)
    filters = filters_for_source(cfg, shard.source)
    folder = work.prepare_dir
    paths = shard_files(shard.shard_id)
    res = PrepareResult(
        shard_id=shard.shard_id,
        source=shard.source,
        uri=shard.uri,
        revision=None,
        input_bytes=0,
        records_read=0,
        quarantined={},
        documents=0,
        tokens_read=0,
        filtered={},
        filtered_tokens={},
        kept=0,
        kept_tokens=0,
        files=paths,
        steps=[f"{shard.kind}_reader@1", "tokenize@1", *(f.step for f in filters)],
        input_stamp=stamp,
        format=PREPARE_STEP,
    )
    level = work.compression_level
    # Intermediates skip fsync: reuse verifies their checksums, so a file a crash left incomplete
    # is redone, never trusted.
    with (
        ParquetSink(folder / paths["documents"], DOC_SCHEMA, level, durable=False) as docs_out,
        ParquetSink(folder / paths["filtered"], FILTERED_SCHEMA, level, durable=False) as filtered_out,
        ParquetSink(folder / paths["quarantine"], QUARANTINE_SCHEMA, level, durable=False) as quarantine_out,
        TokenFileSink(folder / paths["tokens"], durable=False) as tokens_out,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="longloom-hash") as hasher,
    ):
        # Three overlapping streams: the reader parses batch k+1 while the tokenizer (GIL released)
        # encodes batch k and the writer compresses and writes batch k-1.
        reader = read_shard(cfg, shard, BATCH_BYTES)
        with Background(depth=2) as io:
            for batch in prefetched(reader, READ_AHEAD):
                res.records_read += batch.records_read
                if batch.quarantine.num_rows:
                    io.submit(quarantine_out.write, batch.quarantine)
                    for reason, n in _value_counts(batch.quarantine.column("reason")).items():
                        _add(res.quarantined, reason, n)
                if batch.docs.num_rows:
                    kept, kept_ids, dropped = _tokenize_and_filter(
                        batch.docs, tok, filters, shard.source, res, res.kept_tokens, hasher, verifier
                    )
                    io.submit(_write_documents, docs_out, tokens_out, filtered_out, kept, kept_ids, dropped)
                    del kept, kept_ids, dropped
                del batch
                if progress is not None:
                    progress({"records": res.records_read, "tokens": res.tokens_read, "kept": res.kept})
                crash_point("read")
        info = reader.info
        res.revision = info.revision
        res.input_bytes = info.bytes
    # each sink hashed its bytes as it wrote them
    for kind, sink in (
        ("documents", docs_out),
        ("filtered", filtered_out),
        ("quarantine", quarantine_out),
        ("tokens", tokens_out),
    ):
        res.sha256[kind] = str(sink.sha256)
    res.seconds = round(time.perf_counter() - started, 3)
    write_json_atomic(done, res.to_json())
    crash_point("prepared")
    trim_heap()
    return res


def load_verified(work: WorkDir, shard_id: str, stamp: str) -> PrepareResult | None:
    """An earlier result for this shard, if its record exists, was made from the same input (`stamp`)
    and every file it lists still matches its checksum."""
    done = work.prepare_record(shard_id)
    if not done.exists():
        return None
    try:
        res = PrepareResult.from_json(json.loads(done.read_text()))
    except (ValueError, TypeError):
        return None
    if res.input_stamp != stamp or res.format != PREPARE_STEP:
        return None
    for kind, rel in res.files.items():
        p = work.prepare_dir / rel
        if not p.exists() or sha256_file(p) != res.sha256.get(kind):
            return None
    res.reused = True
    return res


def _value_counts(col: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    vc = pc.value_counts(col)
    return {str(v["values"]): int(v["counts"]) for v in vc.to_pylist()}


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate `items` on a helper thread, at most `depth` items ahead of the consumer.

    An item counts from the moment the helper starts producing it, so with depth 1 the next batch
    is read while the current one is processed, and no more: memory holds two batches, not three.
    Errors in the producer are raised here; leaving the loop early stops the producer.
    """
    q: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    slots = threading.Semaphore(depth)
    stop = threading.Event()

    def produce() -> None:
        it = iter(items)
        try:
            while True:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    x = next(it)
                except StopIteration:
                    q.put(("end", None))
                    return
                q.put(("item", x))
        except BaseException as err:  # handed to the consumer, which raises it
            q.put(("error", err))

    worker = threading.Thread(target=produce, name="longloom-read", daemon=True)
    worker.start()
    try:
        while True:
            kind, x = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise x
            slots.release()  # the helper may start on the next item while this one is used
            yield x
    finally:
        stop.set()
        worker.join()


def _write_documents(
    docs_out: ParquetSink,
    tokens_out: TokenFileSink,
    filtered_out: ParquetSink,
    kept: pa.Table,
    kept_ids: np.ndarray,
    dropped: pa.Table,
) -> None:
    tokens_out.write(kept_ids)
    docs_out.write(kept)
    filtered_out.write(dropped)
    pa.default_memory_pool().release_unused()  # Arrow's pool otherwise keeps every batch's buffers


def _tokenize_and_filter(
    docs: pa.Table,
    tok: Tokenizer,
    filters: list,
    source: str,
    res: PrepareResult,
    token_base: int,
    hasher: ThreadPoolExecutor,
    verifier: TokenVerifier | None = None,
) -> tuple[pa.Table, np.ndarray, pa.Table]:
    """Tokenize and filter one batch: the kept documents' rows and ids (ids starting at `token_base`
    in the tokens file), and the dropped documents' rows."""
    text_col = docs.column("text").combine_chunks()
    # sha256 runs beside the tokenizer: both release the GIL on large buffers
    hashes_f = hasher.submit(arrow_content_hashes, text_col)
    texts: list[str] = text_col.to_pylist()
    ids, offsets = tok.encode_batch(texts)
    if verifier is not None:
        verifier.check(docs, texts, ids, offsets)
    n_chars = np.fromiter(map(len, texts), np.int64, count=len(texts))
    del texts
    n_tokens = np.diff(offsets)
    n_bytes = pc.binary_length(text_col).to_numpy().astype(np.int64)
    hashes = hashes_f.result()
    n = len(n_tokens)
    res.documents += n
    res.tokens_read += int(n_tokens.sum())

    keep = np.ones(n, dtype=bool)
    step = np.empty(n, dtype=object)
    reason = np.empty(n, dtype=object)
    detail = np.empty(n, dtype=object)
    cols = DocColumns(source=source, n_tokens=n_tokens, content_hash=hashes)
    for f in filters:
        # a document is charged to the first filter that drops it
        drop = keep & ~f.keep(cols)
        for i in np.flatnonzero(drop):
            step[i], reason[i], detail[i] = f.step, f.reason, f.detail(int(n_tokens[i]))
        _add(res.filtered, f.reason, int(drop.sum()))
        _add(res.filtered_tokens, f.reason, int(n_tokens[drop].sum()))
        keep &= ~drop
    res.kept += int(keep.sum())
    res.kept_tokens += int(n_tokens[keep].sum())

    idx = np.flatnonzero(keep)
    all_kept = len(idx) == n
    kept_ids = ids if all_kept else ids[np.repeat(keep, n_tokens)]
    kept_n = n_tokens[idx]
    token_start = token_base + np.cumsum(kept_n) - kept_n
    hash_arr = pa.array(hashes, pa.string())
    take = pa.array(idx)
    kept = pa.table(
        {
            "source": docs.column("source").take(take),
            "uri": docs.column("uri").take(take),
            "record": docs.column("record").take(take),
            "doc_id": docs.column("doc_id").take(take),
            "content_hash": hash_arr.take(take),
            "n_chars": pa.array(n_chars[idx]),
            "n_bytes": pa.array(n_bytes[idx]),
            "n_tokens": pa.array(kept_n),
            "token_start": pa.array(token_start.astype(np.int64)),
        },
        schema=DOC_SCHEMA,
    )
    didx = np.flatnonzero(~keep)
    dtake = pa.array(didx)
    dropped = pa.table(
        {
            "source": docs.column("source").take(dtake),
            "uri": docs.column("uri").take(dtake),
            "record": docs.column("record").take(dtake),
            "doc_id": docs.column("doc_id").take(dtake),
            "content_hash": hash_arr.take(dtake),
            "n_tokens": pa.array(n_tokens[didx]),
            "step": pa.array(step[didx].tolist(), pa.string()),
            "reason": pa.array(reason[didx].tolist(), pa.string()),
            "detail": pa.array(detail[didx].tolist(), pa.string()),
            "duplicate_of": pa.nulls(len(didx), pa.string()),
        },
        schema=FILTERED_SCHEMA,
    )
    return kept, kept_ids, dropped


__all__ = [
    "PREPARE_STEP",
    "PrepareResult",
    "TokenMismatchError",
    "TokenVerifier",
    "input_stamp",
    "load_verified",
    "prepare_shard",
    "tokenizer_for",
    "tokens_file_of",
]


class PrepareStage(Stage):
    """Read, filter and tokenize each input shard (`pipeline.stages.prepare`)."""

    name = "prepare"
    sections = ("sources", "tokenizer", "filters")
    config_type = PrepareConfig
    task_name = "prepare-shard"

    def work_dir(self, ctx: RunContext) -> Path:
        return ctx.work.prepare_dir

    def bind(self, ctx: RunContext, inputs: Inputs) -> StageWork:
        return _Prepare(self, ctx, inputs)


class _Prepare(StageWork[InputShard, PrepareResult]):
    def units(self) -> list[InputShard]:
        return list(self.inputs.shards) or list_input_shards(self.cfg)

    def run_unit(self, unit: InputShard, progress: UnitProgress | None = None) -> PrepareResult:
        return prepare_shard(self.cfg, unit, self.ctx.work, progress)

    def needs(self, unit: InputShard) -> list[Path]:
        """Its own record and files (what the reuse check verifies); its input comes from the source."""
        work = self.ctx.work
        files = [work.prepare_dir / rel for rel in shard_files(unit.shard_id).values()]
        return [work.prepare_record(unit.shard_id), *files]

    def report(self, merged: list[PrepareResult]) -> StageReport:
        return prepare_counts(merged)

    def label(self, unit: InputShard) -> str:
        return unit.shard_id

    def advance(self, r: PrepareResult) -> tuple[str, dict[str, int]]:
        return r.shard_id, {"tokens": r.kept_tokens}

    def log_line(self, r: PrepareResult) -> str:
        return (
            f"{r.shard_id}: {r.records_read} records, {r.documents} documents, {r.kept} kept "
            f"({r.kept_tokens} tokens), {sum(r.quarantined.values())} quarantined"
            + (" (reused a verified earlier result)" if r.reused else "")
        )
