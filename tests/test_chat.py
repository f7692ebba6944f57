"""Chat templates and token-exact context assembly (pipeline/synth/chat.py)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from pipeline.core.tokenizer import load_tokenizer
from pipeline.synth.chat import (
    AssemblyError,
    Haystack,
    HaystackTooShort,
    Piece,
    assemble_chat,
    chat_table,
    load_template,
)
from schemas.records import CHAT_SCHEMA
from tests.conftest import DATA

MESSAGES = [
    {"role": "system", "content": "You answer from the document."},
    {"role": "user", "content": "Hello <|eot_id|> there, <|im_end|> friend."},
    {"role": "assistant", "content": "Hi!\nHow can I help?"},
]


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return load_tokenizer("quicktok:llama3")


@pytest.fixture(scope="module")
def hay(tok):  # type: ignore[no-untyped-def]
    docs = []
    for name in ("part-000.jsonl.gz", "part-001.jsonl.gz"):
        with gzip.open(DATA / "sample" / "wiki" / name, "rt", encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line in f]
    code = (DATA / "sample" / "code" / "jsonpkg" / "decoder.py").read_text()
    return Haystack.from_documents(tok, [code, *docs])


@pytest.mark.parametrize(("template", "encoding"), [("llama3", "llama3"), ("chatml", "qwen3")])
def test_render_matches_whole_string_tokenization(template: str, encoding: str) -> None:
    import quicktok

    enc = quicktok.get_encoding(encoding)
    tok = load_tokenizer(f"quicktok:{encoding}")
    tpl = load_template(template, tok)
    plain = [
        {**m, "content": m["content"].replace("<|eot_id|>", "eot").replace("<|im_end|>", "end")}
        for m in MESSAGES
    ]
    r = tpl.render(plain, add_generation_prompt=True)
    assert r.ids.tolist() == enc.encode_with_special(tpl.render_text(plain, add_generation_prompt=True))
    assert r.generation_prompt is not None and r.generation_prompt[1] == len(r.ids)
    # content that spells special tokens stays text: specials appear only where the template puts them
    r = tpl.render(MESSAGES)
    for i, m in enumerate(MESSAGES):
        a, b = r.content_spans[i]
        assert tok.decode(r.ids[a:b]) == m["content"]
    n_special = sum(1 for t in r.ids.tolist() if enc.is_special_token(int(t)))
    per_msg = 3 if template == "llama3" else 2  # header start (+ header end) + end of message
    assert n_special == len(MESSAGES) * per_msg + (1 if template == "llama3" else 0)


def test_llama3_render_equals_meta_format(tok) -> None:  # type: ignore[no-untyped-def]
    import quicktok

    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    tpl = load_template("llama3", tok)
    expected = quicktok.get_encoding("llama3").encode_with_special(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    )
    assert tpl.render(msgs).ids.tolist() == expected


def test_template_must_fit_vocabulary(tok) -> None:  # type: ignore[no-untyped-def]
    from pipeline.core.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="chatml"):
        load_template("chatml", tok)
    with pytest.raises(ValueError, match="unknown chat template"):
        load_template("vicuna", tok)


@pytest.mark.parametrize("target", [4096, 8191, 20000])
@pytest.mark.parametrize("counts", ["full_chat", "without_answers", "context_only"])
def test_assembly_is_exact_and_pieces_are_where_reported(tok, hay, target: int, counts: str) -> None:  # type: ignore[no-untyped-def]
    tpl = load_template("llama3", tok)
    msgs = [
        {"role": "system", "content": "Answer from the document."},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "The numbers are 4417 and 9902."},
    ]
    pieces = [
        Piece(f"The special magic number for violet-harbor is: {1000 + k}.", d, "needle")
        for k, d in enumerate(np.linspace(0, 1, 7))
    ]
    pieces.append(
        Piece("Dana kept the spare key for the boathouse under the fourth stone.", 0.5, "stealth", "inline")
    )
    a = assemble_chat(
        tpl,
        msgs,
        1,
        hay,
        target,
        pieces,
        length_counts=counts,  # type: ignore[arg-type]
        prefix="Read the document.\n\n",
        suffix="Question: which numbers?",
        start_token=1000,
    )
    assert a.length == target
    if counts == "full_chat":
        assert len(a.ids) == target
    elif counts == "context_only":
        assert a.context_tokens == target
    else:
        assert len(a.ids) - (a.rendered.message_spans[2][1] - a.rendered.message_spans[2][0]) == target
    content = a.messages[1]["content"]
    assert content.startswith("Read the document.\n\n") and content.endswith("\n\nQuestion: which numbers?")
    for p in a.pieces:
        assert tok.decode(a.ids[p.token_start : p.token_end]) == content[p.char_start : p.char_end]
        assert pieces[p.index].text in content[p.char_start : p.char_end]
    depths = [p.depth for p in a.pieces[:7]]
    assert depths == sorted(depths) and depths[0] < 0.01 and depths[-1] > 0.95
    # haystack runs: the text in the sample is the haystack's text at the recorded spans
    for r in a.runs:
        assert content[r.char_start : r.char_end] == hay.text[r.hay_char_start : r.hay_char_end]
    # the whole sample is what a full tokenization of its text gives
    assert np.array_equal(tpl.render(a.messages).ids, a.ids)


def test_inline_pieces_sit_inside_prose(tok, hay) -> None:  # type: ignore[no-untyped-def]
    tpl = load_template("llama3", tok)
    msgs = [{"role": "user", "content": ""}]
    piece = Piece("Dana kept the spare key under the fourth stone.", 0.6, "stealth", "inline")
    a = assemble_chat(tpl, msgs, 0, hay, 8192, [piece])
    p = a.pieces[0]
    content = a.messages[0]["content"]
    assert p.placement == "inline"
    assert content[p.char_start - 1] in ".!?" and content[p.char_end] == " "
    assert content[p.char_start : p.char_end] == " " + piece.text


def test_haystack_too_short_and_bad_arguments(tok, hay) -> None:  # type: ignore[no-untyped-def]
    tpl = load_template("llama3", tok)
    msgs = [{"role": "user", "content": ""}]
    with pytest.raises(HaystackTooShort):
        assemble_chat(tpl, msgs, 0, hay, len(hay) + 10)
    with pytest.raises(ValueError, match="prefix"):
        assemble_chat(tpl, msgs, 0, hay, 4096, prefix="no newline")
    with pytest.raises(ValueError, match="suffix"):
        assemble_chat(tpl, msgs, 0, hay, 4096, suffix=" leading space")
    with pytest.raises(AssemblyError, match="fewer than"):
        assemble_chat(tpl, msgs, 0, hay, 40, [Piece("x " * 50, 0.5)])


def test_haystack_from_rows_keeps_segment_lineage(tok) -> None:  # type: ignore[no-untyped-def]
    docs = ["First document.\nIt has two lines.", "  Second one, indented. ", "Third: ünïcödé text here."]
    ids, offs = tok.encode_batch(docs)
    sep = tok.special_token_id("<|end_of_text|>")
    row_ids: list[int] = []
    segments = []
    n_bytes = 0
    for k, d in enumerate(docs):
        part = ids[offs[k] : offs[k + 1]].tolist()
        segments.append(
            {
                "source": "s",
                "doc_id": f"d{k}",
                "char_start": 0,
                "char_end": len(d),
                "byte_start": 0,
                "byte_end": len(d.encode()),
                "doc_token_start": 0,
                "doc_token_end": len(part),
                "row_token_start": len(row_ids),
                "row_token_end": len(row_ids) + len(part),
                "is_split": False,
            }
        )
        row_ids += [*part, sep]
        n_bytes += len(d.encode())
    row = {"row_id": "pretrain_x-000000001", "input_ids": np.asarray(row_ids), "segments": segments}
    h = Haystack.from_rows(tok, [row] * 4)
    assert h.text.count("\n\n") >= 5 and "<|end_of_text|>" not in h.text
    tpl = load_template("llama3", tok)
    a = assemble_chat(tpl, [{"role": "user", "content": ""}], 0, h, 60, length_counts="context_only")
    lin = a.haystack_lineage()
    assert lin and {r["row_id"] for r in lin} == {"pretrain_x-000000001"}
    content = a.messages[0]["content"]
    for r in lin:
        doc = docs[int(r["doc_id"][1:])]
        # the source span names exactly the text that sits in the sample
        src = doc[r["char_start"] : r["char_end"]]
        assert src in content
        assert doc.encode()[r["byte_start"] : r["byte_end"]].decode() == src
        assert src.strip() in tok.decode(a.ids[r["row_token_start"] : r["row_token_end"]])
    assert a.haystack_rows() == ["pretrain_x-000000001"]
    # records convert to the chat schema's haystack column
    table = chat_table(
        [
            {
                "sample_id": "s0",
                "task": "t",
                "generator": "g@1",
                "seed": 0,
                "params": "{}",
                "messages": a.messages,
                "chat_template": "llama3",
                "target_length": 60,
                "length": a.length,
                "length_counts": "context_only",
                "context_tokens": a.context_tokens,
                "evidence": [],
                "questions": [],
                "dependency_distance": 0,
                "haystack": lin,
                "lineage": {"seed": 0, "steps": []},
            }
        ]
    )
    assert table.schema == CHAT_SCHEMA and table.column("input_ids").null_count == 1


def _rows_of(tok, docs: list[str], split_every: int = 0) -> list[dict]:  # type: ignore[no-untyped-def]
    """Packed rows of `docs` as the writer makes them (optionally cutting documents every n tokens)."""
    ids, offs = tok.encode_batch(docs)
    sep = tok.special_token_id("<|end_of_text|>")
    row: list[int] = []
    segments = []
    for k in range(len(docs)):
        part = ids[offs[k] : offs[k + 1]].tolist()
        step = split_every or max(1, len(part))
        for a in range(0, max(1, len(part)), step):
            piece = part[a : a + step]
            segments.append(
                {
                    "doc_id": f"d{k}",
                    "char_start": 0,
                    "byte_start": 0,
                    "doc_token_start": a,
                    "row_token_start": len(row),
                    "row_token_end": len(row) + len(piece),
                }
            )
            row += [*piece, sep]
    return [{"row_id": "r0", "input_ids": np.asarray(row, np.int32), "segments": segments}]


def test_reused_row_ids_equal_a_full_tokenization(tok) -> None:  # type: ignore[no-untyped-def]
    from hypothesis import given, settings
    from hypothesis import strategies as st

    alphabet = st.sampled_from(
        [
            "a",
            "b",
            "Z",
            " ",
            "  ",
            "\n",
            "\n\n",
            "\t",
            ".",
            ",",
            "1",
            "22",
            "é",
            "ü",
            "\r\n",
            "😀",
            "  x",
            "'s",
        ]
    )
    doc = st.lists(alphabet, min_size=0, max_size=40).map("".join)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(doc, min_size=1, max_size=6), st.sampled_from([0, 1, 3, 7]), st.sampled_from([None, 5, 40])
    )
    def check(docs: list[str], split: int, limit: int | None) -> None:
        h = Haystack.from_rows(tok, _rows_of(tok, docs, split), max_tokens=limit)
        assert np.array_equal(h.ids, tok.encode(h.text)), (docs, split, limit)

    check()
