"""The chat package's shared words: what a target length counts, where pieces go, and its errors."""

from __future__ import annotations

from typing import Literal

LengthCounts = Literal["full_chat", "without_answers", "context_only"]
"""What `target_length` counts: the whole rendered sample; the sample minus every assistant turn
(header, content and end token); or only the context (haystack + inserted pieces + terminator)."""

Placement = Literal["line", "inline"]


class AssemblyError(RuntimeError):
    """The assembled ids differ from a full tokenization of the sample text, or sizing failed."""


class HaystackTooShort(AssemblyError):
    """The haystack holds fewer tokens than the target needs; give it more rows."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(
            f"haystack too short: {needed} tokens needed from the start position, {available} available"
        )
        self.needed = needed
        self.available = available
