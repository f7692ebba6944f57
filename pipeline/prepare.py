"""Stage 1, one input shard at a time: read, hash, tokenize, filter; write tokenized documents.

Shards are independent, so this stage maps over shards in parallel (threads, processes or a Dask
cluster). Its output per shard is three Parquet files (documents kept, documents filtered, input
quarantined) and a JSON record of counts that later stages and the manifest add up. A shard whose
record exists and whose files still match their checksums is not redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.faults import crash_point
from pipeline.filters import DocColumns, filters_for_source
from pipeline.parquet_io import ParquetSink, sha256_file, write_json_atomic
from pipeline.progress import UnitProgress
from pipeline.readers import InputShard, read_shard
from pipeline.tokenizer import Tokenizer, load_tokenizer
from pipeline.workdir import WorkDir
from schemas.config import BuildConfig
from schemas.records import DOC_SCHEMA, FILTERED_SCHEMA, QUARANTINE_SCHEMA

PREPARE_STEP = "prepare@1"


@dataclass
class PrepareResult:
    """What one input shard produced; persisted as the shard's completion record."""

    shard_id: str
    source: str
    uri: str
    revision: str | None
    input_bytes: int
    records_read: int
    quarantined: dict[str, int]
    documents: int
    tokens_read: int
    filtered: dict[str, int]
    filtered_tokens: dict[str, int]
    kept: int
    kept_tokens: int
    files: dict[str, str] = field(default_factory=dict)  # kind -> path relative to the stage folder
    sha256: dict[str, str] = field(default_factory=dict)  # kind -> checksum
    seconds: float = 0.0
    steps: list[str] = field(default_factory=list)
    input_stamp: str = ""  # what the input looked like when read (see `input_stamp`)
    reused: bool = False  # set when loaded from an earlier run's record, never stored as True

    @property
    def records_in_documents(self) -> int:
        return self.records_read - sum(self.quarantined.values())

    def to_json(self) -> dict:
        return {**asdict(self), "reused": False}

    @classmethod
    def from_json(cls, d: dict) -> PrepareResult:
        return cls(**d)


def input_stamp(cfg: BuildConfig, shard: InputShard) -> str:
    """A cheap fingerprint of a shard's input (path, size and mtime of every file in it).

    A completion record is reused only while the stamp matches, so an input that grew or was
    replaced, or a new file that shifts shard numbering, is read again rather than trusted.
    """
    h = hashlib.sha256(f"{shard.kind}|{shard.uri}|{shard.index}|{shard.hf_num_shards}".encode())
    path = cfg.resolve(shard.uri)
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


def tokenizer_for(cfg: BuildConfig) -> Tokenizer:
    return load_tokenizer(cfg.tokenizer.name, cfg.tokenizer.max_piece_chars, cfg.tokenizer.threads)


def _add(counter: dict[str, int], key: str, n: int) -> None:
    if n:
        counter[key] = counter.get(key, 0) + n


def prepare_shard(
    cfg: BuildConfig, shard: InputShard, work: WorkDir, progress: UnitProgress | None = None
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
    filters = filters_for_source(cfg, shard.source)
    folder = work.prepare_dir
    paths = {
        "documents": f"documents/{shard.shard_id}.parquet",
        "filtered": f"filtered/{shard.shard_id}.parquet",
        "quarantine": f"quarantine/{shard.shard_id}.parquet",
    }
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
    )
    level = cfg.output.compression_level
    with (
        ParquetSink(folder / paths["documents"], DOC_SCHEMA, level) as docs_out,
        ParquetSink(folder / paths["filtered"], FILTERED_SCHEMA, level) as filtered_out,
        ParquetSink(folder / paths["quarantine"], QUARANTINE_SCHEMA, level) as quarantine_out,
    ):
        reader = read_shard(cfg, shard)
        for batch in reader:
            res.records_read += batch.records_read
            if batch.quarantine.num_rows:
                quarantine_out.write(batch.quarantine)
                for reason, n in _value_counts(batch.quarantine.column("reason")).items():
                    _add(res.quarantined, reason, n)
            if batch.docs.num_rows:
                kept, dropped = _tokenize_and_filter(batch.docs, tok, filters, shard.source, res)
                docs_out.write(kept)
                filtered_out.write(dropped)
            if progress is not None:
                progress({"records": res.records_read, "tokens": res.tokens_read, "kept": res.kept})
            crash_point("read")
        info = reader.info
        res.revision = info.revision
        res.input_bytes = info.bytes
    for kind, rel in paths.items():
        res.sha256[kind] = sha256_file(folder / rel)
    res.seconds = round(time.perf_counter() - started, 3)
    write_json_atomic(done, res.to_json())
    crash_point("prepared")
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
    if res.input_stamp != stamp:
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


def _tokenize_and_filter(
    docs: pa.Table, tok: Tokenizer, filters: list, source: str, res: PrepareResult
) -> tuple[pa.Table, pa.Table]:
    texts: list[str] = docs.column("text").to_pylist()
    hashes = content_hashes(texts)
    ids, offsets = tok.encode_batch(texts)
    n_tokens = np.diff(offsets)
    n_chars = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    n_bytes = pc.binary_length(docs.column("text").cast(pa.large_binary())).to_numpy().astype(np.int64)
    res.documents += len(texts)
    res.tokens_read += int(n_tokens.sum())

    keep = np.ones(len(texts), dtype=bool)
    step = np.empty(len(texts), dtype=object)
    reason = np.empty(len(texts), dtype=object)
    detail = np.empty(len(texts), dtype=object)
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
    list_ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids, pa.int32()))
    hash_arr = pa.array(hashes, pa.string())
    full = pa.table(
        {
            "source": docs.column("source"),
            "uri": docs.column("uri"),
            "record": docs.column("record"),
            "doc_id": docs.column("doc_id"),
            "content_hash": hash_arr,
            "n_chars": pa.array(n_chars),
            "n_bytes": pa.array(n_bytes),
            "n_tokens": pa.array(n_tokens),
            "input_ids": list_ids,
        },
        schema=DOC_SCHEMA,
    )
    kept = full.take(pa.array(idx)) if len(idx) < len(texts) else full
    didx = np.flatnonzero(~keep)
    dropped = pa.table(
        {
            "source": docs.column("source").take(pa.array(didx)),
            "uri": docs.column("uri").take(pa.array(didx)),
            "record": docs.column("record").take(pa.array(didx)),
            "doc_id": docs.column("doc_id").take(pa.array(didx)),
            "content_hash": hash_arr.take(pa.array(didx)),
            "n_tokens": pa.array(n_tokens[didx]),
            "step": pa.array(step[didx].tolist(), pa.string()),
            "reason": pa.array(reason[didx].tolist(), pa.string()),
            "detail": pa.array(detail[didx].tolist(), pa.string()),
            "duplicate_of": pa.nulls(len(didx), pa.string()),
        },
        schema=FILTERED_SCHEMA,
    )
    return kept, dropped


__all__ = ["PREPARE_STEP", "PrepareResult", "input_stamp", "load_verified", "prepare_shard", "tokenizer_for"]
