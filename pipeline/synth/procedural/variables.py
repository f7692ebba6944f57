"""Variable tracking after NVIDIA's RULER: chains of assignments with distractor chains.

`VAR A = 48213`, later `VAR B = VAR A`, later `VAR C = VAR B`, ...: every name bound to the value must
be collected by following the chain forwards through the context, in the order the lines appear.
"""

from __future__ import annotations

import re
import string
from typing import Any

import numpy as np

from pipeline.synth.procedural.base import (
    Draft,
    Needle,
    Query,
    join_items,
    spread,
    unique_ints,
    unique_strings,
)
from pipeline.synth.procedural.dense import Filler
from pipeline.synth.procedural.noise import noise_lines
from schemas.procedural import VariableTrackingTask


class VariableTracking:
    task = "variable_tracking"
    step = "variable_tracking@1"

    def draft(
        self,
        params: VariableTrackingTask,
        rng: np.random.Generator,
        index: int,
        depth_range: tuple[float, float],
    ) -> Draft:
        p = params
        total = p.chains + p.distractors
        names = unique_strings(rng, total * (p.hops + 1), p.name_length, string.ascii_uppercase)
        values = unique_ints(rng, total, 10_000, 100_000)
        chain_names = [names[c * (p.hops + 1) : (c + 1) * (p.hops + 1)] for c in range(total)]
        # interleave the chains at random, keeping each chain's assignments in order
        seq = rng.permutation(np.repeat(np.arange(total), p.hops + 1)).tolist()
        slots = spread(len(seq), depth_range, float(rng.random()))
        nxt = [0] * total
        needles: list[Needle] = []
        owner: list[int] = []
        for slot, c in enumerate(seq):
            j = nxt[c]
            nxt[c] += 1
            rhs = str(values[c]) if j == 0 else f"VAR {chain_names[c][j - 1]}"
            needles.append(Needle(f"VAR {chain_names[c][j]} = {rhs}", slots[slot], "assignment"))
            owner.append(c)
        queries = [
            Query(
                question=(
                    f"Find all variables that are assigned the value {values[c]} in the document. "
                    f"List their names, separated by commas."
                ),
                answer=join_items(chain_names[c]),
                expected=list(chain_names[c]),
                match="set",
                evidence=[i for i, o in enumerate(owner) if o == c],
            )
            for c in range(p.chains)
        ]
        instruction = (
            "The document below contains variable assignments of the form `VAR NAME = ...`, in order. "
            "Keep track of them: questions follow the document.\n\n"
        )
        draft = Draft(self.task, self.step, p.params(), instruction, needles, queries)
        if p.haystack == "noise":  # RULER's setting: the assignments among repeated noise sentences
            draft.filler = Filler("noise", int(rng.integers(2**63)), noise_lines)
        return draft

    def solve(self, context: str, question: str, params: dict[str, Any]) -> list[str]:
        m = re.search(r"assigned the value (\d+)", question)
        if not m:
            return []
        env: dict[str, str] = {}
        for name, ref, val in re.findall(r"(?m)^VAR ([A-Z]+) = (?:VAR ([A-Z]+)|(\d+))$", context):
            bound = val or env.get(ref)
            if bound is not None:
                env[name] = bound
        return [n for n, v in env.items() if v == m.group(1)]
