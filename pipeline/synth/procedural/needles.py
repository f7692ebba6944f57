"""Multi-key / multi-value / multi-query needles after NVIDIA's RULER.

Classic needles are RULER's "special magic number" lines. Stealth needles are ordinary sentences
placed inside the prose at sentence boundaries, so nothing about their form marks them as the thing
to find; their keys (a person, a thing, a street) only make sense together.

RULER's knobs: classic keys as words, numbers or UUIDs; values as numbers, UUIDs or words; and the
haystack as the run's text, repeated noise sentences, or nothing but distractor needles of the same
form with keys never asked about (a dense context, see `pipeline.synth.procedural.dense`).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import numpy as np

from pipeline.synth.procedural import words
from pipeline.synth.procedural.base import Draft, Needle, Query, join_items, spread, unique_ints
from pipeline.synth.procedural.dense import Filler
from pipeline.synth.procedural.noise import noise_lines
from schemas.procedural import MultiNeedleTask

CLASSIC_INSTRUCTION = (
    "Some special magic numbers are hidden in the document below. Remember them: questions about them "
    "follow the document.\n\n"
)
STEALTH_INSTRUCTION = "Read the document below carefully; questions about its details follow it.\n\n"


def _values(rng: np.random.Generator, n: int, kind: str) -> list[str]:
    if kind == "uuid":
        return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]
    if kind == "word":
        if n > len(words.ITEMS):
            raise ValueError(f"multi_needle: at most {len(words.ITEMS)} word values")
        return [words.ITEMS[i] for i in rng.choice(len(words.ITEMS), size=n, replace=False).tolist()]
    return [str(v) for v in unique_ints(rng, n, 1_000_000, 10_000_000)]


def _keys(rng: np.random.Generator, n: int, kind: str) -> list[str]:
    if kind == "word":
        return _classic_keys(rng, n)
    return _values(rng, n, kind)


def _noun(value_kind: str) -> str:
    # number and uuid values keep RULER's "number" wording (and Longloom's earlier outputs)
    return "word" if value_kind == "word" else "number"


def _distractor_needles(p: MultiNeedleTask, real: set[str]) -> Any:
    """Needle lines of the same form whose keys are never the keys asked about."""
    noun = _noun(p.value_kind)

    def make(rng: np.random.Generator, n: int) -> list[str]:
        if p.key_kind == "word":  # few word keys exist: distractors may share one, never a real key
            pairs = [f"{a}-{b}" for a in words.ADJECTIVES for b in words.NOUNS]
            keys = [pairs[i] for i in rng.integers(0, len(pairs), size=2 * n).tolist()]
        else:
            keys = _values(rng, 2 * n, p.key_kind)
        keys = [k for k in keys if k not in real][:n]
        vals = (
            [words.ITEMS[i] for i in rng.integers(0, len(words.ITEMS), size=len(keys)).tolist()]
            if p.value_kind == "word"
            else _values(rng, len(keys), p.value_kind)
        )
        return [f"The special magic {noun} for {k} is: {v}." for k, v in zip(keys, vals, strict=True)]

    return make


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
            keys = _keys(rng, p.num_keys, p.key_kind)
            noun = _noun(p.value_kind)
            for k, key in enumerate(keys):
                for v in values[k * p.values_per_key : (k + 1) * p.values_per_key]:
                    lead = f"One of the special magic {noun}s" if multi else f"The special magic {noun}"
                    texts.append((k, f"{lead} for {key} is: {v}."))
                questions.append(
                    f"What are all the special magic {noun}s for {key} mentioned in the document? "
                    f"List every one, separated by commas."
                    if multi
                    else f"What is the special magic {noun} for {key} mentioned in the document? "
                    f"Answer with the {noun} only."
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
        if p.value_kind == "word":
            instruction = instruction.replace("magic numbers", "magic words")
        draft = Draft(self.task, self.step, p.params(), instruction, needles, queries, {"style": style})
        if p.haystack == "noise":
            draft.filler = Filler("noise", int(rng.integers(2**63)), noise_lines)
        elif p.haystack == "needles":
            draft.filler = Filler(
                "distractor_needles", int(rng.integers(2**63)), _distractor_needles(p, set(keys))
            )
        return draft

    def solve(self, context: str, question: str, params: dict[str, Any]) -> list[str]:
        m = re.search(r"magic (number|word)s? for (\S+) mentioned", question)
        if m:
            noun, key = m.group(1), re.escape(m.group(2))
            return re.findall(rf"special magic {noun}s? for {key} is: (\S+)\.", context)
        m = re.search(r"did (\w+) write down for the (.+?) on (.+?)\?", question)
        if m:
            who, thing, street = (re.escape(g) for g in m.groups())
            return re.findall(rf"{who} wrote down (\S+) as the code for the {thing} on {street}\.", context)
        return []
