"""Frequent-word extraction after NVIDIA's RULER (FWE): a text of made-up words with Zipf-distributed
frequencies; name the few most frequent.

The context is dense (nothing but word lines). RULER draws every word from a Zipf law; here each line
holds a fixed number of the top words in Zipf proportion and fills the rest with words of lower rank
drawn from the Zipf tail, at most `top_counts[-1] - 1` times each per line. So the top words are the top
in any part of the context, and the answer holds however many lines fill the target length.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np

from pipeline.synth.procedural.aggregation import pseudo_words
from pipeline.synth.procedural.base import Draft, Query, join_items
from pipeline.synth.procedural.dense import Filler
from schemas.procedural import FrequentWordsTask


def zipf_weights(n: int, alpha: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** alpha
    return np.asarray(w / w.sum())


def top_counts(p: FrequentWordsTask) -> list[int]:
    """How often each top word occurs in every line: Zipf proportions of the line, rounded, at least
    one more than the next."""
    w = zipf_weights(p.vocabulary, p.alpha)
    counts = [max(1, round(float(x) * p.words_per_line)) for x in w[: p.top_k]]
    for i in range(len(counts) - 2, -1, -1):
        counts[i] = max(counts[i], counts[i + 1] + 1)
    counts[-1] = max(counts[-1], 2)  # the tail may then repeat a word once per line
    for i in range(len(counts) - 2, -1, -1):
        counts[i] = max(counts[i], counts[i + 1] + 1)
    return counts


def _lines(p: FrequentWordsTask, vocab: list[str]) -> Any:
    fixed = top_counts(p)
    cap = fixed[-1] - 1
    tail_w = zipf_weights(p.vocabulary, p.alpha)[p.top_k :]
    tail_w = tail_w / tail_w.sum()
    free = max(1, p.words_per_line - sum(fixed))

    def make(rng: np.random.Generator, n: int) -> list[str]:
        out = []
        draws = rng.choice(len(tail_w), size=(n, free * 2), p=tail_w)
        for row in draws.tolist():
            seen: Counter[int] = Counter()
            tail: list[str] = []
            for r in row:
                if seen[r] < cap:
                    seen[r] += 1
                    tail.append(vocab[p.top_k + r])
                if len(tail) == free:
                    break
            line = [vocab[i] for i, c in enumerate(fixed) for _ in range(c)] + tail
            out.append(" ".join(line[i] for i in rng.permutation(len(line)).tolist()))
        return out

    return make


class FrequentWords:
    task = "frequent_words"
    step = "frequent_words@1"

    def draft(
        self,
        params: FrequentWordsTask,
        rng: np.random.Generator,
        index: int,
        depth_range: tuple[float, float],
    ) -> Draft:
        p = params
        vocab: list[str] = []
        while len(vocab) < p.vocabulary:
            vocab = list(dict.fromkeys([*vocab, *pseudo_words(rng, p.vocabulary - len(vocab))]))
        answer = sorted(vocab[: p.top_k])
        query = Query(
            question=(
                f"Which {p.top_k} words occur most often in the text above? List them, separated by commas."
            ),
            answer=join_items(answer),
            expected=answer,
            match="set",
            evidence=[],
        )
        instruction = (
            "Read the text of made-up words below; a question about their frequencies follows it.\n\n"
        )
        draft = Draft(self.task, self.step, p.params(), instruction, [], [query])
        draft.filler = Filler("zipf_words", int(rng.integers(2**63)), _lines(p, vocab))
        return draft

    def solve(self, context: str, question: str, params: dict[str, Any]) -> list[str]:
        m = re.search(r"Which (\d+) words", question)
        if not m:
            return []
        k = int(m.group(1))
        body = context.split("\n\n", 1)[-1]
        counts = Counter(re.findall(r"[a-z]+", body.rsplit("\n\n", 1)[0]))
        ranked = counts.most_common()
        if len(ranked) < k or (len(ranked) > k and ranked[k - 1][1] == ranked[k][1]):
            return []
        return sorted(w for w, _ in ranked[:k])
