"""Adversarial and conflicting evidence: needles built to be confused with the one that answers.

Three kinds, each recorded in the sample's evidence labels (`distractor:<kind>` on every needle that
must *not* be used, plain `needle` / `update` / `hash_pair` on the evidence):
- near_miss: the queried key's needle among needles whose keys share one of its two words
  (`amber-kettle` asked; `amber-lantern`, `quiet-kettle` distract);
- update_latest / update_original: a value stated, then contradicted by later corrections in context
  order; the question asks for the value after every correction, or for the one before any;
- prefix_chain: a hash chain (after Magic's HashHop) shadowed by decoy chains whose hashes share their
  first characters with the real chain's hash at the same step, so matching on a prefix goes astray.

The idea of conflicting and near-miss needles follows the adversarial needle evaluations of long-context
model reports; the sentences and constructions here are Longloom's own.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from pipeline.synth.procedural import words
from pipeline.synth.procedural.base import Draft, Needle, Query, spread, unique_ints, unique_strings
from schemas.procedural import AdversarialTask

ARROW = " → "
INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Read carefully: some keys look "
    "alike, and some numbers are corrected later. I will quiz you about them afterwards.\n\n"
)
CHAIN_INSTRUCTION = (
    "The document below holds lines of the form `A → B`, each linking one hash to the next hash of its "
    "chain. Some hashes look alike: follow exact matches only. Questions about the chains follow the "
    "document.\n\n"
)


def _near_miss_keys(rng: np.random.Generator, n: int) -> tuple[str, list[str]]:
    """The asked key and n keys sharing one of its words (alternately its adjective, its noun)."""
    adj = words.ADJECTIVES[int(rng.integers(len(words.ADJECTIVES)))]
    noun = words.NOUNS[int(rng.integers(len(words.NOUNS)))]
    other_nouns = [w for w in words.NOUNS if w != noun]
    other_adjs = [w for w in words.ADJECTIVES if w != adj]
    n_noun = (n + 1) // 2  # keys keeping the adjective
    if n_noun > len(other_nouns) or n - n_noun > len(other_adjs):
        raise ValueError(f"adversarial: at most {2 * len(other_adjs)} near-miss keys")
    nouns = rng.choice(len(other_nouns), size=n_noun, replace=False).tolist()
    adjs = rng.choice(len(other_adjs), size=n - n_noun, replace=False).tolist()
    near = [f"{adj}-{other_nouns[i]}" for i in nouns] + [f"{other_adjs[i]}-{noun}" for i in adjs]
    return f"{adj}-{noun}", [near[i] for i in rng.permutation(len(near)).tolist()]


class Adversarial:
    task = "adversarial"
    step = "adversarial@1"

    def draft(
        self, params: AdversarialTask, rng: np.random.Generator, index: int, depth_range: tuple[float, float]
    ) -> Draft:
        p = params
        if p.kind == "prefix_chain":
            return self._prefix_chain(p, rng, depth_range)
        values = [str(v) for v in unique_ints(rng, p.distractors + 1, 1_000_000, 10_000_000)]
        if p.kind == "near_miss":
            key, near = _near_miss_keys(rng, p.distractors)
            texts = [(f"The special magic number for {key} is: {values[0]}.", "needle")]
            texts += [
                (f"The special magic number for {k} is: {v}.", "distractor:near_miss")
                for k, v in zip(near, values[1:], strict=True)
            ]
            slots = spread(len(texts), depth_range, float(rng.random()))
            order = rng.permutation(len(texts)).tolist()
            needles = [Needle(t, slots[order[i]], label) for i, (t, label) in enumerate(texts)]
            query = Query(
                question=f"What is the special magic number for {key} mentioned in the document? "
                f"Answer with the number only.",
                answer=values[0],
                expected=[values[0]],
                match="exact",
                evidence=[0],
            )
            notes: dict[str, Any] = {"near_miss_keys": near}
        else:
            key, _ = _near_miss_keys(rng, 0)
            # the statements in context order: the first states the value, each later one corrects it
            slots = spread(len(values), depth_range, float(rng.random()))
            latest = p.kind == "update_latest"
            answer_at = len(values) - 1 if latest else 0
            needles = []
            for j, v in enumerate(values):
                text = (
                    f"The special magic number for {key} is: {v}."
                    if j == 0
                    else f"Correction: the special magic number for {key} has changed; it is now: {v}."
                )
                label = "update" if j == answer_at else "distractor:conflicting_update"
                needles.append(Needle(text, slots[j], label))
            question = (
                f"What is the special magic number for {key} now, after every correction in the document? "
                f"Answer with the number only."
                if latest
                else f"What was the special magic number for {key} first stated in the document, before any "
                f"correction? Answer with the number only."
            )
            query = Query(question, values[answer_at], [values[answer_at]], "exact", [answer_at])
            notes = {"updates": len(values) - 1}
        return Draft(self.task, self.step, p.params(), INSTRUCTION, needles, [query], notes)

    def _prefix_chain(
        self, p: AdversarialTask, rng: np.random.Generator, depth_range: tuple[float, float]
    ) -> Draft:
        real = unique_strings(rng, p.hops + 1, p.hash_length, p.alphabet)
        used = set(real)
        links: list[tuple[str, str, str]] = [(real[j], real[j + 1], "hash_pair") for j in range(p.hops)]
        # each decoy chain leaves from a step of the real chain; its hash at every step shares that step's
        # prefix with the real hash, so a reader matching only the first characters switches tracks
        branch = rng.integers(0, p.hops, size=p.distractors).tolist()
        tail = p.hash_length - p.shared_prefix
        for j in branch:
            decoy: list[str] = []
            for k in range(j, p.hops + 1):
                while True:
                    h = real[k][: p.shared_prefix] + unique_strings(rng, 1, tail, p.alphabet)[0]
                    if h not in used:
                        break
                used.add(h)
                decoy.append(h)
            links += [(decoy[i], decoy[i + 1], "distractor:prefix_chain") for i in range(len(decoy) - 1)]
        slots = spread(len(links), depth_range, float(rng.random()))
        order = rng.permutation(len(links)).tolist()
        needles = [Needle(f"{a}{ARROW}{b}", slots[order[i]], label) for i, (a, b, label) in enumerate(links)]
        query = Query(
            question=f"Follow the links that start at {real[0]}. Write every hash of that chain in order, "
            f"separated by '{ARROW.strip()}', from {real[0]} to the hash that has no further link.",
            answer=ARROW.join(real),
            expected=list(real),
            match="ordered",
            evidence=list(range(p.hops)),
        )
        notes = {"decoy_branch_steps": branch}
        return Draft(self.task, self.step, p.params(), CHAIN_INSTRUCTION, needles, [query], notes)

    def solve(self, context: str, question: str, params: dict[str, Any]) -> list[str]:
        if params["kind"] == "prefix_chain":
            alpha = "".join(re.escape(c) for c in params["alphabet"])
            h = rf"[{alpha}]{{{params['hash_length']}}}"
            nxt = dict(re.findall(rf"(?m)^({h}){re.escape(ARROW)}({h})$", context))
            m = re.search(rf"start at ({h})", question)
            if not m:
                return []
            chain = [m.group(1)]
            while chain[-1] in nxt and len(chain) <= len(nxt):
                chain.append(nxt[chain[-1]])
            return chain
        m = re.search(r"magic number for (\S+) ", question)
        if not m:
            return []
        key = re.escape(m.group(1))
        found = re.findall(rf"special magic number for {key} (?:is|has changed; it is now): (\d+)\.", context)
        if not found:
            return []
        return [found[-1]] if params["kind"] == "update_latest" else [found[0]]
