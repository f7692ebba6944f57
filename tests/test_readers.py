"""Streaming input readers: JSONL (plain/.gz/.zst), Parquet, hf datasets, code repositories."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import pipeline.readers.jsonl as jsonl_mod
from pipeline.readers import (
    DocumentNotFound,
    InputShard,
    ReadBatch,
    fetch_document_text,
    list_input_shards,
    read_shard,
)
from pipeline.readers.pyimports import ModuleIndex, dependency_order, imports_of
from schemas.config import BuildConfig, ConfigError, parse_config
from schemas.records import QUARANTINE_SCHEMA, RAW_DOC_SCHEMA


def make_cfg(base: Path, *sources: dict[str, Any]) -> BuildConfig:
    return parse_config({"sources": list(sources), "packing": {"targets": [{"length": 1024}]}}, base_dir=base)


def read_all(
    cfg: BuildConfig, shard: InputShard, batch_bytes: int = 16 << 20
) -> tuple[pa.Table, pa.Table, Any]:
    """Docs and quarantine of a whole shard, checking schemas and the records identity on every batch."""
    reader = read_shard(cfg, shard, batch_bytes=batch_bytes)
    batches: list[ReadBatch] = list(reader)
    assert batches, "a shard yields at least one batch"
    for b in batches:
        assert b.docs.schema.equals(RAW_DOC_SCHEMA, check_metadata=True)
        assert b.quarantine.schema.equals(QUARANTINE_SCHEMA, check_metadata=True)
        if shard.kind != "code":
            assert b.records_read == b.docs.num_rows + b.quarantine.num_rows
    docs = pa.concat_tables([b.docs for b in batches])
    quarantine = pa.concat_tables([b.quarantine for b in batches])
    assert reader.info.records == sum(b.records_read for b in batches)
    return docs, quarantine, reader.info


def sha16(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# --- JSONL ---------------------------------------------------------------------------------------------

BAD_LINES: list[tuple[bytes, str | None]] = [
    (b'{"id": "a1", "text": "first document"}', None),
    (b"", None),  # blank: not a record
    (b'{"text": "unterminated"', "malformed_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"text": "bad \xff byte"}', "invalid_utf8"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8"),
    (b'{"body": "x", "id": 3}', "missing_text_field"),
    (b'{"text": null}', "missing_text_field"),
    (b'{"text": ["a", "b"]}', "text_not_string"),
    (b'{"text": "  \\n\\t "}', "empty_text"),
    (b"   ", None),  # whitespace-only line: blank
    (b'{"text": "no id here \\u00e9\\ud83d\\ude00"}', None),
    (b'{"id": 42, "text": "last line has no newline"}', None),
]


def write_bad_jsonl(path: Path) -> bytes:
    data = b"\n".join(line for line, _ in BAD_LINES)  # no final newline
    path.write_bytes(data)
    return data


def test_jsonl_every_line_is_a_doc_or_quarantined(tmp_path: Path) -> None:
    write_bad_jsonl(tmp_path / "x.jsonl")
    cfg = make_cfg(tmp_path, {"name": "web", "kind": "jsonl", "paths": ["*.jsonl"], "id_field": "id"})
    [shard] = list_input_shards(cfg)
    assert (shard.uri, shard.shard_id, shard.index, shard.kind) == ("x.jsonl", "web-00000", 0, "jsonl")
    docs, q, info = read_all(cfg, shard)

    assert docs.column("record").to_pylist() == [1, 12, 13]
    assert docs.column("doc_id").to_pylist() == ["a1", "x.jsonl#12", "42"]
    assert docs.column("text").to_pylist() == ["first document", "no id here é😀", "last line has no newline"]
    assert set(docs.column("source").to_pylist()) == {"web"} and set(docs.column("uri").to_pylist()) == {
        "x.jsonl"
    }

    expected = [(i + 1, reason) for i, (_, reason) in enumerate(BAD_LINES) if reason]
    assert list(zip(q.column("record").to_pylist(), q.column("reason").to_pylist(), strict=True)) == expected
    rows = {r["record"]: r for r in q.to_pylist()}
    assert (
        rows[7]["detail"] == "line 7 of x.jsonl: no field 'text' (fields: body, id); set sources[].text_field"
    )
    assert rows[3]["raw"] == BAD_LINES[2][0]
    assert rows[5]["raw"] == BAD_LINES[4][0]
    assert "UTF-8" in rows[5]["detail"] and "surrogate" in rows[6]["detail"]
    assert all(r["detail"].startswith(f"line {r['record']} of x.jsonl") for r in rows.values())
    assert all(r["member"] is None for r in rows.values())

    assert info.records == 11  # 13 lines, 2 blank
    assert info.bytes == (tmp_path / "x.jsonl").stat().st_size
    assert info.revision == sha16(tmp_path / "x.jsonl")
    assert info.uri == "x.jsonl"


def test_jsonl_info_needs_a_full_read(tmp_path: Path) -> None:
    write_bad_jsonl(tmp_path / "x.jsonl")
    cfg = make_cfg(tmp_path, {"name": "web", "kind": "jsonl", "paths": ["x.jsonl"]})
    reader = read_shard(cfg, list_input_shards(cfg)[0])
    with pytest.raises(RuntimeError, match="fully read"):
        _ = reader.info


def test_jsonl_raw_is_capped_at_1024_bytes(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "' + b"x" * 5000 + b"\n")
    cfg = make_cfg(tmp_path, {"name": "web", "kind": "jsonl", "paths": ["x.jsonl"]})
    _, q, _ = read_all(cfg, list_input_shards(cfg)[0])
    assert q.column("reason").to_pylist() == ["malformed_json"]
    assert q.column("raw")[0].as_py() == (b'{"text": "' + b"x" * 5000)[:1024]


def test_jsonl_bom_and_crlf(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    cfg = make_cfg(tmp_path, {"name": "web", "kind": "jsonl", "paths": ["x.jsonl"]})
    docs, q, info = read_all(cfg, list_input_shards(cfg)[0])
    assert docs.column("text").to_pylist() == ["a", "b"]
    assert docs.column("record").to_pylist() == [1, 3]
    assert q.num_rows == 0 and info.records == 2
    assert fetch_document_text(cfg, "web", "x.jsonl", 1) == "a"


@pytest.mark.parametrize("ext", [".gz", ".zst"])
def test_jsonl_compressed_matches_plain(tmp_path: Path, ext: str) -> None:
    data = write_bad_jsonl(tmp_path / "plain.jsonl")
    packed = tmp_path / f"x.jsonl{ext}"
    packed.write_bytes(gzip.compress(data) if ext == ".gz" else zstandard.ZstdCompressor().compress(data))
    cfg = make_cfg(
        tmp_path,
        {"name": "a", "kind": "jsonl", "paths": ["plain.jsonl"]},
        {"name": "b", "kind": "jsonl", "paths": [f"*{ext}"]},
    )
    plain, packed_shard = list_input_shards(cfg)
    docs_a, q_a, _ = read_all(cfg, plain)
    docs_b, q_b, info = read_all(cfg, packed_shard)
    assert docs_b.column("text").equals(docs_a.column("text"))
    assert docs_b.column("record").equals(docs_a.column("record"))
    assert q_b.column("reason").equals(q_a.column("reason"))
    assert info.revision == sha16(packed) and info.bytes == packed.stat().st_size
    assert fetch_document_text(cfg, "b", packed_shard.uri, 12) == "no id here é😀"


def test_jsonl_multi_member_gzip_and_multi_frame_zstd(tmp_path: Path) -> None:
    part1 = b"".join(orjson.dumps({"text": f"doc {i}"}) + b"\n" for i in range(100))
    part2 = b"".join(orjson.dumps({"text": f"doc {i}"}) + b"\n" for i in range(100, 250))
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(part1) + gzip.compress(part2))
    z = zstandard.ZstdCompressor()
    (tmp_path / "m.jsonl.zst").write_bytes(z.compress(part1) + z.compress(part2))
    cfg = make_cfg(tmp_path, {"name": "m", "kind": "jsonl", "paths": ["m.jsonl.*"]})
    for shard in list_input_shards(cfg):
        docs, q, _ = read_all(cfg, shard)
        assert docs.column("text").to_pylist() == [f"doc {i}" for i in range(250)]
        assert q.num_rows == 0


@pytest.mark.parametrize("ext", [".gz", ".zst"])
def test_jsonl_truncated_stream_quarantined_once(tmp_path: Path, ext: str) -> None:
    rng = random.Random(1)
    lines = [orjson.dumps({"text": "".join(rng.choices("abcdefgh ", k=2000))}) for _ in range(400)]
    data = b"\n".join(lines) + b"\n"
    packed = gzip.compress(data) if ext == ".gz" else zstandard.ZstdCompressor().compress(data)
    (tmp_path / f"t.jsonl{ext}").write_bytes(packed[: len(packed) // 2])
    cfg = make_cfg(tmp_path, {"name": "t", "kind": "jsonl", "paths": [f"t.jsonl{ext}"]})
    docs, q, info = read_all(cfg, list_input_shards(cfg)[0], batch_bytes=64 << 10)
    assert 0 < docs.num_rows < 400
    assert docs.column("record").to_pylist() == list(range(1, docs.num_rows + 1))
    assert q.column("reason").to_pylist() == ["truncated_stream"]
    row = q.to_pylist()[0]
    assert row["record"] == docs.num_rows + 1
    assert f"t.jsonl{ext}" in row["detail"] and "Re-download" in row["detail"]
    assert lines[docs.num_rows].startswith(row["raw"][:100])
    assert info.records == docs.num_rows + 1
    with pytest.raises(DocumentNotFound):
        fetch_document_text(cfg, "t", f"t.jsonl{ext}", docs.num_rows + 1)
    assert (
        fetch_document_text(cfg, "t", f"t.jsonl{ext}", docs.num_rows)
        == orjson.loads(lines[docs.num_rows - 1])["text"]
    )


def test_jsonl_corrupt_gzip_is_truncated_stream(tmp_path: Path) -> None:
    data = b"".join(orjson.dumps({"text": f"document number {i} " * 50}) + b"\n" for i in range(300))
    packed = bytearray(gzip.compress(data))
    for i in range(len(packed) // 2, len(packed) // 2 + 64):
        packed[i] ^= 0x5A
    (tmp_path / "c.jsonl.gz").write_bytes(bytes(packed))
    cfg = make_cfg(tmp_path, {"name": "c", "kind": "jsonl", "paths": ["c.jsonl.gz"]})
    docs, q, _ = read_all(cfg, list_input_shards(cfg)[0])
    assert docs.num_rows < 300
    assert q.column("reason").to_pylist()[-1] == "truncated_stream"


@pytest.mark.parametrize("ext", ["", ".zst"])
def test_jsonl_10mb_single_line_document(tmp_path: Path, ext: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # small chunks: the line spans ~160 of them, which a quadratic join would make very slow
    monkeypatch.setattr(jsonl_mod, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(jsonl_mod, "COMPRESSED_CHUNK_BYTES", 64 << 10)
    big = "".join(random.Random(2).choices('abcdefghij \n"é', k=10_000_000))
    data = (
        orjson.dumps({"text": "short"}) + b"\n" + orjson.dumps({"text": big}) + b"\n" + b'{"text": "after"}\n'
    )
    path = tmp_path / f"big.jsonl{ext}"
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if ext else data)
    cfg = make_cfg(tmp_path, {"name": "big", "kind": "jsonl", "paths": [path.name]})
    t0 = time.perf_counter()
    docs, q, _ = read_all(cfg, list_input_shards(cfg)[0], batch_bytes=1 << 20)
    assert time.perf_counter() - t0 < 10
    assert q.num_rows == 0
    assert docs.column("text").to_pylist() == ["short", big, "after"]
    assert fetch_document_text(cfg, "big", path.name, 2) == big
    assert fetch_document_text(cfg, "big", path.name, 3) == "after"


def test_jsonl_batches_follow_batch_bytes(tmp_path: Path) -> None:
    lines = [orjson.dumps({"text": f"{i:04d} " + "y" * 1000}) for i in range(200)]
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = make_cfg(tmp_path, {"name": "b", "kind": "jsonl", "paths": ["b.jsonl"]})
    batches = list(read_shard(cfg, list_input_shards(cfg)[0], batch_bytes=20_000))
    assert len(batches) >= 9
    assert all(b.docs.num_rows <= 20 for b in batches)
    records = [r for b in batches for r in b.docs.column("record").to_pylist()]
    assert records == list(range(1, 201))


def test_jsonl_fetch_document_text(tmp_path: Path) -> None:
    rng = random.Random(3)
    texts = ["".join(rng.choices('abc é\n\t"\\', k=rng.randint(1, 3000))) + "z" for _ in range(500)]
    (tmp_path / "f.jsonl").write_bytes(b"".join(orjson.dumps({"text": t}) + b"\n" for t in texts))
    cfg = make_cfg(tmp_path, {"name": "f", "kind": "jsonl", "paths": ["f.jsonl"]})
    docs, _, _ = read_all(cfg, list_input_shards(cfg)[0])
    for rec in (1, 2, 250, 499, 500):
        assert (
            fetch_document_text(cfg, "f", "f.jsonl", rec)
            == docs.column("text")[rec - 1].as_py()
            == texts[rec - 1]
        )
    with pytest.raises(DocumentNotFound):
        fetch_document_text(cfg, "f", "f.jsonl", 501)


def test_jsonl_fetch_refuses_quarantined_lines(tmp_path: Path) -> None:
    write_bad_jsonl(tmp_path / "x.jsonl")
    cfg = make_cfg(tmp_path, {"name": "web", "kind": "jsonl", "paths": ["x.jsonl"]})
    assert fetch_document_text(cfg, "web", "x.jsonl", 13) == "last line has no newline"
    with pytest.raises(DocumentNotFound, match="missing_text_field"):
        fetch_document_text(cfg, "web", "x.jsonl", 7)
    with pytest.raises(DocumentNotFound, match="blank"):
        fetch_document_text(cfg, "web", "x.jsonl", 2)


# --- shard listing and config errors ----------------------------------------------------------------------


def test_shard_listing_is_deterministic(tmp_path: Path) -> None:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    names = ["data/b.jsonl", "data/a.jsonl", "data/sub/c.jsonl", "data/a2.jsonl.gz"]
    random.Random(4).shuffle(names)
    for n in names:
        (tmp_path / n).write_bytes(
            gzip.compress(b'{"text":"x"}\n') if n.endswith(".gz") else b'{"text":"x"}\n'
        )
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jsonl"
    outside.write_bytes(b'{"text":"x"}\n')
    try:
        cfg = make_cfg(
            tmp_path,
            {"name": "z", "kind": "jsonl", "paths": ["data/**/*.jsonl", "data/a*.jsonl*"]},
            {"name": "a", "kind": "jsonl", "paths": [str(outside)]},
        )
        first = list_input_shards(cfg)
        assert first == list_input_shards(cfg)
        assert [(s.source, s.uri, s.shard_id) for s in first] == [
            ("z", "data/a.jsonl", "z-00000"),
            ("z", "data/a2.jsonl.gz", "z-00001"),
            ("z", "data/b.jsonl", "z-00002"),
            ("z", "data/sub/c.jsonl", "z-00003"),
            ("a", outside.as_posix(), "a-00000"),
        ]
        assert [s.index for s in first] == [0, 1, 2, 3, 0]
        docs, _, _ = read_all(cfg, first[-1])
        assert docs.column("uri").to_pylist() == [outside.as_posix()]
    finally:
        outside.unlink()


def test_empty_glob_is_a_config_error(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, {"name": "w", "kind": "jsonl", "paths": ["nothing/*.jsonl"]})
    with pytest.raises(ConfigError, match=r"'nothing/\*\.jsonl' matches nothing"):
        list_input_shards(cfg)
    (tmp_path / "adir").mkdir()
    cfg = make_cfg(tmp_path, {"name": "w", "kind": "jsonl", "paths": ["adir"]})
    with pytest.raises(ConfigError, match="only directories"):
        list_input_shards(cfg)


# --- Parquet ----------------------------------------------------------------------------------------------


def write_parquet(path: Path) -> list[str | None]:
    texts: list[str | None] = [f"row {i} " + "w" * (i % 50) for i in range(100)]
    texts[5] = None
    texts[17] = ""
    texts[18] = " \n\t"
    ids = list(range(1000, 1100))
    ids_col = pa.array([None if i == 3 else v for i, v in enumerate(ids)], pa.int64())
    table = pa.table({"id": ids_col, "text": pa.array(texts, pa.string()), "other": pa.array([1.5] * 100)})
    pq.write_table(table, path, row_group_size=30)
    return texts


def test_parquet_reader(tmp_path: Path) -> None:
    texts = write_parquet(tmp_path / "p.parquet")
    cfg = make_cfg(tmp_path, {"name": "pq", "kind": "parquet", "paths": ["*.parquet"], "id_field": "id"})
    [shard] = list_input_shards(cfg)
    docs, q, info = read_all(cfg, shard, batch_bytes=500)
    kept = [i for i, t in enumerate(texts) if t and not t.isspace()]
    assert docs.column("record").to_pylist() == kept
    assert docs.column("text").to_pylist() == [texts[i] for i in kept]
    doc_ids = docs.column("doc_id").to_pylist()
    assert doc_ids[:4] == ["1000", "1001", "1002", "p.parquet#3"]
    assert list(zip(q.column("record").to_pylist(), q.column("reason").to_pylist(), strict=True)) == [
        (5, "missing_text_field"),
        (17, "empty_text"),
        (18, "empty_text"),
    ]
    assert q.column("detail")[0].as_py().startswith("row 5 of p.parquet")
    assert info.records == 100 and info.revision == sha16(tmp_path / "p.parquet")
    assert info.bytes == (tmp_path / "p.parquet").stat().st_size
    for rec in (0, 31, 64, 99):
        assert fetch_document_text(cfg, "pq", "p.parquet", rec) == texts[rec]
    with pytest.raises(DocumentNotFound, match="missing_text_field"):
        fetch_document_text(cfg, "pq", "p.parquet", 5)
    with pytest.raises(DocumentNotFound):
        fetch_document_text(cfg, "pq", "p.parquet", 100)


def test_parquet_invalid_utf8_quarantined(tmp_path: Path) -> None:
    offsets = pa.array([0, 3, 8, 11], pa.int32()).buffers()[1]
    arr = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"abcbad\xff!xyz")])
    pq.write_table(pa.table({"text": arr}), tmp_path / "u.parquet")
    cfg = make_cfg(tmp_path, {"name": "pq", "kind": "parquet", "paths": ["u.parquet"]})
    docs, q, _ = read_all(cfg, list_input_shards(cfg)[0])
    assert docs.column("text").to_pylist() == ["abc", "xyz"]
    assert q.to_pylist()[0]["reason"] == "invalid_utf8" and q.to_pylist()[0]["raw"] == b"bad\xff!"


def test_parquet_config_errors(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "nobody.parquet")
    cfg = make_cfg(tmp_path, {"name": "pq", "kind": "parquet", "paths": ["nobody.parquet"]})
    with pytest.raises(ConfigError) as err:
        list_input_shards(cfg)
    msg = str(err.value)
    assert "nobody.parquet" in msg and "'text'" in msg and "columns: body, n" in msg and "text_field" in msg

    cfg = make_cfg(
        tmp_path, {"name": "pq", "kind": "parquet", "paths": ["nobody.parquet"], "text_field": "n"}
    )
    with pytest.raises(ConfigError, match="not string"):
        list_input_shards(cfg)
    cfg = make_cfg(
        tmp_path,
        {"name": "pq", "kind": "parquet", "paths": ["nobody.parquet"], "text_field": "body", "id_field": "x"},
    )
    with pytest.raises(ConfigError, match="id_field"):
        list_input_shards(cfg)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    cfg = make_cfg(tmp_path, {"name": "pq", "kind": "parquet", "paths": ["junk.parquet"]})
    with pytest.raises(ConfigError, match=r"junk\.parquet is not a readable Parquet file"):
        list_input_shards(cfg)


# --- hf datasets --------------------------------------------------------------------------------------------


def test_hf_local_parquet_folder(tmp_path: Path) -> None:
    folder = tmp_path / "hfdata"
    folder.mkdir()
    all_texts = []
    for f in range(2):
        texts = [f"file {f} row {i}" for i in range(7)]
        if f == 1:
            texts[2] = ""
        all_texts.append(texts)
        pq.write_table(
            pa.table({"text": texts, "id": [f"{f}-{i}" for i in range(7)]}), folder / f"part-{f}.parquet"
        )
    cfg = make_cfg(tmp_path, {"name": "hub", "kind": "hf", "dataset": "hfdata", "id_field": "id"})
    shards = list_input_shards(cfg)
    assert [(s.uri, s.index, s.hf_num_shards, s.shard_id) for s in shards] == [
        ("hfdata", 0, 2, "hub-00000"),
        ("hfdata", 1, 2, "hub-00001"),
    ]
    for shard, texts in zip(shards, all_texts, strict=True):
        docs, q, info = read_all(cfg, shard, batch_bytes=40)
        uri = f"hfdata#shard={shard.index:05d}-of-00002"
        assert info.uri == uri and info.records == 7 and info.revision is None
        assert set(docs.column("uri").to_pylist()) == {uri}
        kept = [i for i, t in enumerate(texts) if t]
        assert docs.column("record").to_pylist() == kept
        assert docs.column("text").to_pylist() == [texts[i] for i in kept]
        assert docs.column("doc_id").to_pylist() == [f"{shard.index}-{i}" for i in kept]
        assert q.column("reason").to_pylist() == ([] if shard.index == 0 else ["empty_text"])
        assert fetch_document_text(cfg, "hub", uri, 6) == texts[6]
    with pytest.raises(DocumentNotFound):
        fetch_document_text(cfg, "hub", "hfdata#shard=00001-of-00002", 2)


def test_hf_save_to_disk_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = [f"saved {i}" for i in range(10)]
    texts[7] = "   "
    datasets.Dataset.from_dict({"content": texts, "n": list(range(10))}).save_to_disk(
        str(tmp_path / "saved"), num_shards=2
    )
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"content": ["v0", "v1"]})}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    cfg = make_cfg(
        tmp_path,
        {"name": "s", "kind": "hf", "dataset": "saved", "text_field": "content", "revision": "v1.0"},
        {"name": "d", "kind": "hf", "dataset": "saved_dict", "text_field": "content", "split": "validation"},
    )
    shards = list_input_shards(cfg)
    assert [(s.source, s.index, s.hf_num_shards) for s in shards] == [("s", 0, 2), ("s", 1, 2), ("d", 0, 1)]
    got: list[str] = []
    for shard in shards[:2]:
        docs, q, info = read_all(cfg, shard)
        got += docs.column("text").to_pylist()
        assert info.revision == "v1.0"
        if shard.index == 1:
            assert q.to_pylist()[0]["record"] == 2 and q.to_pylist()[0]["reason"] == "empty_text"
    assert got == [t for t in texts if t.strip()]
    assert fetch_document_text(cfg, "s", "saved#shard=00001-of-00002", 4) == "saved 9"
    docs, _, _ = read_all(cfg, shards[2])
    assert docs.column("text").to_pylist() == ["v0", "v1"]

    bad = make_cfg(tmp_path, {"name": "d", "kind": "hf", "dataset": "saved_dict", "split": "train"})
    with pytest.raises(ConfigError, match="no split 'train'"):
        list_input_shards(bad)


def test_hf_config_errors(tmp_path: Path) -> None:
    folder = tmp_path / "hfdata"
    folder.mkdir()
    pq.write_table(pa.table({"body": ["a"]}), folder / "part-0.parquet")
    cfg = make_cfg(tmp_path, {"name": "h", "kind": "hf", "dataset": "hfdata"})
    with pytest.raises(ConfigError, match=r"no column 'text' \(columns: body\); set sources\[\].text_field"):
        list_input_shards(cfg)
    (tmp_path / "empty").mkdir()
    cfg = make_cfg(tmp_path, {"name": "h", "kind": "hf", "dataset": "empty"})
    with pytest.raises(ConfigError, match="cannot be opened"):
        list_input_shards(cfg)


# --- code repositories ---------------------------------------------------------------------------------------


def write_repo(root: Path, files: dict[str, bytes | str]) -> None:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            p.write_text(content, encoding="utf-8")
        else:
            p.write_bytes(content)


REPO: dict[str, bytes | str] = {
    "README.md": "# demo\n",
    "app.py": "from pkg import util\nimport helpers\n\nprint(util.f())\n",
    "helpers.py": "X = 1\n",
    "pkg/__init__.py": "",
    "pkg/util.py": "from .core import thing\nfrom . import zeta\n\ndef f():\n    return thing\n",
    "pkg/core.py": "thing = 2",  # no final newline
    "pkg/zeta.py": "import os\n",
    "cyc_a.py": "import cyc_b\n",
    "cyc_b.py": "import cyc_a\n",
    "vendor/lib.py": "VENDORED = True\n",
    "node_modules/x/index.js": "module.exports = 1\n",
    ".hidden/secret.py": "HIDDEN = True\n",
    "logo.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "latin1.txt": b"caf\xe9\n",
    "big.txt": "z" * 3000,
}


def code_cfg(tmp_path: Path, **code: Any) -> BuildConfig:
    return make_cfg(
        tmp_path,
        {"name": "code", "kind": "code", "paths": ["repos/*"], "code": {"max_file_bytes": 2000, **code}},
    )


def headers(text: str) -> list[str]:
    return [
        line[len("# ===== ") : -len(" =====")] for line in text.split("\n") if line.startswith("# ===== ")
    ]


def test_code_repository_document(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_repo(tmp_path / "repos" / "demo", REPO)
    cfg = code_cfg(tmp_path)
    [shard] = list_input_shards(cfg)
    assert (shard.kind, shard.uri, shard.shard_id) == ("code", "repos/demo", "code-00000")
    with caplog.at_level(logging.INFO, logger="longloom.readers"):
        docs, q, info = read_all(cfg, shard)
    # vendor/, node_modules/ and .hidden/ are policy, not data: counted, not quarantined
    assert "9 files in the document, 3 quarantined, 3 skipped by policy" in caplog.text
    assert docs.num_rows == 1
    doc = docs.to_pylist()[0]
    assert (doc["record"], doc["doc_id"], doc["uri"]) == (0, "repos/demo", "repos/demo")
    order = headers(doc["text"])
    assert set(order) == {"README.md", "app.py", "helpers.py", "pkg/__init__.py", "pkg/util.py", "pkg/core.py",
                          "pkg/zeta.py", "cyc_a.py", "cyc_b.py"}  # fmt: skip
    pos = {p: i for i, p in enumerate(order)}
    assert pos["pkg/util.py"] < pos["app.py"] and pos["helpers.py"] < pos["app.py"]
    assert pos["pkg/core.py"] < pos["pkg/util.py"] and pos["pkg/zeta.py"] < pos["pkg/util.py"]
    assert order[0] == "README.md"  # no dependencies: path order
    assert order.index("cyc_a.py") < order.index("cyc_b.py")  # cycle broken at the smaller path
    assert "# ===== pkg/core.py =====\nthing = 2\n\n# ===== " in doc["text"]
    assert doc["text"].startswith("# ===== README.md =====\n# demo\n\n# ===== ")
    assert "VENDORED" not in doc["text"] and "HIDDEN" not in doc["text"]

    quarantined = {r["member"]: r for r in q.to_pylist()}
    assert {m: r["reason"] for m, r in quarantined.items()} == {
        "big.txt": "too_large",
        "latin1.txt": "invalid_utf8",
        "logo.png": "binary_file",
    }
    assert quarantined["logo.png"]["raw"] == REPO["logo.png"]
    assert all(r["record"] == 0 and "repos/demo" in r["detail"] for r in quarantined.values())
    assert "max_file_bytes" in quarantined["big.txt"]["detail"]
    # records identity for code: files in the document + quarantined files
    assert info.records == len(order) + len(quarantined) == 12
    assert info.revision == "sha256:" + hashlib.sha256(doc["text"].encode()).hexdigest()[:16]
    assert fetch_document_text(cfg, "code", "repos/demo", 0) == doc["text"]
    with pytest.raises(DocumentNotFound):
        fetch_document_text(cfg, "code", "repos/demo", 1)

    # deterministic: a second read gives the same bytes
    again, _, _ = read_all(cfg, shard)
    assert again.column("text").to_pylist() == [doc["text"]]


def test_code_include_extensions_and_empty_repository(tmp_path: Path) -> None:
    write_repo(tmp_path / "repos" / "a", {"x.py": "import y\n", "y.py": "Y = 1\n", "notes.md": "hi\n"})
    write_repo(tmp_path / "repos" / "b", {"img.bin": b"\x00\x01\x02", "vendor/v.py": "pass\n"})
    cfg = code_cfg(tmp_path, include_extensions=["py"])
    a, b = list_input_shards(cfg)
    docs, q, _ = read_all(cfg, a)
    assert headers(docs.column("text")[0].as_py()) == ["y.py", "x.py"] and q.num_rows == 0

    docs, q, info = read_all(make_cfg(tmp_path, {"name": "code", "kind": "code", "paths": ["repos/b"]}), b)
    assert docs.num_rows == 0
    assert q.column("reason").to_pylist() == ["binary_file", "empty_repository"]
    assert q.column("member").to_pylist() == ["img.bin", None]
    assert info.records == 1 and info.revision is None


def test_code_git_revision(tmp_path: Path) -> None:
    repo = tmp_path / "repos" / "g"
    write_repo(repo, {"m.py": "M = 1\n"})
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".git" / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha} refs/heads/main\n")
    cfg = code_cfg(tmp_path)
    [shard] = list_input_shards(cfg)
    docs, _, info = read_all(cfg, shard)
    assert info.revision == sha
    assert headers(docs.column("text")[0].as_py()) == ["m.py"]  # .git itself is never read
    loose = "fedcba9876543210fedcba9876543210fedcba98"
    (repo / ".git" / "refs" / "heads" / "main").write_text(loose + "\n")
    _, _, info = read_all(cfg, shard)
    assert info.revision == loose


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary to make a real checkout")
def test_code_git_revision_of_a_real_checkout(tmp_path: Path) -> None:
    repo = tmp_path / "repos" / "real"
    write_repo(repo, {"m.py": "M = 1\n"})
    ident = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env = {**os.environ, **ident}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(repo), *args], check=True, capture_output=True, env=env, text=True
        )

    run("init", "-q")
    run("add", ".")
    run("commit", "-qm", "init")
    head = run("rev-parse", "HEAD").stdout.strip()
    cfg = code_cfg(tmp_path)
    _, _, info = read_all(cfg, list_input_shards(cfg)[0])
    assert info.revision == head


def test_code_path_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "repos").mkdir()
    (tmp_path / "repos" / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"repos/file.txt .* is not a directory"):
        list_input_shards(code_cfg(tmp_path))
    cfg = make_cfg(tmp_path, {"name": "code", "kind": "code", "paths": ["missing/*"]})
    with pytest.raises(ConfigError, match="matches nothing"):
        list_input_shards(cfg)


def test_python_import_resolution() -> None:
    files = {
        "src/lib/__init__.py": "",
        "src/lib/a.py": "from lib.b import g\nfrom ..top import t\n",
        "src/lib/b.py": "from . import c\nimport lib.sub.d as d\n",
        "src/lib/c.py": "",
        "src/lib/sub/__init__.py": "from .d import *\n",
        "src/lib/sub/d.py": "from .. import c\n",
        "scripts/run.py": "import tool\nimport lib\n",
        "scripts/tool.py": "import json\n",
        "broken.py": "def (:\n",
    }
    index = ModuleIndex(files)
    deps = {p: imports_of(p, src, index) for p, src in files.items()}
    assert deps["src/lib/a.py"] == {"src/lib/b.py"}  # ..top climbs to src/, which has no top.py
    assert deps["src/lib/b.py"] == {"src/lib/c.py", "src/lib/sub/d.py"}
    assert deps["src/lib/sub/__init__.py"] == {"src/lib/sub/d.py"}
    assert deps["src/lib/sub/d.py"] == {"src/lib/c.py"}
    assert deps["scripts/run.py"] == {"scripts/tool.py", "src/lib/__init__.py"}
    assert deps["scripts/tool.py"] == set() and deps["broken.py"] == set()

    # a repository folder that is itself the package `mypkg`
    pkg = {
        "__init__.py": "from mypkg.b import x\n",
        "a.py": "from mypkg import b\nimport mypkg\n",
        "b.py": "",
    }
    index = ModuleIndex(pkg, root_package="mypkg")
    assert imports_of("a.py", pkg["a.py"], index) == {"b.py", "__init__.py"}
    assert imports_of("__init__.py", pkg["__init__.py"], index) == {"b.py"}


def test_dependency_order_breaks_cycles_deterministically() -> None:
    paths = ["a.py", "b.py", "c.py", "d.py", "e.md"]
    deps = {"a.py": {"d.py"}, "b.py": {"c.py"}, "c.py": {"b.py"}, "d.py": {"c.py"}}
    order = dependency_order(paths, deps)
    assert order == dependency_order(list(reversed(paths)), deps)
    assert sorted(order) == paths
    # e.md waits on nothing; the cycle {b, c} is released at b; d follows c; a follows d
    assert order == ["e.md", "b.py", "c.py", "d.py", "a.py"]
