"""The default tokenizer gives Meta's Llama-3 ids, checked against references it does not share code
or files with (Meta's tokenizer.json through Hugging Face `tokenizers`, and tiktoken over the ranks of
Meta's tokenizer.model): on every distinct word of a real corpus, on whole documents, on adversarial
inputs, and on long documents cut into pieces."""

from __future__ import annotations

import base64
import json
import random

import numpy as np
import pytest

from pipeline.core.tokenizer import (
    LLAMA3_PATTERN,
    bundled_ranks,
    bundled_specials,
    hf_bpe_from_ranks,
    load_tokenizer,
    split_points,
)
from schemas.config import TokenizerConfig
from tests.token_reference import (
    distinct_words,
    meta_hf,
    meta_llama3_dir,
    meta_tiktoken,
    real_documents,
    reference_ids,
    reference_word_ids,
)

DEFAULT = TokenizerConfig().name


def _first_difference(got: list[int], want: list[int]) -> int:
    return next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
    )


def assert_same_ids(
    texts: list[str], got_ids: np.ndarray, offsets: np.ndarray, want: list[list[int]]
) -> None:
    bad = [i for i in range(len(texts)) if got_ids[offsets[i] : offsets[i + 1]].tolist() != want[i]]
    if bad:
        i = bad[0]
        got = got_ids[offsets[i] : offsets[i + 1]].tolist()
        pos = _first_difference(got, want[i])
        raise AssertionError(
            f"{len(bad)} of {len(texts)} texts differ; first {texts[i][:80]!r} at token {pos}: "
            f"{got[pos : pos + 4]} vs reference {want[i][pos : pos + 4]}"
        )


def test_the_two_references_agree_and_know_the_canonical_merge() -> None:
    assert meta_hf().encode(" girding", add_special_tokens=False).ids == [342, 2668, 287]
    assert meta_tiktoken().encode_ordinary(" girding") == [342, 2668, 287]
    # a token no merge sequence reaches: tiktoken (Meta's tokenizer.py) keeps the pre-token whole
    assert meta_hf().encode(" Insecta", add_special_tokens=False).ids == [114843]
    assert meta_tiktoken().encode_ordinary(" Insecta") == [114843]
    words = list(distinct_words())[::7]
    assert reference_ids(words) == meta_tiktoken().encode_ordinary_batch(words)


def test_bundled_vocabulary_is_metas() -> None:
    """The default's ranks and special tokens are those of Meta's files."""
    assert bundled_ranks("llama3") == meta_tiktoken()._mergeable_ranks
    added = {t.content: i for i, t in meta_hf().get_added_tokens_decoder().items()}
    specials = bundled_specials("llama3")
    for name in (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ):
        assert specials[name] == added[name]
    assert sorted(specials.values()) == list(range(128_000, 128_256))


def test_derived_merges_are_metas_tokenizer_json() -> None:
    """The merge list the fast backend and the verify reference run, derived here from the bundled
    ranks, is exactly the vocabulary and merge list of Meta's tokenizer.json."""
    ours = json.loads(hf_bpe_from_ranks(bundled_ranks("llama3"), LLAMA3_PATTERN).to_str())["model"]
    meta = json.loads((meta_llama3_dir() / "tokenizer.json").read_text())["model"]

    def pairs(merges: list) -> list[tuple[str, ...]]:
        return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]

    assert ours["vocab"] == meta["vocab"]
    assert pairs(ours["merges"]) == pairs(meta["merges"])


@pytest.mark.parametrize("name", sorted({DEFAULT, "tiktoken:llama3", "fastokens:llama3"}))
def test_default_equals_reference_on_every_distinct_word(name: str) -> None:
    words, want = reference_word_ids()
    assert len(words) > 50_000
    ids, offsets = load_tokenizer(name).encode_batch(words)
    assert_same_ids(words, ids, offsets, want)


def test_default_equals_reference_on_whole_documents() -> None:
    docs = list(real_documents())
    assert len(docs) > 1000
    ids, offsets = load_tokenizer(DEFAULT).encode_batch(docs)
    assert_same_ids(docs, ids, offsets, reference_ids(docs))


def adversarial() -> list[str]:
    rng = random.Random(11)
    specials = (
        "<|begin_of_text|><|end_of_text|> <|eot_id|><|endoftext|><|start_header_id|>user<|end_header_id|>"
    )
    return [
        "abcdefghij" * 7000,  # one 70K-character pre-token
        "x" * 20_000,
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(30_000)),
        base64.b64encode(rng.randbytes(60_000)).decode(),
        "0123456789" * 3000,
        specials * 50,
        "日本語のテキストと中文文本，한국어 텍스트。" * 300,  # CJK with no spaces
        "mixed Ελληνικά русский עברית العربية हिन्दी ไทย 😀👍🏽 e\u0301 ＡＢＣ１２３ " * 200,
        "\n\n \t \r\n  x\u00a0\u2028y \u3000z" * 500,
        " girding girded GIRDING girdeth" * 100,
        "function a(b){return b.map(function(c){return c*2}).filter(Boolean)};var d=a([1,2,3]);" * 800,
        "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(20_000)),
    ]


@pytest.mark.parametrize("name", sorted({DEFAULT, "tiktoken:llama3", "fastokens:llama3"}))
def test_default_equals_reference_on_adversarial_inputs(name: str) -> None:
    texts = adversarial()
    ids, offsets = load_tokenizer(name).encode_batch(texts)
    assert_same_ids(texts, ids, offsets, reference_ids(texts))


# --- long documents cut into pieces (item 11.2) ---------------------------------------------------------------


def long_inputs() -> dict[str, str]:
    rng = random.Random(5)
    js = "".join(
        f"function f{i}(a,b){{var c=a+b*{i};if(c>{i % 7}){{return c}}else{{return g(a,'s{i}')}}}};"
        for i in range(10_000)
    )
    cjk = "".join(
        rng.choice(
            "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"
        )
        for _ in range(200_000)
    )
    prose = "\n".join(real_documents()[:400])
    return {
        "5 MB base64 run (no space or line break)": base64.b64encode(rng.randbytes(3_750_000)).decode(),
        "minified JS": js,
        "long CJK paragraph": cjk,
        "letters only": "abcdefghij" * 7000,
        "prose and code (cut points exist)": prose,
    }


@pytest.mark.parametrize("kind", list(long_inputs()))
def test_long_documents_give_whole_document_ids(kind: str) -> None:
    text = long_inputs()[kind]
    tok = load_tokenizer(DEFAULT, max_piece_chars=4096)
    assert len(text) > 4096
    got = tok.encode(text).tolist()
    # Hugging Face's BPE is slow on one multi-megabyte document; tiktoken over Meta's own files is the
    # reference there (Meta's tokenizer.py is exactly that)
    want = meta_tiktoken().encode_ordinary(text) if len(text) > 1_000_000 else reference_ids([text])[0]
    assert got == want, f"{kind}: first difference at token {_first_difference(got, want)}"
    if kind.startswith("prose"):
        assert len(split_points(text, 4096)) > 20  # the cutting path was exercised


def test_cut_points_are_pre_token_boundaries() -> None:
    """Every cut split_points makes in real text is a boundary of Meta's pre-tokenizer on the whole text."""
    import regex

    pattern = meta_tiktoken()._pat_str
    for text in real_documents()[:300]:
        if len(text) < 3000:
            continue
        cuts = split_points(text, 1024)
        ends = {m.end() for m in regex.finditer(pattern, text)}
        assert set(cuts) <= ends


def test_old_splitting_bug_is_gone() -> None:
    """Issue 11 item 2: 'abcdefghij' * 7000 gave 14,001 ids in pieces where the whole gives 14,000."""
    assert len(load_tokenizer(DEFAULT).encode("abcdefghij" * 7000)) == 14_000
