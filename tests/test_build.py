"""End-to-end build on real text: exact lengths, lineage that re-extracts, loadable output, reconciliation."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.build import run_build
from pipeline.readers import fetch_document_text
from pipeline.stages.prepare import tokenizer_for
from schemas.config import BuildConfig, ConfigError, load_config, parse_config
from schemas.manifest import Manifest
from schemas.records import row_schema
from tests.conftest import DATA, make_config, sample_dict


@pytest.fixture(scope="module")
def sample_run(sample_build: tuple[BuildConfig, Manifest]) -> tuple[BuildConfig, Manifest]:
    """The session's build of the sample config (conftest), read-only."""
    return sample_build


def test_rows_have_exact_lengths_and_the_schema(sample_run: tuple[BuildConfig, Manifest]) -> None:
    cfg, manifest = sample_run
    assert manifest.ok, [c for c in manifest.checks if not c.ok]
    assert {t.target_length for t in manifest.targets} == {16384, 65536}
    for t in manifest.targets:
        for shard in t.shards:
            table = pq.read_table(Path(cfg.output.dir) / shard.path)
            assert table.schema.equals(row_schema(True, cfg.output.boundary_columns), check_metadata=False)
            lengths = np.array([len(x) for x in table.column("input_ids").to_pylist()])
            assert np.all(lengths == t.target_length)
            assert np.all(table.column("length").to_numpy() == t.target_length)
            lineage = table.column("lineage").to_pylist()[0]
            assert (
                lineage["tokenizer"] == "fastokens:llama3"
                and lineage["config_hash"] == manifest.row_config_hashes["pretraining"]
            )
            assert "best_fit@2" in lineage["steps"] and "exact_dedup@1" in lineage["steps"]


def test_segments_tile_each_row(sample_run: tuple[BuildConfig, Manifest]) -> None:
    cfg, manifest = sample_run
    tok = tokenizer_for(cfg)
    sep = tok.special_token_id(cfg.packing.separator)
    for t in manifest.targets:
        for row in pq.read_table(Path(cfg.output.dir) / t.shards[0].path).to_pylist():
            pos = 0
            for s in row["segments"]:
                assert s["row_token_start"] == pos
                pos = s["row_token_end"]
                if s["separator_after"]:
                    assert row["input_ids"][pos] == sep
                    pos += 1
            assert pos + row["n_pad"] == t.target_length
            assert all(x == sep for x in row["input_ids"][pos:])


def test_every_segment_reextracts_from_its_input(sample_run: tuple[BuildConfig, Manifest]) -> None:
    """Re-read each document from the original input by its recorded location, and check that its
    spans give back exactly the row's tokens (ids, bytes and characters)."""
    cfg, manifest = sample_run
    tok = tokenizer_for(cfg)
    texts: dict[tuple[str, str, int], str] = {}
    checked = split_checked = 0
    for t in manifest.targets:
        for shard in t.shards:
            for row in pq.read_table(
                Path(cfg.output.dir) / shard.path, columns=["input_ids", "segments"]
            ).to_pylist():
                ids = np.array(row["input_ids"], np.int32)
                for s in row["segments"]:
                    key = (s["source"], s["uri"], s["record"])
                    if key not in texts:
                        texts[key] = fetch_document_text(cfg, *key)
                    text = texts[key]
                    assert hashlib.sha256(text.encode()).hexdigest() == s["content_hash"]
                    piece = ids[s["row_token_start"] : s["row_token_end"]]
                    doc_ids = tok.encode(text)
                    assert len(doc_ids) == s["doc_tokens"]
                    assert np.array_equal(doc_ids[s["doc_token_start"] : s["doc_token_end"]], piece)
                    raw = text.encode()
                    assert raw[s["byte_start"] : s["byte_end"]] == tok.decode_bytes(piece)
                    if not s["is_split"]:
                        # a whole document: its text tokenizes to exactly the row's span
                        assert np.array_equal(tok.encode(text[s["char_start"] : s["char_end"]]), piece)
                        assert (s["char_start"], s["char_end"]) == (0, len(text))
                    else:
                        try:
                            piece_text = tok.decode_bytes(piece).decode("utf-8")
                        except UnicodeDecodeError:  # a cut inside a multi-byte character
                            piece_text = None
                        if piece_text is not None:
                            assert text[s["char_start"] : s["char_end"]] == piece_text
                            split_checked += 1
                    checked += 1
    assert checked > 2000 and split_checked >= 10


def test_output_loads_with_datasets_and_pyarrow(sample_run: tuple[BuildConfig, Manifest]) -> None:
    cfg, manifest = sample_run
    out = Path(cfg.output.dir)
    for t in manifest.targets:
        ds = datasets.load_dataset(str(out), t.config_name, split="train")
        assert ds.num_rows == t.rows
        assert len(ds[0]["input_ids"]) == t.target_length
        assert pads.dataset(out / "data" / t.config_name, format="parquet").count_rows() == t.rows
    default = datasets.load_dataset(str(out), split="train")
    assert default.num_rows == manifest.targets[0].rows
    filtered = datasets.load_dataset(str(out), "audit_filtered", split="train")
    assert filtered.num_rows == sum(sum(c.filtered.values()) for c in manifest.sources.values())


def test_manifest_counts_and_shards(sample_run: tuple[BuildConfig, Manifest]) -> None:
    cfg, manifest = sample_run
    out = Path(cfg.output.dir)
    on_disk = Manifest.model_validate_json((out / "manifest.json").read_text())
    assert on_disk == manifest
    wiki = manifest.sources["wiki"]
    assert wiki.records_read == 3020
    assert wiki.filtered.get("exact_duplicate", 0) + wiki.filtered.get("short_doc_downsampled", 0) >= 20
    assert manifest.sources["bible"].filtered["source_budget"] > 0
    assert manifest.sources["bible"].kept_tokens <= 600_000
    for t in manifest.targets:
        for s in t.shards:
            assert hashlib.sha256((out / s.path).read_bytes()).hexdigest() == s.sha256


def test_filtered_rows_say_why(sample_run: tuple[BuildConfig, Manifest]) -> None:
    cfg, _ = sample_run
    rows = datasets.load_dataset(cfg.output.dir, "audit_filtered", split="train").to_list()
    dups = [r for r in rows if r["reason"] == "exact_duplicate"]
    assert dups and all(r["duplicate_of"] and r["step"] == "exact_dedup@1" for r in dups)
    assert all(r["detail"] for r in rows)
    assert {r["reason"] for r in rows} >= {"exact_duplicate", "short_doc_downsampled", "source_budget"}


def test_several_targets_with_budgets(tmp_path: Path) -> None:
    packing = sample_dict()["packing"] | {
        "strategy": "greedy",
        "targets": [{"length": 4096, "token_budget": 200_000}, {"length": 32768, "token_budget": 400_000}],
    }
    cfg = make_config(tmp_path / "out", packing=packing)
    m = run_build(cfg)
    assert m.ok
    by_len = {t.target_length: t for t in m.targets}
    # a target takes documents until its budget is reached (the last one may overshoot by one document)
    assert 200_000 <= by_len[4096].content_tokens < 200_000 + 130_000
    assert 400_000 <= by_len[32768].content_tokens < 400_000 + 130_000
    assert any(c.filtered.get("target_budgets_full") for c in m.sources.values())


def test_last_row_drop_is_accounted(tmp_path: Path) -> None:
    packing = sample_dict()["packing"] | {"last_row": "drop", "targets": [{"length": 65536}]}
    cfg = make_config(tmp_path / "out", packing=packing)
    m = run_build(cfg)
    assert m.ok
    t = m.targets[0]
    # no final padded row; rows that no allowed cut could fill end in a little padding (issue 12.1)
    assert t.dropped_tail_tokens > 0
    assert t.pad_tokens < 2 * cfg.packing.min_piece_tokens * sum(s.rows for s in t.shards)
    partly = sum(c.dropped_tail_tokens for c in m.sources.values())
    wholly = sum(c.filtered_tokens.get("last_row_dropped", 0) for c in m.sources.values())
    assert partly + wholly == t.dropped_tail_tokens


def write_bad_inputs(folder: Path) -> None:
    folder.mkdir(parents=True)
    good = {"id": "g1", "text": "A perfectly ordinary document about rivers and the sea. " * 20}
    huge = {"id": "huge", "text": ("Ten megabytes of prose, line after line.\n" * 260_000)[:10_000_000]}
    lines = [
        json.dumps(good).encode(),
        b'{"id": "broken", "text": "no closing brace"',
        b'{"id": "bad-utf8", "text": "caf\xe9 au lait"}',
        json.dumps({"id": "no-text", "body": "where is the text field"}).encode(),
        json.dumps({"id": "empty", "text": "   "}).encode(),
        json.dumps({"id": "special", "text": "the literal <|end_of_text|> is just text here " * 5}).encode(),
        json.dumps(huge).encode(),
    ]
    with gzip.open(folder / "bad.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    repo = folder / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("from pkg.util import helper\n")
    (repo / "pkg" / "util.py").write_text("def helper():\n    return 42\n")
    (repo / "pkg" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))


def test_bad_input_is_quarantined_and_reconciled(tmp_path: Path) -> None:
    write_bad_inputs(tmp_path / "in")
    data = {
        "sources": [
            {"name": "messy", "kind": "jsonl", "paths": ["in/*.jsonl.gz"], "id_field": "id"},
            {"name": "repo", "kind": "code", "paths": ["in/repo"]},
        ],
        "packing": {"targets": [{"length": 8192}]},
        "output": {"dir": str(tmp_path / "out")},
    }
    cfg = parse_config(data, base_dir=tmp_path)
    m = run_build(cfg)
    assert m.ok, [c for c in m.checks if not c.ok]
    messy = m.sources["messy"]
    assert messy.records_read == 7
    assert messy.quarantined == {
        "malformed_json": 1,
        "invalid_utf8": 1,
        "missing_text_field": 1,
        "empty_text": 1,
    }
    assert messy.documents == 3 and messy.kept == 3
    assert m.sources["repo"].quarantined == {"binary_file": 1}
    q = datasets.load_dataset(str(tmp_path / "out"), "audit_quarantine", split="train").to_list()
    by_reason = {r["reason"]: r for r in q}
    assert by_reason["malformed_json"]["record"] == 2 and "bad.jsonl.gz" in by_reason["malformed_json"]["uri"]
    assert by_reason["binary_file"]["member"].endswith("logo.png")
    assert all(r["detail"] for r in q)
    # the 10 MB document is packed whole, split across rows, never truncated
    huge_tokens = len(
        tokenizer_for(cfg).encode(("Ten megabytes of prose, line after line.\n" * 260_000)[:10_000_000])
    )
    rows = pq.read_table(tmp_path / "out" / m.targets[0].shards[0].path, columns=["segments"]).to_pylist()
    placed = sum(
        s["doc_token_end"] - s["doc_token_start"]
        for r in rows
        for s in r["segments"]
        if s["doc_id"] == "huge"
    )
    assert placed == huge_tokens
    # special-token text inside a document never becomes the special id
    sep = tokenizer_for(cfg).special_token_id("<|end_of_text|>")
    ids = pq.read_table(tmp_path / "out" / m.targets[0].shards[0].path, columns=["input_ids", "n_pad"])
    n_docs_and_pieces = sum(1 for r in rows for s in r["segments"] if s["separator_after"])
    n_sep = sum(int((np.array(x) == sep).sum()) for x in ids.column("input_ids").to_pylist())
    assert n_sep == n_docs_and_pieces + sum(ids.column("n_pad").to_pylist())


def test_bad_config_fails_before_any_work(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "sources: [{name: a, kind: jsonl, paths: ['x.jsonl']}]\n"
        "packing: {strategy: fastest, targets: [{length: 1024}]}\n"
        "output: {dir: " + str(tmp_path / "out") + "}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "packing.strategy" in msg and "'greedy', 'best_fit' or 'similarity'" in msg and "fastest" in msg
    bad.write_text(
        "sources: [{name: a, kind: jsonl, paths: ['x.jsonl'], txt_field: body}]\npacking: {targets: [{length: 1024}]}\n"
    )
    with pytest.raises(ConfigError, match=r"sources\.0\.txt_field: unknown field"):
        load_config(bad)
    bad.write_text(
        "sources: [{name: a, kind: jsonl, paths: ['missing/*.jsonl']}]\npacking: {targets: [{length: 1024}]}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    with pytest.raises(ConfigError, match="missing"):
        run_build(load_config(bad))
    assert not (tmp_path / "out").exists()


def test_sample_config_is_the_default(tmp_path: Path) -> None:
    import flows

    assert flows.DEFAULT_CONFIG == DATA / "sample.yaml"
    assert load_config(flows.DEFAULT_CONFIG).packing.targets
