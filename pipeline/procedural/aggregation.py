"""Aggregation after NVIDIA's RULER common-word extraction: which items occur most often?

Log entries are spread over the whole context; a few items occur often, many occur rarely. No single
passage holds the answer: every entry has to be seen and counted.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np

from pipeline.procedural import words
from pipeline.procedural.base import Draft, Needle, Query, join_items, spread
from schemas.procedural import AggregationTask

ENTRY = "Logged item: {}"


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
        return Draft(self.task, self.step, p.params(), instruction, needles, [query])

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
