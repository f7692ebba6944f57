"""What every procedural generator produces: needles to insert, and questions with their answers.

A generator turns (task parameters, a seeded RNG, the sample's index) into a `Draft`: text pieces
with the depths they should sit at, and queries whose answers follow from those pieces alone. It
also offers `solve`, a reference reader that answers a query from the context *text*, used by the
tests to show each answer is derivable from the context and only from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from pipeline.synth.chat import Placement
from pipeline.synth.procedural.dense import Filler

Match = Literal["exact", "set", "ordered"]

_GOLDEN = 0.6180339887498949


@dataclass(frozen=True)
class Needle:
    text: str
    depth: float  # where it should sit, 0 = start of the context, 1 = end
    label: str  # kind of evidence: "hash_pair", "needle", "assignment", "log_entry"
    placement: Placement = "line"


@dataclass(frozen=True)
class Query:
    question: str  # the user turn
    answer: str  # the reference assistant turn
    expected: list[str]  # what a grader accepts: the answer, or the answer set / sequence
    match: Match
    evidence: list[int]  # indices of the needles the answer needs


@dataclass
class Draft:
    task: str
    generator: str  # versioned step, e.g. "hash_chain@1"
    params: dict[str, Any]
    instruction: str  # goes before the context in the first user turn; ends with a line break
    needles: list[Needle]
    queries: list[Query]
    notes: dict[str, Any] = field(default_factory=dict)
    filler: Filler | None = None  # set: a dense context of generated lines instead of haystack text


class Generator(Protocol):
    task: str
    step: str

    def draft(
        self, params: Any, rng: np.random.Generator, index: int, depth_range: tuple[float, float]
    ) -> Draft: ...

    def solve(self, context: str, question: str, params: dict[str, Any]) -> list[str]: ...


def sample_offset(index: int) -> float:
    """A low-discrepancy offset in [0, 1): over consecutive samples, single needles cover all depths."""
    return (0.5 + index * _GOLDEN) % 1.0


def spread(n: int, depth_range: tuple[float, float], offset: float) -> list[float]:
    """n depths evenly spaced over `depth_range`, shifted within their slot by `offset`."""
    lo, hi = depth_range
    return [lo + (hi - lo) * (i + offset) / n for i in range(n)]


def unique_strings(rng: np.random.Generator, n: int, length: int, alphabet: str) -> list[str]:
    """n distinct random strings over `alphabet` (uniform, reproducible from `rng`)."""
    chars = np.array(list(alphabet))
    out: dict[str, None] = {}
    while len(out) < n:
        draw = rng.integers(0, len(chars), size=(max(8, 2 * (n - len(out))), length))
        for row in chars[draw]:
            out.setdefault("".join(row.tolist()))
            if len(out) == n:
                break
    return list(out)


def unique_ints(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    """n distinct integers in [lo, hi)."""
    if hi - lo < n:
        raise ValueError(f"cannot draw {n} distinct values from [{lo}, {hi})")
    out: dict[int, None] = {}
    while len(out) < n:
        for v in rng.integers(lo, hi, size=2 * (n - len(out))).tolist():
            out.setdefault(int(v))
            if len(out) == n:
                break
    return list(out)


def join_items(items: list[str]) -> str:
    return ", ".join(items)
