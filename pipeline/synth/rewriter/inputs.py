"""Existing chat data to rephrase: ShareGPT- and UltraChat-style JSON or JSONL, read as (role, content) turns.

Accepted shapes, per record: `{"conversations": [{"from": "human"|"gpt"|..., "value": ...}]}` (ShareGPT),
`{"messages": [{"role": ..., "content": ...}]}` (UltraChat 200k, OpenAI style) and `{"data": [str, ...]}`
(original UltraChat, alternating user/assistant). A file is JSONL, or one JSON array; an array cut
short (ShareGPT dumps often are) is read record by record up to the cut. Records that are not a usable
conversation are counted by reason, never silently skipped.
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ROLE = {
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Conversation:
    ref: str  # file:record, for lineage
    turns: tuple[tuple[str, str], ...]  # (role, content), user first, alternating, ending with assistant

    @property
    def chars(self) -> int:
        return sum(len(c) for _, c in self.turns)


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    head = text.lstrip()[:1]
    dec = json.JSONDecoder()
    if head == "[":
        pos = text.index("[") + 1
        k = 0
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                return
            try:
                obj, pos = dec.raw_decode(text, pos)
            except ValueError:
                yield k, None  # the array is cut short here
                return
            yield k, obj
            k += 1
    else:
        for k, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield k, json.loads(line)
            except ValueError:
                yield k, None


def _turns(obj: Any) -> list[tuple[str, str]] | None:
    if not isinstance(obj, dict):
        return None
    raw: list[tuple[str, str]] = []
    if isinstance(obj.get("conversations"), list):
        for m in obj["conversations"]:
            if isinstance(m, dict):
                raw.append((str(m.get("from", "")).lower(), str(m.get("value") or "")))
    elif isinstance(obj.get("messages"), list):
        for m in obj["messages"]:
            if isinstance(m, dict):
                raw.append((str(m.get("role", "")).lower(), str(m.get("content") or "")))
    elif isinstance(obj.get("data"), list):
        raw = [("user" if i % 2 == 0 else "assistant", str(t)) for i, t in enumerate(obj["data"])]
    else:
        return None
    out: list[tuple[str, str]] = []
    for role, content in raw:
        r = _ROLE.get(role)
        if r is None or r == "system" or not content.strip():
            continue
        if out and out[-1][0] == r:  # merge consecutive turns of one speaker
            out[-1] = (r, out[-1][1] + "\n\n" + content)
        elif out or r == "user":
            out.append((r, content))
    if out and out[-1][0] == "user":
        out.pop()
    return out if len(out) >= 2 else None


def load_conversations(
    patterns: list[str], base_dir: Path, max_chars: int, skipped: Counter[str]
) -> Iterator[Conversation]:
    """Usable conversations from the input files, in file and record order; `skipped` counts the rest."""
    paths: list[Path] = []
    for pat in patterns:
        full = pat if Path(pat).is_absolute() else str(base_dir / pat)
        found = sorted(Path(p) for p in glob.glob(full, recursive=True))
        if not found:
            raise FileNotFoundError(
                f"rewriter rephrase input {pat!r}: no file matches (relative to {base_dir})"
            )
        paths += found
    for path in paths:
        for k, obj in _records(path):
            if obj is None:
                skipped["malformed_json"] += 1
                continue
            turns = _turns(obj)
            if turns is None:
                skipped["not_a_conversation"] += 1
                continue
            conv = Conversation(f"{path.name}:{k}", tuple(turns))
            if conv.chars > max_chars:
                skipped["too_long"] += 1
                continue
            yield conv
