"""Aggregation after NVIDIA's RULER common-word extraction: which items occur most often?

Log entries are spread over the whole context; a few items occur often, many occur rarely. No single
passage holds the answer: every entry has to be seen and counted.

With `haystack: entries` the context is RULER's common-word extraction list: nothing but entries,
the space the frequent and rare items leave filled with made-up words, `rare_count` entries each.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np

from pipeline.synth.procedural import words
from pipeline.synth.procedural.base import Draft, Needle, Query, join_items, spread
from pipeline.synth.procedural.dense import Filler
from schemas.procedural import AggregationTask

ENTRY = "Logged item: {}"


_ONSETS = ("b", "br", "d", "dr", "f", "g", "gl", "k", "l", "m", "n", "p", "pl", "r", "s", "st", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "n", "r", "s", "l", "m", "x")


def pseudo_words(rng: np.random.Generator, n: int, syllables: int = 3) -> list[str]:
    """n made-up words of a few syllables each (never one of the real item words: those have other shapes
    often enough not to matter, and the caller removes any that collide)."""
    parts = [rng.integers(0, len(t), size=(n, syllables)) for t in (_ONSETS, _VOWELS, _CODAS)]
    return [
        "".join(_ONSETS[o] + _VOWELS[v] + _CODAS[c] for o, v, c in zip(*(x[i] for x in parts), strict=True))
        for i in range(n)
    ]


def _filler_entries(rare_count: int) -> Any:
    """Entries of fresh made-up items, `rare_count` of each (so each stays below the frequent items)."""
    seen = set(words.ITEMS)

    def make(rng: np.random.Generator, n: int) -> list[str]:
        fresh = [w for w in pseudo_words(rng, max(1, n // rare_count)) if w not in seen]
        seen.update(fresh)
        return [ENTRY.format(w) for w in fresh for _ in range(rare_count)]

    return make


class Aggregation:
    task = "aggregation"
    step = "aggregation@1"

    def draft(
        self, params: AggregationTask, rng: np.random.Generator, index: int, depth_range: tuple[float, float]
    ) -> Draft:
        p = params
        n_items = p.top_k + p.rare_items
        if n_items > len(words.ITEMS):
            raise ValueError(f"aggregation: top_k + rare_items must be at most {len(words.ITEMS)}")
        items = [words.ITEMS[i] for i in rng.choice(len(words.ITEMS), size=n_items, replace=False).tolist()]
        frequent, rare = items[: p.top_k], items[p.top_k :]
        entries = [it for it in frequent for _ in range(p.frequent_count)]
        entries += [it for it in rare for _ in range(p.rare_count)]
        slots = spread(len(entries), depth_range, float(rng.random()))
        slot_of = rng.permutation(len(entries))
        needles = [
            Needle(ENTRY.format(it), slots[int(slot_of[i])], "log_entry") for i, it in enumerate(entries)
        ]
        ordered = sorted(frequent)
        query = Query(
            question=(
                f"Entries of the form '{ENTRY.format('X')}' are scattered through the document. Which "
                f"{p.top_k} items are logged most often? List them, separated by commas."
            ),
            answer=join_items(ordered),
            expected=ordered,
            match="set",
            evidence=list(range(len(entries))),  # every entry counts, the rare ones included
        )
        instruction = "The document below has an inventory log scattered through it.\n\n"
        draft = Draft(self.task, self.step, p.params(), instruction, needles, [query])
        if p.haystack == "entries":
            draft.filler = Filler("entries", int(rng.integers(2**63)), _filler_entries(p.rare_count))
            draft.instruction = "The document below is an inventory log.\n\n"
        return draft

    def solve(self, context: str, question: str, params: dict[str, Any]) -> list[str]:
        m = re.search(r"Which (\d+) items", question)
        if not m:
            return []
        k = int(m.group(1))
        counts = Counter(re.findall(r"(?m)^" + re.escape(ENTRY.format("")) + r"(\w+)$", context))
        ranked = counts.most_common()
        if len(ranked) < k or (len(ranked) > k and ranked[k - 1][1] == ranked[k][1]):
            return []  # no well-defined answer
        return sorted(item for item, _ in ranked[:k])
