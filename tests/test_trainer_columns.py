"""Trainer columns (issue 17, item 2): `loss_mask` on chat rows, `cu_seqlens` / `position_ids` on packed rows.

The pinned sample build (tests/test_layout_identity.py) is run with both boundary columns, read back
with `datasets`, and checked against references the writer never uses:
- boundaries are recounted from each row's `segments` (a separator belongs to the document it ends,
  the padding is one more sequence);
- the loss mask is compared with Meta's tokenizer.json through transformers' `apply_chat_template(...,
  return_assistant_tokens_mask=True)` over a Llama 3 template with `{% generation %}` markers, written
  here from Meta's description of the Llama 3 format (no Llama template ships offline): the ids must be
  equal (so the built-in `llama3` template is Meta's format) and the mask must cover exactly the
  assistant contents and their `<|eot_id|>`;
- packing chat samples with transformers' `DataCollatorWithFlattening` (the card's recipe) gives labels
  exactly where the masks are.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.synth.chat import chat_table
from tests.test_layout_identity import PINNED_COMMAND, pinned_config_dict
from tests.token_reference import meta_llama3_dir

# Written from Meta's description of the Llama 3 format; the generation markers are transformers' way
# of saying which tokens are the assistant's (content and end-of-turn token).
LLAMA3_GENERATION_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if m['role'] == 'assistant' %}{% generation %}{{- m['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}{{- m['content'] + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.build import run_build
    from schemas.config import parse_config
    from tests.conftest import DATA

    out = tmp_path_factory.mktemp("trainer") / "out"
    data = pinned_config_dict(out)
    data["output"] = {**data["output"], "boundary_columns": ["cu_seqlens", "position_ids"]}
    run_build(parse_config(data, base_dir=DATA), command=PINNED_COMMAND)
    return out


def _load(out: Path, config: str) -> Any:
    from datasets import load_dataset

    return load_dataset("parquet", data_files=str(out / "data" / config / "*.parquet"), split="train")


def test_boundaries_agree_with_segments(built: Path) -> None:
    n_rows = 0
    for config in ("pretrain_16384", "pretrain_65536"):
        for row in _load(built, config):
            n = len(row["input_ids"])
            doc = np.full(n, -1)
            for k, seg in enumerate(row["segments"]):
                doc[seg["row_token_start"] : seg["row_token_end"] + int(seg["separator_after"])] = k
            starts = [i for i in range(n) if i == 0 or doc[i] != doc[i - 1]]
            assert row["cu_seqlens"] == [*starts, n]
            expected_pos = []
            for a, b in zip(starts, [*starts[1:], n], strict=True):
                expected_pos += list(range(b - a))
            assert row["position_ids"] == expected_pos
            assert len(row["cu_seqlens"]) - 1 == row["n_segments"] + (1 if row["n_pad"] else 0)
            n_rows += 1
    assert n_rows == 50


@cache
def _reference_tokenizer() -> Any:
    """Meta's tokenizer.json with `ignore_merges` on, as Meta publishes it today (see token_reference)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((meta_llama3_dir() / "tokenizer.json").read_text())
    spec["model"]["ignore_merges"] = True
    ref = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    ref.bos_token = "<|begin_of_text|>"
    ref.chat_template = LLAMA3_GENERATION_TEMPLATE
    return ref


def test_loss_mask_is_exactly_the_assistant_tokens(built: Path) -> None:
    ref = _reference_tokenizer()
    rows = list(_load(built, "procedural"))
    assert rows
    for row in rows:
        enc = ref.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert row["input_ids"] == list(enc["input_ids"]), row["sample_id"]
        assert row["loss_mask"] == list(enc["assistant_masks"]), row["sample_id"]
        # and, independently of the template: the marked runs decode to the answers plus <|eot_id|>
        mask = np.asarray(row["loss_mask"])
        edges = np.flatnonzero(np.diff(np.r_[0, mask, 0]))
        runs = [ref.decode(row["input_ids"][a:b]) for a, b in zip(edges[::2], edges[1::2], strict=True)]
        answers = [m["content"] + "<|eot_id|>" for m in row["messages"] if m["role"] == "assistant"]
        assert runs == answers


def test_final_answer_marks_only_the_last_turn(built: Path) -> None:
    rows = [r for r in _load(built, "procedural") if sum(m["role"] == "assistant" for m in r["messages"]) > 1]
    assert rows, "the sample build has multi-question samples"
    table = chat_table(rows, loss_mask="final_answer")
    for row, mask in zip(rows, table.column("loss_mask").to_pylist(), strict=True):
        ids = row["input_ids"]
        last = row["messages"][-1]
        assert last["role"] == "assistant"
        marked = [t for t, m in zip(ids, mask, strict=True) if m]
        ref = _reference_tokenizer()
        assert ref.decode(marked) == last["content"] + "<|eot_id|>"
        assert sum(mask) < sum(row["loss_mask"])


def test_packed_sft_with_flattening_collator(built: Path) -> None:
    """The card's recipe: labels from loss_mask, samples packed by DataCollatorWithFlattening."""
    from transformers import DataCollatorWithFlattening

    rows = list(_load(built, "procedural"))[:4]
    examples = [
        {
            "input_ids": r["input_ids"],
            "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["loss_mask"], strict=True)],
        }
        for r in rows
    ]
    batch = DataCollatorWithFlattening(return_tensors="np")(examples)
    ids = batch["input_ids"][0].tolist()
    assert ids == [t for r in rows for t in r["input_ids"]]
    pos = batch["position_ids"][0].tolist()
    assert pos == [p for r in rows for p in range(len(r["input_ids"]))]
    labels = np.asarray(batch["labels"][0])
    want = np.concatenate([np.asarray(r["loss_mask"]) for r in rows]).astype(bool)
    # the collator blanks the first label of every sequence (nothing predicts it); the assistant tokens
    # never come first, so the trained positions are exactly the masked ones
    assert np.array_equal(labels != -100, want)


def test_card_reports_the_supervised_token_share(built: Path) -> None:
    """The card's task mix gives each task's supervised-token share, recounted here from the rows."""
    rows = list(_load(built, "procedural"))
    card = (built / "README.md").read_text()
    by_task: dict[str, list[int]] = {}
    for r in rows:
        t = by_task.setdefault(r["task"], [0, 0])
        t[0] += sum(r["loss_mask"])
        t[1] += len(r["loss_mask"])
    for task, (sup, total) in by_task.items():
        line = next(x for x in card.splitlines() if x.startswith("| `procedural` |") and f"| {task} |" in x)
        assert f"| {sup:,} ({100 * sup / total:.2f}%) |" in line, (task, line)
