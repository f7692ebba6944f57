"""Tolerant parsing of a model's JSON answer: strict first, then the usual ways models wrap or break it."""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


class ParseFailure(ValueError):
    """Why an answer could not be read; `reason` is the machine-readable rejection reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _candidates(text: str) -> list[str]:
    out = [text]
    out += [m.group(1) for m in _FENCE.finditer(text)]
    return out


def _decode_first_object(text: str) -> Any:
    """The first JSON object that decodes, scanning from each '{' (models add prose around it)."""
    dec = json.JSONDecoder()
    pos = text.find("{")
    tries = 0
    while pos >= 0 and tries < 50:
        for attempt in (text[pos:], _TRAILING_COMMA.sub(r"\1", text[pos:])):
            try:
                obj, _ = dec.raw_decode(attempt)
                return obj
            except ValueError:
                continue
        pos = text.find("{", pos + 1)
        tries += 1
    raise ValueError("no JSON object found")


def parse_json_answer(content: str | None, finish_reason: str | None = None) -> dict[str, Any]:
    """The JSON object in a model's answer, or a ParseFailure saying why not."""
    if not content or not content.strip():
        raise ParseFailure("empty_response", "the model returned no content")
    text = content.strip()
    if finish_reason == "length":
        # Cut at max_tokens: an inner object may still decode, but it is not the answer.
        for cand in _candidates(text):
            try:
                obj = json.loads(cand.strip())
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
        raise ParseFailure("truncated_output", "the answer was cut at max_tokens before its JSON closed")
    for cand in _candidates(text):
        try:
            obj = json.loads(cand.strip())
        except ValueError:
            try:
                obj = _decode_first_object(cand)
            except ValueError:
                continue
        if isinstance(obj, dict):
            return obj
    raise ParseFailure("unparseable", "no JSON object could be read from the answer")


def text_field(obj: dict[str, Any], name: str) -> str:
    """A required non-empty string field."""
    v = obj.get(name)
    if isinstance(v, int | float) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str) or not v.strip():
        raise ParseFailure("missing_field", f"field {name!r} is missing or not a non-empty string")
    return v.strip()
