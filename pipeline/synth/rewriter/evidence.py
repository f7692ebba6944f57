"""Finding the model's evidence quotes in the context, verbatim up to whitespace and typography.

The context and the quote are both normalised (runs of whitespace become one space, curly quotes and
dashes become ASCII) with a map from every normalised character back to the original text, so a
match gives exact character spans in the context, from which the sample's token positions follow.
Built with numpy over code points: a 1M-token context normalises in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_WS = np.array(
    [
        9,
        10,
        11,
        12,
        13,
        32,
        0x85,
        0xA0,
        0x1680,
        *range(0x2000, 0x200B),
        0x2028,
        0x2029,
        0x202F,
        0x205F,
        0x3000,
    ],
    np.uint32,
)
# One code point to one code point, so normalised offsets map back one to one.
_FOLD = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u2033": '"',
        "\u2010": "-",
        "\u2011": "-",
        "\u2012": "-",
        "\u2013": "-",
        "\u2014": "-",
        "\u2212": "-",
    }
)
_STRIP = " \t\r\n\"'`\u201c\u201d\u2018\u2019"


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.translate(_FOLD).encode("utf-32-le"), dtype=np.uint32)


def _from_codepoints(cp: np.ndarray) -> str:
    return cp.astype("<u4").tobytes().decode("utf-32-le")


@dataclass
class NormalizedText:
    """A text with whitespace runs collapsed, ASCII-lowercased, and a map back to original offsets."""

    norm: str
    to_orig: np.ndarray  # int64: normalised index -> original index; one extra entry = len(original)

    @classmethod
    def of(cls, text: str) -> NormalizedText:
        cp = _codepoints(text)
        if cp.size == 0:
            return cls("", np.zeros(1, np.int64))
        ws = np.isin(cp, _WS)
        keep = ~ws | ~np.r_[False, ws[:-1]]
        cp = np.where(ws, np.uint32(32), cp)
        cp = np.where((cp >= 65) & (cp <= 90), cp + np.uint32(32), cp)
        idx = np.flatnonzero(keep).astype(np.int64)
        return cls(_from_codepoints(cp[keep]), np.r_[idx, len(text)])

    def find_all(self, quote: str, limit: int = 64) -> list[tuple[int, int]]:
        """Original-text (start, end) character spans of every occurrence of `quote`."""
        q = normalize_quote(quote)
        if not q:
            return []
        spans: list[tuple[int, int]] = []
        pos = self.norm.find(q)
        while pos >= 0 and len(spans) < limit:
            end = pos + len(q)
            spans.append((int(self.to_orig[pos]), int(self.to_orig[end - 1]) + 1))
            pos = self.norm.find(q, pos + 1)
        return spans


def normalize_quote(quote: str) -> str:
    """The quote as NormalizedText would hold it, without wrapping quotes or a trailing ellipsis."""
    q = quote.strip()
    for suffix in ("...", "\u2026"):
        q = q.removesuffix(suffix)
    for prefix in ("...", "\u2026"):
        q = q.removeprefix(prefix)
    q = q.strip(_STRIP)
    if not q:
        return ""
    return NormalizedText.of(q).norm.strip()
