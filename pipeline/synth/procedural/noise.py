"""RULER-style noise haystacks: a few plain sentences repeated, so the haystack carries no information.

RULER (Hsieh et al. 2024) offers a "noise" haystack of repeated sentences beside essays; the sentences
here are Longloom's own. A line holds one to six of them, starting at a varying sentence, so lines
differ in token count (the dense assembler needs that to size a context exactly).
"""

from __future__ import annotations

import numpy as np

NOISE = (
    "The river is wide.",
    "The hill is green.",
    "The road runs on.",
    "Here we are.",
    "Back and forth again.",
)


def noise_lines(rng: np.random.Generator, n: int) -> list[str]:
    starts = rng.integers(0, len(NOISE), size=n).tolist()
    sizes = rng.integers(1, 7, size=n).tolist()
    return [
        " ".join(NOISE[(s + j) % len(NOISE)] for j in range(k)) for s, k in zip(starts, sizes, strict=True)
    ]
