"""Embedding a prepared shard's documents: token ids -> text chunks -> one vector per document.

Tokenized documents store token ids, not text, so each document is decoded with the pipeline tokenizer
(except for `static-tokens`, which embeds the id spans directly: `pipeline.embedders.static_tokens`).
A document longer than one chunk is embedded from up to `max_chunks` chunks of `chunk_tokens` tokens:
when that covers the document the chunks tile it, otherwise they are spread evenly over it (first chunk
at the start, last at the end) and the shortfall is counted (`partial_documents`, `min_coverage`), never
silently truncated. Chunk vectors are averaged and re-normalised.

Output per shard: `<work>/.longloom/embed-<key>/<shard_id>.npy`, an (n_documents, dim) float16/float32
array row-aligned with the shard's documents file, read later through a memmap; and a JSON record with its
checksum, so a rerun verifies and skips it. Vectors come from the embedding cache where it has them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.core.parquet_io import atomic_path, read_tokens_into, sha256_file, write_json_atomic
from pipeline.core.results import EmbedResult, tokens_file_of
from pipeline.core.storage import KeyedFiles, is_remote
from pipeline.core.tokenizer import Tokenizer, tokenizer_for
from pipeline.core.workdir import WorkDir
from pipeline.embedders.cache import KEY_DTYPE, EmbeddingCache
from pipeline.embedders.registry import (
    STATIC_TOKENS,
    Embedder,
    ModelInfo,
    embedder_identity,
    load_embedder,
    resolved_spec,
)
from pipeline.embedders.static_minilm import cache_root
from pipeline.embedders.static_tokens import TokenStaticEmbedder
from schemas.stage_config import EmbedConfig, HasDiversity

EMBED_STEP = "embed@1"
ENCODE_BLOCK_CHUNKS = 2048  # chunks decoded and handed to the model at once (bounded memory)
# documents and covered tokens per batch on the id path (static-tokens): ~35 bytes per token at peak
ID_BATCH_ROWS = 2048
ID_BATCH_TOKENS = 2_000_000


def embed_key(cfg: HasDiversity, work: WorkDir) -> str:
    """The embed stage's key: the prepared documents' key and the embedding settings (the part of the
    diversity section embeddings depend on, so changing a selection threshold reuses them)."""
    d = cfg.diversity
    blob = json.dumps([EMBED_STEP, d.embedder, d.chunk_tokens, d.max_chunks, d.dtype]).encode()
    return f"{work.prepare_key}-{hashlib.sha256(blob).hexdigest()[:12]}"


def embed_dir(cfg: HasDiversity, work: WorkDir) -> Path:
    """Per-run embedding files: keyed by the prepared documents and the embedding settings."""
    return work.root / f"embed-{embed_key(cfg, work)}"


def cache_dir(cfg: HasDiversity) -> str:
    """The embedding cache: a local folder, or an fsspec URL (`s3://...`; see `EmbeddingCache`)."""
    d = cfg.diversity.cache_dir
    if d and is_remote(d):
        return d
    return str(Path(d).expanduser() if d else cache_root() / "embeddings")


def chunk_tokens_for(cfg: HasDiversity, model: Embedder | ModelInfo) -> int:
    return cfg.diversity.chunk_tokens or model.default_chunk_tokens


def embedding_key(cfg: HasDiversity, model: Embedder | ModelInfo, tok: Tokenizer) -> str:
    """Everything a cached vector depends on besides the text: weights, chunking, tokenizer, dtype."""
    d = cfg.diversity
    parts = [EMBED_STEP, model.identity, chunk_tokens_for(cfg, model), d.max_chunks]
    parts += [tok.identity.vocab_hash, d.dtype]
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.identity.split("@")[0])
    return f"{safe}-{digest}"


def uses_cache(spec: str) -> bool:
    """`static-tokens` embeds from stored token ids faster than cached vectors can be looked up (the
    lookup loads every key of the cache; bench_diversity.py --only cache): it neither reads nor fills it."""
    return spec != STATIC_TOKENS


def _info_file(identity: str) -> str:
    """Where a model's dimension and window are recorded, relative to the cache."""
    return f"models/{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"


def model_info(cfg: HasDiversity, spec: str, tok: Tokenizer) -> tuple[ModelInfo, Embedder | None]:
    """The model's identity, dimension and window, and the model itself only if it had to be loaded.

    The identity comes from the weights' fingerprint without loading; dimension and window are recorded
    beside the cache the first time the model is loaded, so a rerun whose vectors are all cached needs
    no model (loading MiniLM and torch took ~15 s for 0 model calls).
    """
    if uses_cache(spec):
        identity = embedder_identity(spec)
        files = KeyedFiles(cache_dir(cfg))
        try:
            rec = json.loads(files.read_bytes(_info_file(identity)) or b"")
            if rec["identity"] == identity:
                return ModelInfo(identity, int(rec["dim"]), rec["max_seq_tokens"]), None
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not recorded yet (or unreadable): load the model and record it
    embedder = load_embedder(spec, cfg.diversity.device, tok)
    if uses_cache(spec):
        record = json.dumps(asdict(embedder.info), indent=2, sort_keys=True) + "\n"
        files.write_bytes(_info_file(identity), record.encode())
    return embedder.info, embedder


def chunk_spans(n_tokens: int, chunk: int, max_chunks: int) -> list[tuple[int, int]]:
    """Token spans to embed: tiles of at most `chunk` tokens if `max_chunks` suffice, else evenly spread."""
    if n_tokens <= chunk:
        return [(0, n_tokens)]
    need = -(-n_tokens // chunk)
    if need <= max_chunks:
        bounds = np.linspace(0, n_tokens, need + 1).round().astype(np.int64)
        return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    starts = np.linspace(0, n_tokens - chunk, max_chunks).round().astype(np.int64)
    return [(int(s), int(s) + chunk) for s in starts]


def coverage(n_tokens: np.ndarray, chunk: int, max_chunks: int) -> np.ndarray:
    """Fraction of each document's tokens that its chunks cover: `chunk_spans`' rule, vectorised.

    A document of n tokens is tiled when ceil(n / chunk) <= max_chunks; otherwise max_chunks chunks of
    `chunk` tokens are spread over it without overlap (their starts lie more than `chunk` apart).
    """
    n = np.asarray(n_tokens, np.int64)
    cap = chunk * max_chunks
    return np.where(n > cap, cap / np.maximum(n, 1), 1.0)


def open_embeddings(cfg: HasDiversity, work: WorkDir, shard_id: str) -> np.ndarray:
    """The shard's embeddings as a read-only memmap (rows = documents)."""
    return np.load(embed_dir(cfg, work) / f"{shard_id}.npy", mmap_mode="r")


def load_verified(cfg: HasDiversity, work: WorkDir, shard_id: str, docs_sha: str) -> EmbedResult | None:
    rec = embed_dir(cfg, work) / f"{shard_id}.json"
    if not rec.exists():
        return None
    try:
        res = EmbedResult(**json.loads(rec.read_text()))
    except (ValueError, TypeError):
        return None
    path = embed_dir(cfg, work) / res.file
    if res.documents_sha256 != docs_sha or not path.exists() or sha256_file(path) != res.sha256:
        return None
    res.reused = True
    res.cache_hits = res.cache_misses = res.model_calls = res.chunks = 0
    res.seconds = 0.0
    return res


def embed_documents(
    cfg: EmbedConfig, work: WorkDir, shard_id: str, docs_path: Path, docs_sha: str | None = None
) -> EmbedResult:
    """Embed every document of a tokenized documents file into `<embed dir>/<shard_id>.npy`."""
    docs_sha = docs_sha or sha256_file(docs_path)
    previous = load_verified(cfg, work, shard_id, docs_sha)
    if previous is not None:
        return previous
    started = time.perf_counter()
    d = cfg.diversity
    assert d.embedder, "embedding needs diversity.embedder"
    spec = resolved_spec(d.embedder, cfg.base_dir)
    tok = tokenizer_for(cfg)
    info, embedder = model_info(cfg, spec, tok)
    key = embedding_key(cfg, info, tok)
    cache = EmbeddingCache(cache_dir(cfg), key, info.dim, d.dtype) if uses_cache(spec) else None
    chunk = chunk_tokens_for(cfg, info)
    pf = pq.ParquetFile(docs_path)
    meta = pf.read(columns=["content_hash", "n_tokens"])
    keys = np.array(meta.column("content_hash").to_pylist(), dtype=KEY_DTYPE)
    n = len(keys)
    # coverage is a property of the documents and the chunking, so it is counted over every row, hit or
    # miss, and comes out the same with a cold or a warm cache
    cov = coverage(meta.column("n_tokens").to_numpy(), chunk, d.max_chunks)
    calls_before = embedder.calls if embedder is not None else 0
    res = EmbedResult(
        shard_id=shard_id,
        documents=n,
        dim=info.dim,
        dtype=d.dtype,
        file=f"{shard_id}.npy",
        sha256="",
        documents_sha256=docs_sha,
        embedder=info.identity,
        cache_key=key,
        chunk_tokens=chunk,
        max_chunks=d.max_chunks,
        cache_hits=0,
        cache_misses=0,
        model_calls=0,
        chunks=0,
        partial_documents=int((cov < 1.0).sum()),
        min_coverage=float(cov.min(initial=1.0)),
        seconds=0.0,
    )
    final = embed_dir(cfg, work) / res.file
    with atomic_path(final) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(d.dtype), shape=(n, info.dim))
        if cache is not None:
            found, vecs = cache.lookup(keys)
            out[found] = vecs
        else:
            found = np.zeros(n, bool)
        res.cache_hits = int(found.sum())
        # each distinct missing text is embedded once, then copied to its repeats in the shard
        miss_rows = np.flatnonzero(~found)
        _, first, inverse = np.unique(keys[miss_rows], return_index=True, return_inverse=True)
        todo = miss_rows[first]
        res.cache_misses = len(todo)
        if len(todo):
            if embedder is None:  # a miss needs the model: load it now (once per process)
                embedder = load_embedder(spec, d.device, tok)
                calls_before = embedder.calls
            tokens_path = tokens_file_of(docs_path)
            if isinstance(embedder, TokenStaticEmbedder):
                _embed_rows_from_ids(cfg, embedder, pf, tokens_path, np.sort(todo), chunk, out, res, shard_id)
            else:
                _embed_rows(cfg, embedder, tok, pf, tokens_path, np.sort(todo), chunk, out, res, shard_id)
            out[miss_rows] = out[todo[inverse]]
            if cache is not None:
                cache.add(keys[todo], np.asarray(out[todo]))
        out.flush()
        del out
    res.sha256 = sha256_file(final)
    res.model_calls = embedder.calls - calls_before if embedder is not None else 0
    res.seconds = round(time.perf_counter() - started, 3)
    write_json_atomic(embed_dir(cfg, work) / f"{shard_id}.json", res.to_json())
    return res


def _embed_rows(
    cfg: EmbedConfig,
    embedder: Embedder,
    tok: Tokenizer,
    pf: pq.ParquetFile,
    tokens_path: Path,
    rows: np.ndarray,
    chunk: int,
    out: np.ndarray,
    res: EmbedResult,
    shard_id: str,
) -> None:
    """Decode the chunks of documents `rows` (sorted), embed them in blocks, pool per document into `out`."""
    d = cfg.diversity
    texts: list[str] = []
    owner: list[int] = []  # document row of each pending chunk

    def flush() -> None:
        if not texts:
            return
        vecs = embedder.encode(texts, d.batch_size)
        own = np.asarray(owner)
        starts = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
        pooled = np.add.reduceat(vecs, starts, axis=0)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        out[own[starts]] = pooled
        res.chunks += len(texts)
        bar.update(len(starts))
        texts.clear()
        owner.clear()

    spans_of = pf.read(columns=["token_start", "n_tokens"])
    token_starts = spans_of.column("token_start").to_numpy()[rows]
    lengths = spans_of.column("n_tokens").to_numpy()[rows]
    fd = os.open(tokens_path, os.O_RDONLY)
    try:
        with tqdm(
            total=len(rows), desc=f"embed {shard_id}", unit="doc", disable=not d.progress, leave=False
        ) as bar:
            for r, start, n in zip(rows.tolist(), token_starts.tolist(), lengths.tolist(), strict=True):
                for a, b in chunk_spans(n, chunk, d.max_chunks):
                    ids = np.empty(b - a, np.int32)
                    read_tokens_into(fd, ids, start + a)
                    texts.append(tok.decode(ids))
                    owner.append(r)
                if len(texts) >= ENCODE_BLOCK_CHUNKS:
                    flush()
            flush()
    finally:
        os.close(fd)


def _embed_rows_from_ids(
    cfg: EmbedConfig,
    embedder: TokenStaticEmbedder,
    pf: pq.ParquetFile,
    tokens_path: Path,
    rows: np.ndarray,
    chunk: int,
    out: np.ndarray,
    res: EmbedResult,
    shard_id: str,
) -> None:
    """Embed the chunks of documents `rows` straight from their token ids, ID_BATCH_ROWS documents at a time."""
    spans_of = pf.read(columns=["token_start", "n_tokens"])
    token_start = spans_of.column("token_start").to_numpy()
    n_tokens = spans_of.column("n_tokens").to_numpy()
    # np.memmap refuses an empty file
    empty = not int(n_tokens.sum())
    flat = np.zeros(0, np.int32) if empty else np.memmap(tokens_path, dtype="<i4", mode="r")
    with tqdm(
        total=len(rows), desc=f"embed {shard_id}", unit="doc", disable=not cfg.diversity.progress, leave=False
    ) as bar:
        covered = np.cumsum(np.minimum(n_tokens[rows], cfg.diversity.max_chunks * chunk))
        b0 = 0
        while b0 < len(rows):
            before = int(covered[b0 - 1]) if b0 else 0
            by_tokens = int(np.searchsorted(covered, before + ID_BATCH_TOKENS, side="right"))
            b1 = max(b0 + 1, min(b0 + ID_BATCH_ROWS, by_tokens))
            here = rows[b0:b1]
            b0 = b1
            lo = token_start[here]
            owner, lo, hi = _chunk_bounds(lo, lo + n_tokens[here], chunk, cfg.diversity.max_chunks)
            lengths = hi - lo
            chunk_offsets = np.zeros(len(lo) + 1, np.int64)
            np.cumsum(lengths, out=chunk_offsets[1:])
            # file positions of every chunk's tokens: start of its chunk + rank inside it
            pos = np.repeat(lo - chunk_offsets[:-1], lengths) + np.arange(chunk_offsets[-1])
            vecs = embedder.encode_ids(np.asarray(flat[pos]), chunk_offsets)
            starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
            pooled = vecs if len(starts) == len(vecs) else np.add.reduceat(vecs, starts, axis=0)
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            out[here] = pooled
            res.chunks += len(lo)
            bar.update(len(here))
    del flat


def _chunk_bounds(
    lo: np.ndarray, hi: np.ndarray, chunk: int, max_chunks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner, start, end) of every chunk, in flat token positions; owner = index into `lo`, ascending."""
    n = hi - lo
    long_docs = np.flatnonzero(n > chunk)
    if not len(long_docs):  # the common case: every document is one chunk
        return np.arange(len(lo)), lo, hi
    short = np.ones(len(lo), bool)
    short[long_docs] = False
    owner, start, end = [np.flatnonzero(short)], [lo[short]], [hi[short]]
    for k in long_docs.tolist():
        spans = np.array(chunk_spans(int(n[k]), chunk, max_chunks), np.int64)
        owner.append(np.full(len(spans), k))
        start.append(lo[k] + spans[:, 0])
        end.append(lo[k] + spans[:, 1])
    o, a, b = np.concatenate(owner), np.concatenate(start), np.concatenate(end)
    order = np.lexsort((a, o))
    return o[order], a[order], b[order]
