"""Real models' chat templates (`hf:` / `jinja:`) rendered token-exactly (issue 17, item 1).

For Llama 3.1, Qwen2.5, Qwen3, Mistral (Tekken) and Gemma 3 (see tests/chat_models.py for where each
template and tokenizer comes from), every procedural task kind and a rewriter-shaped multi-turn sample
is assembled with the model's own tokenizer and template, and:
- the sample's ids equal the reference encoding of its messages (transformers' `apply_chat_template(...,
  tokenize=True)`, or mistral-common's `encode_chat_completion` for Mistral);
- every recorded evidence and question span covers exactly the tokens of its text (decoded and compared);
- the length is the target.
Gemma 3's tokenizer is SentencePiece (not byte-level), which token-exact assembly refuses; its
template is checked on the same conversations rendered whole.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from typing import Any

import numpy as np
import pytest

from pipeline.core.tokenizer import Tokenizer, load_tokenizer
from pipeline.synth.chat import Haystack, Piece, assemble_chat, load_template
from pipeline.synth.chat.jinja import TemplateError
from pipeline.synth.procedural import GENERATORS
from pipeline.synth.procedural.sample import build_sample
from tests.chat_models import MODELS, QWEN25_TEMPLATE, ChatModel, qwen_dir
from tests.conftest import DATA
from tests.test_procedural import TASKS

TARGET = 3000
SYSTEM = "Answer from the document."


@cache
def model(family: str) -> ChatModel:
    return MODELS[family]()


@cache
def haystack(tok_name: str) -> Haystack:
    tok = load_tokenizer(tok_name)
    docs = []
    with gzip.open(DATA / "sample" / "wiki" / "part-000.jsonl.gz", "rt", encoding="utf-8") as f:
        docs += [json.loads(line)["text"] for line in f][:400]
    code = (DATA / "sample" / "code" / "jsonpkg" / "decoder.py").read_text()
    return Haystack.from_documents(tok, [code, *docs])


def _covers(tok: Tokenizer, ids: np.ndarray, t0: int, t1: int, text: str) -> None:
    """Tokens [t0, t1) spell `text`, give or take the whitespace a token shares with its neighbour."""
    got = tok.decode(ids[t0:t1])
    assert text.strip() in got, (text, got)
    # and no token could be dropped: the span without its first or last token misses part of the text
    assert text not in tok.decode(ids[t0 + 1 : t1]) and text not in tok.decode(ids[t0 : t1 - 1])


def _samples(m: ChatModel) -> list[tuple[str, dict[str, Any], Any]]:
    """(kind, record, rendered chat) for every procedural task and a rewriter-shaped sample."""
    tok = load_tokenizer(m.tokenizer)
    tpl = load_template(m.template, tok)
    hay = haystack(m.tokenizer)
    out = []
    for kind, params in TASKS.items():
        draft = GENERATORS[params.task].draft(params, np.random.default_rng(3), 0, (0.0, 1.0))
        built = build_sample(draft, hay, tpl, TARGET, "full_chat", SYSTEM, f"s-{kind}", 3, {"steps": ["t@1"]})
        out.append((kind, built.record, built.chat.rendered))
    # rewriter-shaped: quotes inserted in the context, several QA turns after it
    msgs = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "The keeper of the gate."},
        {"role": "user", "content": "And who opened it?"},
        {"role": "assistant", "content": "Nobody, until the thaw."},
    ]
    quotes = ["The gate was kept by Aldous Brenn.", "Nobody opened the gate until the thaw."]
    chat = assemble_chat(
        tpl,
        msgs,
        1,
        hay,
        TARGET,
        [Piece(q, d, "quote", "inline") for q, d in zip(quotes, (0.2, 0.7), strict=True)],
        prefix="Read the document and answer.\n",
        suffix="Who kept the gate?",
    )
    record = {
        "messages": chat.messages,
        "length": chat.length,
        "input_ids": chat.ids,
        "evidence": [
            {
                "message_index": 1,
                "char_start": p.char_start,
                "char_end": p.char_end,
                "token_start": p.token_start,
                "token_end": p.token_end,
            }
            for p in chat.pieces
        ],
        "questions": [],
    }
    out.append(("rewriter", record, chat.rendered))
    return out


BYTE_LEVEL = ["llama3.1", "qwen2.5", "qwen3", "mistral"]


@pytest.mark.parametrize("family", BYTE_LEVEL)
def test_every_sample_kind_matches_the_models_own_tokenization(family: str) -> None:
    m = model(family)
    tok = load_tokenizer(m.tokenizer)
    for kind, rec, rendered in _samples(m):
        ids = np.asarray(rec["input_ids"])
        want = m.reference(rec["messages"], False)
        assert ids.tolist() == want, f"{family}/{kind}: ids differ from the reference"
        assert rec["length"] == TARGET == len(ids)
        for e in rec["evidence"]:
            text = rec["messages"][e["message_index"]]["content"][e["char_start"] : e["char_end"]]
            _covers(tok, ids, e["token_start"], e["token_end"], text)
        for q in rec["questions"]:
            _covers(tok, ids, q["token_start"], q["token_end"], q["text"])
        # every content span holds the tokens of that message's content
        for i, msg in enumerate(rec["messages"]):
            a, b = (int(x) for x in rendered.content_spans[i])
            assert msg["content"].strip() in tok.decode(ids[a:b]), (family, kind, i)


def test_gemma3_template_renders_like_its_tokenizer() -> None:
    m = model("gemma3")
    tok = load_tokenizer(m.tokenizer)
    tpl = load_template(m.template, tok)
    # the conversations of the Llama 3.1 samples, rendered with Gemma's template and vocabulary
    for kind, rec, _ in _samples(model("llama3.1")):
        r = tpl.render(rec["messages"])
        assert r.ids.tolist() == m.reference(rec["messages"], False), kind
        g = tpl.render(rec["messages"][:2], add_generation_prompt=True)
        assert g.ids.tolist() == m.reference(rec["messages"][:2], True), kind
    with pytest.raises(Exception, match="byte-level"):
        _samples(m)


@pytest.mark.parametrize("family", ["llama3.1", "qwen2.5", "qwen3", "gemma3"])
def test_generation_prompt_matches(family: str) -> None:
    m = model(family)
    tpl = load_template(m.template, load_tokenizer(m.tokenizer))
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 2?"}]
    r = tpl.render(msgs, add_generation_prompt=True)
    assert r.ids.tolist() == m.reference(msgs, True)
    assert r.generation_prompt is not None and r.generation_prompt[1] == len(r.ids)


def test_builtin_chatml_is_qwen25_with_a_system_turn() -> None:
    """The built-in `chatml` equals Qwen2.5's rendering whenever the chat has a system turn."""
    m = model("qwen2.5")
    tok = load_tokenizer(m.tokenizer)
    builtin = load_template("chatml", tok)
    for kind, rec, _ in _samples(m):
        assert builtin.render(rec["messages"]).ids.tolist() == m.reference(rec["messages"], False), kind


def test_relative_hf_folder_resolves_against_the_config_folder(tmp_path: Any) -> None:
    import shutil

    shutil.copytree(qwen_dir(), tmp_path / "tok")
    tok = load_tokenizer(f"hf:{qwen_dir()}")
    tpl = load_template("hf:tok", tok, base_dir=tmp_path)
    assert tpl.render([{"role": "user", "content": "hi"}]).ids.tolist() == model("qwen3").reference(
        [{"role": "user", "content": "hi"}], False
    )


BAD: dict[str, tuple[str, str]] = {
    # a template that trims content cannot take content ids verbatim
    "trims": (
        "{% for m in messages %}<|im_start|>{{ m['content'] | trim }}<|im_end|>{% endfor %}",
        "changes message",
    ),
    # fixed text glued to the content merges with it: "Say " + "Context" tokenizes as "Say", " Context"
    "merges": (
        "{% for m in messages %}<|im_start|>Say {{ m['content'] }}<|im_end|>{% endfor %}",
        "first difference at token",
    ),
    # content placed twice
    "twice": (
        "{% for m in messages %}{{ m['content'] }}<|im_end|>{{ m['content'] }}{% endfor %}",
        "exactly once",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_templates_that_cannot_be_token_exact_are_refused(case: str) -> None:
    source, message = BAD[case]
    tok = load_tokenizer(f"hf:{qwen_dir()}")
    with pytest.raises(TemplateError, match=message) as err:
        load_template(f"jinja:{source}", tok)
    assert "\n" not in str(err.value) and "chat template jinja:" in str(err.value)


def test_qwen25_template_text_is_apply_chat_template_text() -> None:
    """The pipeline's text rendering is transformers' own (same Jinja, same variables)."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(qwen_dir()))
    tok = load_tokenizer(f"hf:{qwen_dir()}")
    tpl = load_template(f"jinja:{QWEN25_TEMPLATE}", tok)
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    want = ref.apply_chat_template(msgs, chat_template=QWEN25_TEMPLATE, tokenize=False)
    assert tpl.render_text(msgs) == want


def test_procedural_config_takes_a_jinja_template_and_refuses_a_bad_one(tmp_path: Any) -> None:
    from pipeline.stages.procedural import check_procedural
    from schemas.config import ConfigError
    from tests.chat_models import LLAMA31_TEMPLATE
    from tests.conftest import make_config

    good = make_config(
        tmp_path / "a", procedural={"enabled": True, "chat_template": f"jinja:{LLAMA31_TEMPLATE}"}
    )
    check_procedural(good)
    trims = "{% for m in messages %}<|start_header_id|>{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    bad = make_config(tmp_path / "b", procedural={"enabled": True, "chat_template": f"jinja:{trims}"})
    with pytest.raises(
        ConfigError, match=r"procedural.chat_template: chat template jinja:\w+ changes message"
    ):
        check_procedural(bad)
