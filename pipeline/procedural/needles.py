"""Multi-key / multi-value / multi-query needles after NVIDIA's RULER.

Classic needles are RULER's "special magic number" lines. Stealth needles are ordinary sentences
placed inside the prose at sentence boundaries, so nothing about their form marks them as the thing
to find; their keys (a person, a thing, a street) only make sense together.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import numpy as np

from pipeline.procedural import words
from pipeline.procedural.base import Draft, Needle, Query, join_items, spread, unique_ints
from schemas.procedural import MultiNeedleTask

CLASSIC_INSTRUCTION = (
    "Some special magic numbers are hidden in the document below. Remember them: questions about them "
    "follow the document.\n\n"
)
STEALTH_INSTRUCTION = "Read the document below carefully; questions about its details follow it.\n\n"


def _values(rng: np.random.Generator, n: int, kind: str) -> list[str]:
    if kind == "uuid":
        return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]
    return [str(v) for v in unique_ints(rng, n, 1_000_000, 10_000_000)]


def _classic_keys(rng: np.random.Generator, n: int) -> list[str]:
    pairs = [(a, b) for a in words.ADJECTIVES for b in words.NOUNS]
    if n > len(pairs):
        raise ValueError(f"multi_needle: at most {len(pairs)} classic keys")
    return [f"{pairs[i][0]}-{pairs[i][1]}" for i in rng.choice(len(pairs), size=n, replace=False).tolist()]


def _stealth_keys(rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    # one person per key, so a key is never a near-duplicate of another
    if n > len(words.FIRST_NAMES):
        raise ValueError(f"multi_needle: at most {len(words.FIRST_NAMES)} stealth keys")
    people = rng.choice(len(words.FIRST_NAMES), size=n, replace=False).tolist()
    things = rng.integers(0, len(words.LOCKED_THINGS), size=n).tolist()
    places = rng.integers(0, len(words.PLACES), size=n).tolist()
    return [
        (words.FIRST_NAMES[a], words.LOCKED_THINGS[b], words.PLACES[c])
        for a, b, c in zip(people, things, places, strict=True)
    ]


class MultiNeedle:
    task = "multi_needle"
    step = "multi_needle@1"

    @staticmethod
    def style_of(params: MultiNeedleTask, index: int) -> str:
        if params.style == "mixed":
            return "classic" if index % 2 == 0 else "stealth"
        return params.style

    def draft(
        self, params: MultiNeedleTask, rng: np.random.Generator, index: int, depth_range: tuple[float, float]
    ) -> Draft:
        p = params
        style = self.style_of(p, index)
        values = _values(rng, p.num_keys * p.values_per_key, p.value_kind)
        multi = p.values_per_key > 1
        texts: list[tuple[int, str]] = []  # (key index, sentence)
        questions: list[str] = []
        if style == "classic":
            keys = _classic_keys(rng, p.num_keys)
            for k, key in enumerate(keys):
                for v in values[k * p.values_per_key : (k + 1) * p.values_per_key]:
                    lead = "One of the special magic numbers" if multi else "The special magic number"
                    texts.append((k, f"{lead} for {key} is: {v}."))
                questions.append(
                    f"What are all the special magic numbers for {key} mentioned in the document? "
                    f"List every one, separated by commas."
                    if multi
                    else f"What is the special magic number for {key} mentioned in the document? "
                    f"Answer with the number only."
                )
            placement = "line"
        else:
            skeys = _stealth_keys(rng, p.num_keys)
            for k, (who, thing, street) in enumerate(skeys):
                for v in values[k * p.values_per_key : (k + 1) * p.values_per_key]:
                    texts.append((k, f"{who} wrote down {v} as the code for the {thing} on {street}."))
                questions.append(
                    f"Which codes did {who} write down for the {thing} on {street}? List every one, "
                    f"separated by commas."
                    if multi
                    else f"Which code did {who} write down for the {thing} on {street}? Answer with the "
                    f"code only."
                )
            placement = "inline"
        slots = spread(len(texts), depth_range, float(rng.random()))
        slot_of = rng.permutation(len(texts))
        needles = [
            Needle(t, slots[int(slot_of[i])], "needle", placement)  # type: ignore[arg-type]
            for i, (_, t) in enumerate(texts)
        ]
        asked = sorted(rng.choice(p.num_keys, size=p.queries, replace=False).tolist())
        queries = []
        for k in asked:
            vals = values[k * p.values_per_key : (k + 1) * p.values_per_key]
            queries.append(
                Query(
                    question=questions[k],
                    answer=join_items(vals),
                    expected=vals,
                    match="set" if multi else "exact",
                    evidence=[i for i, (kk, _) in enumerate(texts) if kk == k],
                )
            )
        instruction = CLASSIC_INSTRUCTION if style == "classic" else STEALTH_INSTRUCTION
        return Draft(self.task, self.step, p.params(), instruction, needles, queries, {"style": style})

    def solve(self, context: str, question: str, params: dict[str, Any]) -> list[str]:
        m = re.search(r"magic numbers? for (\S+) mentioned", question)
        if m:
            key = re.escape(m.group(1))
            return re.findall(rf"special magic numbers? for {key} is: (\S+)\.", context)
        m = re.search(r"did (\w+) write down for the (.+?) on (.+?)\?", question)
        if m:
            who, thing, street = (re.escape(g) for g in m.groups())
            return re.findall(rf"{who} wrote down (\S+) as the code for the {thing} on {street}\.", context)
        return []
