"""Many-shot in-context learning (issue 16.4), checked by a reader written here.

The labelled set is built in the test from the bundled books: passages labelled with the work they come
from (which play, or Paradise Lost). The reader parses the example lines of the context itself and checks
the count, the recorded label balance and order (evidence labels by position), the held-out item's label
against the test's own lookup, that the held-out text is not among the examples, and the layout knobs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.tokenizer import load_tokenizer
from pipeline.synth.chat import Haystack
from schemas.procedural import ICLTask
from tests.test_procedural import sample_docs
from tests.test_ruler import body, build

EXAMPLE = re.compile(r"^Input: (.*) \| Label: (.+)$")


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return load_tokenizer("quicktok:llama3")


@pytest.fixture(scope="module")
def hay(tok):  # type: ignore[no-untyped-def]
    return Haystack.from_documents(tok, [t for k, t in sample_docs().items() if k.startswith("enwiki")][:300])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Passages of each bundled book, labelled with the book; an uneven number per book."""
    docs = {k: v for k, v in sample_docs().items() if not k.startswith(("enwiki", "kjv"))}
    rows = []
    for n, (doc_id, text) in enumerate(sorted(docs.items())):
        paras = [" ".join(p.split()) for p in text.split("\n\n") if len(" ".join(p.split())) > 200]
        for p in paras[10 : 10 + 6 + 6 * n]:  # 6, 12, 18, ... passages: unbalanced on purpose
            rows.append({"text": p[:300], "work": doc_id})
    folder = tmp_path_factory.mktemp("icl")
    pq.write_table(pa.Table.from_pylist(rows), folder / "works.parquet")
    (folder / "works.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"dir": folder, "rows": rows, "label_of": {" ".join(r["text"].split()): r["work"] for r in rows}}


def examples(draft: Any, built: Any) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for ln in body(draft, built) if (m := EXAMPLE.match(ln))]


@pytest.mark.parametrize(("balance", "order"), [("balanced", "shuffled"), ("natural", "grouped")])
@pytest.mark.parametrize("seed", [1, 2])
def test_icl_examples_labels_and_records(tok, hay, labelled, balance: str, order: str, seed: int) -> None:  # type: ignore[no-untyped-def]
    params = ICLTask(
        path=str(labelled["dir"] / "works.parquet"),
        label_field="work",
        shots=40,
        balance=balance,
        order=order,
    )
    draft, built = build(tok, hay, params, seed, target=8192)
    assert built.record["length"] == 8192
    ex = examples(draft, built)
    assert len(ex) == 40
    label_of = labelled["label_of"]
    assert all(label_of[t] == lab for t, lab in ex)  # every example carries its true label
    q = draft.queries[0]
    held = re.match(r"Input: (.*)\n", q.question).group(1)  # type: ignore[union-attr]
    assert q.expected == [label_of[held]] and held not in {t for t, _ in ex}
    # recorded: one evidence entry per example, in context order, labelled with the example's label
    ev = sorted(built.record["evidence"], key=lambda e: e["token_start"])
    assert [e["label"] for e in ev] == [f"example:{lab}" for _, lab in ex]
    counts = Counter(lab for _, lab in ex)
    per_label = Counter(r["work"] for r in labelled["rows"])
    if balance == "balanced":  # every label has more rows than 40 / labels: as even as can be
        assert min(per_label.values()) > 40 // len(per_label) + 1
        assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == len(per_label)
    else:
        assert len(set(counts.values())) > 1  # the dataset's proportions, which are uneven
    runs = [lab for i, (_, lab) in enumerate(ex) if i == 0 or ex[i - 1][1] != lab]
    if order == "grouped":
        assert len(runs) == len(counts)  # one block per label
    else:
        assert len(runs) > 2 * len(counts)


def test_icl_reads_jsonl_and_fills_long_contexts(tok, hay, labelled) -> None:  # type: ignore[no-untyped-def]
    params = ICLTask(path=str(labelled["dir"] / "works.jsonl"), label_field="work", shots=180)
    draft, built = build(tok, hay, params, 3, target=16384)
    ex = examples(draft, built)
    assert len(ex) == 180 and built.record["length"] == 16384
    # the examples are most of the context
    ctx = built.record["context_tokens"]
    ex_tokens = sum(e["token_end"] - e["token_start"] for e in built.record["evidence"])
    assert ex_tokens > 0.6 * ctx


def test_icl_bad_rows_and_knobs(tok, hay, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'label' must be"):
        build(tok, hay, ICLTask(path=str(bad), shots=1), 1, target=2048)
    with pytest.raises(ValueError, match="exactly one of"):
        ICLTask()
