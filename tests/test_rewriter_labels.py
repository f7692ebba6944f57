"""Rewriter questions that name a prompt-internal label ("passage 2") are rejected (issue 17, item 3 part)."""

from __future__ import annotations

import pytest

from pipeline.synth.rewriter.strategies import Rejection, _chunk_qa
from schemas.synthesis import RewriterConfig

EVIDENCE = "The lighthouse keeper lit the lamp every evening at dusk."


@pytest.mark.parametrize(
    "question",
    [
        "According to passage 2, when was the lamp lit?",
        "What does Passage #3 say about the lamp?",
        "In chunk 1, who lit the lamp?",
        "Based on excerpt [4], when was the lamp lit?",
        "What do passages 1 and 2 say about the keeper?",
    ],
)
def test_question_naming_a_prompt_label_is_rejected(question: str) -> None:
    obj = {"question": question, "answer": "at dusk", "evidence": EVIDENCE}
    with pytest.raises(Rejection) as err:
        _chunk_qa(obj, RewriterConfig())
    assert err.value.reason == "prompt_label_in_question"


@pytest.mark.parametrize(
    "question",
    [
        "When did the lighthouse keeper light the lamp?",
        "How do the details of the passages relate?",  # no label: a general reference stays allowed
        "What happened in 1852 at the lighthouse?",
    ],
)
def test_questions_without_labels_pass(question: str) -> None:
    obj = {"question": question, "answer": "at dusk", "evidence": EVIDENCE}
    draft = _chunk_qa(obj, RewriterConfig())
    assert draft.turns[0]["content"] == question
