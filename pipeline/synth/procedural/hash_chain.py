"""Hash chains after Magic's HashHop: random hashes linked `a → b`, shuffled through the context.

Random hashes are incompressible, so the model cannot summarise its way to the answer: it must
retrieve each link from wherever it sits, hop after hop. Distractor chains share the format.

With `haystack: hashes` the context is HashHop's own setting: nothing but shuffled hash pairs (the
chains asked about, spread over the depth range, among as many distractor chains of the same length
as fill the context exactly), optionally with a share of the run's text lines interleaved.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from pipeline.synth.procedural.base import Draft, Needle, Query, spread, unique_strings
from pipeline.synth.procedural.dense import Filler
from schemas.procedural import HashChainTask

ARROW = " → "


def _positions(hops: int, completion: str) -> list[int]:
    """Which hashes of a chain (0..hops) the answer lists."""
    if completion == "chain_of_thought":
        return list(range(hops + 1))
    if completion == "skip":
        return [hops]
    pos = list(range(0, hops + 1, 2))
    return pos if pos[-1] == hops else [*pos, hops]


def _question(start: str, completion: str) -> str:
    if completion == "chain_of_thought":
        return (
            f"Follow the links that start at {start}. Write every hash of that chain in order, "
            f"separated by '{ARROW.strip()}', from {start} to the hash that has no further link."
        )
    if completion == "skip":
        return (
            f"Follow the links that start at {start} to the end of the chain. Which hash is the last "
            f"one? Answer with that hash only."
        )
    return (
        f"Follow the links that start at {start}. Write every second hash of that chain in order "
        f"(the 1st, 3rd, 5th, ...), always ending with its last hash, separated by '{ARROW.strip()}'."
    )


def _distractor_links(p: HashChainTask, used: set[str]) -> Any:
    """A line maker for distractor chains as long as the real ones, with hashes never used before."""

    def make(rng: np.random.Generator, n: int) -> list[str]:
        chains = max(1, -(-n // p.hops))
        fresh: list[str] = []
        while len(fresh) < chains * (p.hops + 1):
            for h in unique_strings(rng, chains * (p.hops + 1) - len(fresh), p.hash_length, p.alphabet):
                if h not in used:
                    used.add(h)
                    fresh.append(h)
        return [
            f"{fresh[c * (p.hops + 1) + j]}{ARROW}{fresh[c * (p.hops + 1) + j + 1]}"
            for c in range(chains)
            for j in range(p.hops)
        ]

    return make


class HashChain:
    task = "hash_chain"
    step = "hash_chain@1"

    def draft(
        self, params: HashChainTask, rng: np.random.Generator, index: int, depth_range: tuple[float, float]
    ) -> Draft:
        p = params
        hashes = unique_strings(rng, p.chains * (p.hops + 1), p.hash_length, p.alphabet)
        chains = [hashes[c * (p.hops + 1) : (c + 1) * (p.hops + 1)] for c in range(p.chains)]
        links = [(c, j) for c in range(p.chains) for j in range(p.hops)]
        slots = spread(len(links), depth_range, float(rng.random()))
        slot_of = rng.permutation(len(links))  # link i sits in slot slot_of[i]: shuffled through the context
        needles = [
            Needle(f"{chains[c][j]}{ARROW}{chains[c][j + 1]}", slots[int(slot_of[i])], "hash_pair")
            for i, (c, j) in enumerate(links)
        ]
        asked = sorted(rng.choice(p.chains, size=p.queries, replace=False).tolist())
        queries = []
        for c in asked:
            listed = [chains[c][k] for k in _positions(p.hops, p.completion)]
            queries.append(
                Query(
                    question=_question(chains[c][0], p.completion),
                    answer=ARROW.join(listed),
                    expected=listed,
                    match="exact" if p.completion == "skip" else "ordered",
                    evidence=[i for i, (cc, _) in enumerate(links) if cc == c],
                )
            )
        instruction = (
            "The document below holds lines of the form `A → B`, each linking one hash to the next hash "
            "of its chain. Questions about the chains follow the document.\n\n"
        )
        draft = Draft(self.task, self.step, p.params(), instruction, needles, queries)
        if p.haystack == "hashes":
            draft.filler = Filler(
                "hash_pairs", int(rng.integers(2**63)), _distractor_links(p, set(hashes)), p.prose_share
            )
            draft.instruction = (
                "The document below consists of lines of the form `A → B`, each linking one hash to the next "
                "hash of its chain; the lines are shuffled. Questions about the chains follow the document.\n\n"
            )
        return draft

    def solve(self, context: str, question: str, params: dict[str, Any]) -> list[str]:
        alpha = "".join(re.escape(c) for c in params["alphabet"])
        h = rf"[{alpha}]{{{params['hash_length']}}}"
        links = dict(re.findall(rf"(?m)^({h}){re.escape(ARROW)}({h})$", context))
        m = re.search(rf"start at ({h})", question)
        if not m:
            return []
        chain = [m.group(1)]
        while chain[-1] in links and len(chain) <= len(links):
            chain.append(links[chain[-1]])
        return [chain[k] for k in _positions(len(chain) - 1, params["completion"])]
