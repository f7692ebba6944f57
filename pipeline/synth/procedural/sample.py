"""One procedural sample: a generator's draft assembled into a token-exact chat with its long-range truth.

The first user turn holds the task instruction, the context (real text with the needles inserted at
their depths) and the first question; each further question is a user turn of its own, and every
question is followed by its reference answer as the assistant turn. Token positions of every needle
and every question are measured in the rendered sample, and the dependency distance of a question is
the number of tokens between its farthest needed evidence and the question itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.synth.chat import AssembledChat, ChatTemplate, Haystack, LengthCounts, Piece, assemble_chat
from pipeline.synth.procedural.base import Draft
from pipeline.synth.procedural.dense import assemble_dense

ASSEMBLY_STEP = "chat_assembly@2"  # @2: the haystack is cut at a word end (issue 12.20)


@dataclass
class BuiltSample:
    record: dict[str, Any]  # a CHAT_SCHEMA row
    eval_records: list[dict[str, Any]]  # EVAL_SCHEMA rows, one per question
    chat: AssembledChat


def chat_messages(draft: Draft, system_prompt: str | None) -> tuple[list[dict[str, str]], int, list[int]]:
    """Messages with the context turn left empty; the context turn's index; each question's turn."""
    msgs: list[dict[str, str]] = []
    if system_prompt:
        msgs.append({"role": "system", "content": system_prompt})
    ctx = len(msgs)
    turns: list[int] = []
    for k, q in enumerate(draft.queries):
        turns.append(len(msgs))
        msgs.append({"role": "user", "content": "" if k == 0 else q.question})
        msgs.append({"role": "assistant", "content": q.answer})
    return msgs, ctx, turns


def build_sample(
    draft: Draft,
    haystack: Haystack,
    template: ChatTemplate,
    target_length: int,
    length_counts: LengthCounts,
    system_prompt: str | None,
    sample_id: str,
    seed: int,
    lineage: dict[str, Any],
    start_token: int = 0,
) -> BuiltSample:
    msgs, ctx, turns = chat_messages(draft, system_prompt)
    pieces = [Piece(n.text, n.depth, n.label, n.placement) for n in draft.needles]
    if draft.filler is not None:
        chat = assemble_dense(
            template,
            msgs,
            ctx,
            haystack,
            target_length,
            pieces,
            draft.filler,
            length_counts=length_counts,
            prefix=draft.instruction,
            suffix=draft.queries[0].question,
            start_token=start_token,
        )
    else:
        chat = assemble_chat(
            template,
            msgs,
            ctx,
            haystack,
            target_length,
            pieces,
            length_counts=length_counts,
            prefix=draft.instruction,
            suffix=draft.queries[0].question,
            start_token=start_token,
        )
    r = chat.rendered
    content = chat.messages[ctx]["content"]
    evidence: list[dict[str, Any]] = [
        {
            "label": p.label if p.placement == "line" else f"{p.label}/inline",
            "message_index": ctx,
            "char_start": p.char_start,
            "char_end": p.char_end,
            "token_start": p.token_start,
            "token_end": p.token_end,
            "depth": p.depth,
        }
        for p in chat.pieces
    ]
    questions: list[dict[str, Any]] = []
    for k, (q, turn) in enumerate(zip(draft.queries, turns, strict=True)):
        if k == 0:
            a = len(content) - len(q.question)
            t0, t1 = chat.locate(ctx, a, len(content))
        else:
            t0, t1 = (int(x) for x in r.content_spans[turn])
        # no needles (a question about the whole context, e.g. word frequencies): it reaches back to its start
        first = min((evidence[i]["token_start"] for i in q.evidence), default=chat.context_token_span[0])
        questions.append(
            {
                "message_index": turn,
                "text": q.question,
                "expected": q.expected,
                "match": q.match,
                "token_start": t0,
                "token_end": t1,
                "evidence": q.evidence,
                "dependency_distance": t0 - first,
            }
        )
    record: dict[str, Any] = {
        "sample_id": sample_id,
        "task": draft.task,
        "generator": draft.generator,
        "seed": seed,
        "params": json.dumps(draft.params, sort_keys=True),
        "messages": chat.messages,
        "chat_template": template.name,
        "target_length": target_length,
        "length": chat.length,
        "length_counts": length_counts,
        "context_tokens": chat.context_tokens,
        "evidence": evidence,
        "questions": questions,
        "dependency_distance": max(q["dependency_distance"] for q in questions),
        "haystack": chat.haystack_lineage(),
        "model": None,
        "lineage": {
            **lineage,
            "seed": seed,
            "steps": [*lineage.get("steps", []), draft.generator, ASSEMBLY_STEP],
        },
        "input_ids": np.asarray(chat.ids, np.int32),
        "haystack_rows": chat.haystack_rows(),
        "loss_mask": r.loss_mask(),  # every assistant turn; chat_table applies output.loss_mask
    }
    gen_header = len(template.header_ids("assistant"))
    evals = []
    for k, (q, turn) in enumerate(zip(draft.queries, turns, strict=True)):
        depths = [float(evidence[i]["depth"]) for i in q.evidence]
        evals.append(
            {
                "eval_id": f"{sample_id}/q{k}",
                "sample_id": sample_id,
                "question_index": k,
                "task": draft.task,
                "generator": draft.generator,
                "prompt": chat.messages[: turn + 1],
                "expected": q.expected,
                "match": q.match,
                "depth": min(depths, default=0.0),
                "evidence_depths": depths,
                "target_length": target_length,
                "prompt_tokens": int(r.message_spans[turn][1]) + gen_header,
                "dependency_distance": questions[k]["dependency_distance"],
                "chat_template": template.name,
            }
        )
    return BuiltSample(record, evals, chat)
