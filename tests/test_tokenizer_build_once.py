"""Issue 19 item 1: the exact default tokenizer is built once per process, and only where it encodes.

Building `fastokens:llama3` (its 280,147-merge tokenizer.json through `from_json_str`) takes seconds;
these tests count the real constructions by wrapping the library's constructors.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import fastokens
import pytest
import tokenizers

import pipeline.core.tokenizer as tokmod
from schemas.config import parse_config

NAME = "fastokens:llama3"


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Empty per-process caches, and counts of fastokens / Hugging Face tokenizer.json loads."""
    counts = {"fastokens": 0, "hf": 0}
    monkeypatch.setattr(tokmod, "_CACHE", {})
    monkeypatch.setattr(tokmod, "_SHARED", {}, raising=False)
    monkeypatch.setattr(tokmod, "_REFERENCES", {})
    fast_from_json = fastokens.Tokenizer.from_json_str
    hf_from_str = tokenizers.Tokenizer.from_str

    def fast(*args: Any, **kwargs: Any) -> Any:
        counts["fastokens"] += 1
        return fast_from_json(*args, **kwargs)

    def hf(*args: Any, **kwargs: Any) -> Any:
        counts["hf"] += 1
        return hf_from_str(*args, **kwargs)

    monkeypatch.setattr(fastokens.Tokenizer, "from_json_str", fast)
    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", hf)
    return counts


TEXT = "And the priests were girding themselves with sackcloth. naïve café — 日本語 😀"


def test_one_build_whatever_the_piece_size_or_threads(builds: dict[str, int]) -> None:
    a = tokmod.load_tokenizer(NAME, 65_536, 0)
    b = tokmod.load_tokenizer(NAME, 4_096, 1)
    assert a is not b  # two configurations ...
    assert a.encode(TEXT).tolist() == b.encode(TEXT).tolist()
    assert builds["fastokens"] == 1  # ... over one vocabulary built once


def test_concurrent_first_use_builds_once(builds: dict[str, int]) -> None:
    """Task threads that ask for the tokenizer at the same moment wait for one build."""
    barrier = threading.Barrier(3)
    got: list[Any] = []

    def use() -> None:
        barrier.wait()
        tok = tokmod.load_tokenizer(NAME)
        got.append((tok, tok.encode(TEXT).tolist()))

    threads = [threading.Thread(target=use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and len({id(t) for t, _ in got}) == 1
    assert len({tuple(ids) for _, ids in got}) == 1
    assert builds["fastokens"] == 1


def test_what_does_not_encode_never_builds_it(builds: dict[str, int]) -> None:
    """Preflight's checks, the manifest's identity, span tables and decoding come from tiktoken's tables:
    a process doing only those (a Dask flow process, `longloom validate`, `longloom card`) builds nothing."""
    tok = tokmod.load_tokenizer(NAME)
    assert tok.special_token_id(tok.end_of_text) == 128001
    assert tok.identity.n_vocab == 128_256
    assert int(tok.token_nbytes.sum()) > 0
    assert tok.decode(tokmod.load_tokenizer("tiktoken:llama3").encode(TEXT)) == TEXT
    assert builds["fastokens"] == 0
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert builds["fastokens"] == 1


def test_prefetch_builds_in_the_background_and_encoding_waits_for_it(builds: dict[str, int]) -> None:
    tok = tokmod.load_tokenizer(NAME)
    tok.prefetch()
    tok.prefetch()  # idempotent
    assert tok.encode(" girding").tolist() == [342, 2668, 287]  # Meta's ids (README, Tokenizers)
    assert builds["fastokens"] == 1


def test_verify_reference_needs_no_second_tokenizer_json(builds: dict[str, int]) -> None:
    """`tokenizer.verify` for fastokens uses tiktoken over the same ranks (independent: rank-based BPE
    against fastokens' merge list), not a second load of the tokenizer.json into HF `tokenizers`."""
    tok = tokmod.load_tokenizer(NAME)
    ref = tok.reference()
    assert ref is not None
    name, encode = ref
    assert "tiktoken" in name
    # it is a real reference: Meta's ids where quicktok's inexact encoder differs
    assert encode(" girding") == [342, 2668, 287]
    assert tokmod.QuicktokTokenizer("llama3", "quicktok:llama3").encode(" girding").tolist() != [
        342,
        2668,
        287,
    ]
    assert builds["hf"] == 0


def test_cli_prefetches_only_where_the_process_tokenizes(builds: dict[str, int], tmp_path: Path) -> None:
    from flows.cli import prefetch_tokenizer

    def cfg(runner: str) -> Any:
        data = {
            "run": {"name": "t", "task_runner": runner},
            "sources": [{"name": "s", "kind": "jsonl", "paths": ["x.jsonl"]}],
            "packing": {"targets": [{"length": 256}]},
            "output": {"dir": str(tmp_path / "out")},
        }
        return parse_config(data, base_dir=tmp_path)

    prefetch_tokenizer(cfg("dask"))
    tok = tokmod.load_tokenizer(NAME)
    assert isinstance(tok, tokmod.FastokensTokenizer)
    assert not tok._fast_build.started  # the flow process of a Dask run never tokenizes
    prefetch_tokenizer(cfg("threads"))
    assert tok._fast_build.started
