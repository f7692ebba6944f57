"""Documents-format contexts start where a document or a sentence starts and end where a sentence, a
clause or a paragraph ends (issue 17.3), checked from the output text, not from `params.context_cut`.

The rewriter stage runs on the bundled sample's 64K rows against the local OpenAI-compatible server
(`tests/openai_server.py`) at 8K and 32K tokens per sample. For every kept sample the first and last
document pieces of its context are found through their lineage in the packed rows they came from,
which are decoded again with Meta's own Llama-3 tokenizer (`tests/token_reference`, never read by the
code under test), so the text just before the start and just after the end in the source document
is known. The definitions the cuts are checked against:

- a start is clean when the piece opens its document (header without ", continued", nothing of the
  document before it), or, under a ", continued" header, when it begins a paragraph (a blank line
  before it) or a sentence or clause: its first character (after an opening quote or bracket) is a
  capital or a digit and the document text before it ends with . ! ? ; or : (closing quotes and
  brackets may follow the mark);
- an end is clean when the piece is followed in its document by a blank line or by nothing (the
  document's end), or its last character (before closing quotes and brackets) is . ! ? ; or : and
  the document goes on with white space.

The sample's ids must also equal the reference tokenizer's encoding of the rendered Llama-3 chat
(so a start inside a line, whose leading space is dropped, still tokenizes as the template does).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core.tokenizer import load_tokenizer
from pipeline.core.workdir import WorkDir
from pipeline.stages.rewriter import run_rewriter
from pipeline.stages.select import SelectResult
from pipeline.synth.chat import AssemblyError, Haystack, assemble_chat, load_template
from tests.conftest import make_config
from tests.openai_server import FakeOpenAIServer
from tests.test_rewriter import pack_sample
from tests.token_reference import meta_hf, real_documents

OPEN = "\"'([“‘"
CLOSE = "\"')]}”’"
MARKS = ".!?;:"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SelectResult]:
    return pack_sample(tmp_path_factory.mktemp("packed") / "out")


def _packed_rows(out: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for f in sorted((out / "data").glob("*/*.parquet")):
        if f.parent.name.startswith("rewriter"):
            continue
        t = pq.read_table(f, columns=["row_id", "input_ids", "segments"])
        for r in t.to_pylist():
            rows[r["row_id"]] = r
    return rows


def _run(packed: tuple[Path, SelectResult], out: Path, length: int, samples: int) -> list[dict[str, Any]]:
    src, selected = packed
    shutil.copytree(src / "data", out / "data")
    with FakeOpenAIServer() as srv:
        cfg = make_config(
            out,
            rewriter={
                "enabled": True,
                "base_url": srv.base_url,
                "model": "fake-model",
                "api_key_env": None,
                "progress": False,
                "context_target": 65536,
                "sample_length": length,
                "context_format": "documents",
                "chunk_tokens": 256,
                "strategies": [
                    {"kind": "chunk_qa", "samples": samples, "turns_per_context": 6, "min_turns": 4}
                ],
            },
        )
        res = run_rewriter(cfg, WorkDir(cfg), selected)
    st = res.stats
    assert st["accepted"] == samples, st
    # the manifest counts the cuts (recounted from params) and the word-end fallbacks among them
    assert sum(st["context_cuts"].values()) == samples and st["context_word_ends"] == 0, st["context_cuts"]
    return [
        r for f in sorted((out / "data" / "rewriter").glob("*.parquet")) for r in pq.read_table(f).to_pylist()
    ]


def _pieces(haystack: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The document pieces of a context: lineage records of one document that follow each other in
    its text (the exactly sized head and tail of a context are runs of their own) merged."""
    out: list[dict[str, Any]] = []
    for seg in haystack:
        prev = out[-1] if out else None
        if prev is not None and (prev["doc_id"], prev["char_end"]) == (seg["doc_id"], seg["char_start"]):
            prev.update(char_end=seg["char_end"], row_token_end=seg["row_token_end"])
        else:
            out.append(dict(seg))
    return out


def _in_source(
    seg: dict[str, Any], row_ids: list[str], rows: dict[str, dict[str, Any]], tok: Any
) -> tuple[str, str, str, bool]:
    """(text of the document before the piece, the piece, the text after it, whether the document ends
    there), from the packed row the piece came from, decoded with the reference tokenizer."""
    ((row, src),) = [
        (rows[rid], s)
        for rid in row_ids
        for s in rows[rid]["segments"]
        if s["doc_id"] == seg["doc_id"]
        and s["char_start"] <= seg["char_start"]
        and seg["char_end"] <= s["char_end"]
    ]
    text = tok.decode(row["input_ids"][src["row_token_start"] : src["row_token_end"]])
    a, b = seg["char_start"] - src["char_start"], seg["char_end"] - src["char_start"]
    ends_doc = src["doc_token_end"] == src["doc_tokens"]
    return text[:a], text[a:b], text[b:], ends_doc and not text[b:].strip()


def clean_start(header: str, before: str, piece: str) -> bool:
    if not header.endswith(", continued"):
        return not before.strip()  # the document's own beginning
    if not before.strip():
        return False  # a piece that begins where the packer cut the document: nothing says it is clean
    if before[len(before.rstrip()) :].count("\n") >= 2:
        return bool(piece[:1].strip())  # a paragraph
    first = piece.lstrip(OPEN)[:1]
    return (first.isupper() or first.isdigit()) and before.rstrip().rstrip(CLOSE)[-1:] in MARKS


def clean_end(piece: str, after: str, doc_ends: bool) -> bool:
    if piece[-1:].isspace() or not piece:
        return False
    if doc_ends or re.match(r"[ \t]*\n[ \t]*\n", after):
        return True
    return piece.rstrip(CLOSE)[-1:] in MARKS and (after[:1].isspace() or not after)


def _llama3_ids(messages: list[dict[str, str]], tok: Any) -> list[int]:
    """The Llama-3 chat format, rendered and tokenized by the reference (special tokens split the text)."""
    sp = {
        t: tok.token_to_id(t)
        for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    }
    ids = [sp["<|begin_of_text|>"]]
    for m in messages:
        ids += [sp["<|start_header_id|>"], *tok.encode(m["role"], add_special_tokens=False).ids]
        ids += [sp["<|end_header_id|>"], *tok.encode("\n\n" + m["content"], add_special_tokens=False).ids]
        ids.append(sp["<|eot_id|>"])
    return ids


@pytest.mark.parametrize(("length", "samples"), [(8192, 24), (32768, 8)])
def test_contexts_start_and_end_cleanly(
    packed: tuple[Path, SelectResult], tmp_path: Path, length: int, samples: int
) -> None:
    tok = meta_hf()
    rows = _packed_rows(packed[0])
    out = _run(packed, tmp_path / "out", length, samples)
    bad: list[str] = []
    mid_line = 0
    for r in out:
        ids = r["input_ids"]
        assert len(ids) == length
        assert ids == _llama3_ids(r["messages"], tok), r["sample_id"]
        segs = _pieces(r["haystack"])
        first, last = segs[0], segs[-1]
        # the header line just before the first piece, as it reads in the sample
        lead = tok.decode(ids[: first["row_token_start"]])
        m = re.search(r"\n(### Document [^\n]*)\n$", lead)
        assert m and m.group(1).startswith(f"### Document {first['doc_id']} ("), lead[-200:]
        before, piece, _, _ = _in_source(first, r["haystack_rows"], rows, tok)
        # the piece is the sample's text from its first token on (a start inside a line has no space)
        assert tok.decode(ids[first["row_token_start"] : first["row_token_end"]]).startswith(piece[:20])
        if not clean_start(m.group(1), before, piece):
            bad.append(f"{r['sample_id']} starts: ...{before[-60:]!r} | {piece[:60]!r}")
        mid_line += bool(before) and not before.endswith("\n")
        _, piece, after, doc_ends = _in_source(last, r["haystack_rows"], rows, tok)
        if not clean_end(piece, after, doc_ends):
            bad.append(f"{r['sample_id']} ends: ...{piece[-60:]!r} | {after[:40]!r}")
    assert not bad, "\n".join(bad)
    if length == 8192:  # the bundled rows need starts inside lines here (the leading-space path is used)
        assert mid_line >= 1


def test_a_start_inside_a_line_drops_the_space_and_stays_token_exact() -> None:
    tok = load_tokenizer("fastokens:llama3")
    chat = load_template("llama3", tok)
    ref = meta_hf()
    docs = real_documents()
    milton = next(d for d in docs if "PARADISE LOST" in d[:200])  # two spaces after a full stop
    wiki = [d for d in docs[:400] if d.count(". ") >= 3][:40]
    hay = Haystack.from_documents(tok, [milton[:40000], *wiki])
    text, cs = hay.text, hay.char_starts
    # sentence starts inside a line: an inline boundary after a full stop, a capital after its spaces
    starts = [
        int(h)
        for h in hay.inline_bounds
        if text[int(cs[h]) - 1] == "."
        and text[int(cs[h]) :].lstrip(" ")[:1].isupper()
        and h + 3000 < len(hay)
    ]
    double = [h for h in starts if text[int(cs[h]) : int(cs[h]) + 2] == "  "]
    single = [h for h in starts if text[int(cs[h]) + 1] != " "]
    assert len(double) >= 10 and len(single) >= 10
    done = {True: 0, False: 0}
    for h in double[:10] + single[-10:]:
        try:
            asm = assemble_chat(
                chat,
                [{"role": "user", "content": ""}],
                0,
                hay,
                1500,
                prefix="Read this.\n### Document x, continued\n",
                suffix="What happens next?",
                start_token=h,
                start_attempts=1,
                start_mid_line=True,
            )
        except AssemblyError as err:  # a start that cannot be sized exactly is allowed
            assert "could not size" in str(err), err
            continue
        done[h in double] += 1
        content = asm.messages[0]["content"]
        c0 = asm.context_char_span[0]
        assert content[:c0].endswith("continued\n") and content[c0] != " "
        assert content[c0:].startswith(text[int(cs[h]) :].lstrip(" ")[:40])
        assert len(asm.ids) == 1500
        assert asm.ids.tolist() == _llama3_ids(asm.messages, ref)  # the template's own tokenization
        for run in asm.runs:  # haystack text sits where the runs say, in chars and in tokens
            assert content[run.char_start : run.char_end] == text[run.hay_char_start : run.hay_char_end]
            got = ref.decode(asm.ids[run.token_start : run.token_end].tolist())
            assert got.startswith(text[run.hay_char_start : run.hay_char_end][:30])
    assert done[True] >= 1 and done[False] >= 1, done
    # a token that is not an inline boundary (inside a word or after a space) cannot start mid-line
    inside = int(np.setdiff1d(np.arange(1, 200), hay.inline_bounds)[0])
    with pytest.raises(ValueError, match="inline boundary"):
        assemble_chat(
            chat,
            [{"role": "user", "content": ""}],
            0,
            hay,
            1500,
            start_token=inside,
            start_attempts=1,
            start_mid_line=True,
        )
