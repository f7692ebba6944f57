"""Build the bundled cloze QA sets under data/qa/ from the bundled Wikipedia leads (deterministic, offline).

    python data/build_qa.py

Questions are generated mechanically, not written by people: in the first sentence of a lead, one span
is blanked out (the last four-digit year in it, else its last capitalised word of four or more letters
that is not part of the article's title and not the sentence's first word) and the question asks for it.
The answer is therefore a span of the lead. Leads whose first sentence has no such span, is under 40 or
over 400 characters, or holds the span twice are skipped; the planted `-dup` copies are skipped.

Outputs (byte-identical on every run):
  qa/wiki_cloze_qa1.jsonl.gz   one lead per item (SQuAD-style): question, answers, context, title, id
  qa/wiki_cloze_qa2.jsonl.gz   two leads per item (consecutive qa1 items, HotpotQA-style): two blanks,
                               context = both leads; the answer needs both paragraphs
The leads are CC BY-SA 4.0 (see LICENSES/CC-BY-SA-4.0-NOTICE.txt); these files, adapted from them, are too.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
YEAR = re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})\b")
CAPITAL = re.compile(r"\b[A-Z][a-z]{3,}\b")
SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def first_sentence(text: str) -> str:
    return SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def cloze(title: str, text: str) -> tuple[str, str] | None:
    """(sentence with the span blanked as ____, span) or None."""
    s = first_sentence(text)
    if not 40 <= len(s) <= 400 or "____" in s:
        return None
    years = YEAR.findall(s)
    title_words = set(re.findall(r"\w+", title))
    words = [m for m in CAPITAL.finditer(s) if m.start() > 0 and m.group() not in title_words]
    span = years[-1] if years else (words[-1].group() if words else None)
    if span is None or len(re.findall(rf"\b{re.escape(span)}\b", s)) != 1:
        return None
    return re.sub(rf"\b{re.escape(span)}\b", "____", s), span


def leads() -> list[dict[str, Any]]:
    out = []
    for p in sorted((HERE / "sample" / "wiki").glob("*.jsonl.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            out += [json.loads(line) for line in f]
    return [r for r in out if not r["id"].endswith("-dup")]


def write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(data)


def main() -> None:
    qa1 = []
    for r in leads():
        c = cloze(r["title"], r["text"])
        if c is None:
            continue
        blanked, span = c
        qa1.append(
            {
                "id": f"{r['id']}-cloze",
                "title": r["title"],
                "question": f'In the document about "{r["title"]}", which word fills the blank in: "{blanked}"?',
                "answers": [span],
                "context": r["text"].replace("\n", " "),
            }
        )
    qa2 = []
    for a, b in zip(qa1[0::2], qa1[1::2], strict=False):
        qa2.append(
            {
                "id": f"{a['id']}+{b['id']}",
                "title": [a["title"], b["title"]],
                "question": "Fill both blanks, answering with the two words in order, separated by a comma. "
                + f"(1) {a['question'][:-1]}; (2) {b['question'][:-1]}?",
                "answers": [a["answers"][0], b["answers"][0]],
                "context": [a["context"], b["context"]],
            }
        )
    write(HERE / "qa" / "wiki_cloze_qa1.jsonl.gz", qa1)
    write(HERE / "qa" / "wiki_cloze_qa2.jsonl.gz", qa2[:600])
    print(f"qa1: {len(qa1)} items, qa2: {min(len(qa2), 600)} items")


if __name__ == "__main__":
    main()
