"""Is a tokenizer exact on the benchmark corpus? Every document and every distinct word against Meta's.

    python bench/check_tokenizer_exact.py /tmp/corpora/bench-200mb [--tokenizer fastokens:llama3]

Issue 19 keeps the fastest tokenizer that matches the reference on every document of the benchmark
corpus and on every distinct word of it. This reads every document of a `bench/make_corpus.py` folder
(repeats of a document, the `#rN` ids, are compared once), and compares the tokenizer's ids with the
reference's:
- documents: each whole document;
- words: every distinct pre-token under Meta's pattern and every whitespace-separated word, with and
  without a leading space, each encoded on its own.
The reference shares no code or files with Longloom's tokenizers: tiktoken over the ranks of Meta's
`tokenizer.model` with the pattern of Meta's `tokenizer.json` (Meta's own `tokenizer.py` is tiktoken with
these), the files fetched once by the tests (`tests/token_reference.py`). Special-token text is
ordinary text on both sides. Prints the counts, the seconds, and the first differences; exits 1 if any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import regex

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core.tokenizer import load_tokenizer  # noqa: E402
from tests.token_reference import META_PATTERN, meta_tiktoken  # noqa: E402

BATCH = 2_000


def unique_documents(corpus: Path) -> Iterator[str]:
    seen: set[bytes] = set()
    for shard in sorted(corpus.glob("part-*.jsonl")):
        with shard.open(encoding="utf-8") as fh:
            for line in fh:
                text = json.loads(line)["text"]
                key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                if key not in seen:
                    seen.add(key)
                    yield text


def batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def compare(texts: list[str], tokenizer: object, reference: object) -> list[tuple[str, list[int], list[int]]]:
    """(text, got, want) for every text whose ids differ."""
    ids, offsets = tokenizer.encode_batch(texts)  # type: ignore[attr-defined]
    want = reference.encode_ordinary_batch(texts, num_threads=2)  # type: ignore[attr-defined]
    bad = []
    for i, w in enumerate(want):
        got = ids[offsets[i] : offsets[i + 1]]
        if len(got) != len(w) or not np.array_equal(got, np.asarray(w, dtype=got.dtype)):
            bad.append((texts[i], got.tolist(), w))
    return bad


def show(kind: str, bad: list[tuple[str, list[int], list[int]]]) -> None:
    for text, got, want in bad[:5]:
        pos = next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
        )
        print(
            f"  {kind} {text[:60]!r}: at token {pos} {got[pos : pos + 4]} vs reference {want[pos : pos + 4]}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--tokenizer", default="fastokens:llama3")
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    ref = meta_tiktoken()
    pattern = regex.compile(META_PATTERN)
    t0 = time.perf_counter()
    docs = doc_chars = 0
    bad_docs: list[tuple[str, list[int], list[int]]] = []
    words: set[str] = set()
    for batch in batches(unique_documents(args.corpus), BATCH):
        bad_docs += compare(batch, tok, ref)
        docs += len(batch)
        for d in batch:
            words.update(pattern.findall(d))
            for w in d.split():
                words.add(w)
                words.add(" " + w)
        doc_chars += sum(len(t) for t in batch)
    t1 = time.perf_counter()
    bad_words: list[tuple[str, list[int], list[int]]] = []
    ordered = sorted(words)
    for batch in batches(iter(ordered), 50_000):
        bad_words += compare(batch, tok, ref)
    t2 = time.perf_counter()
    print(
        f"{args.tokenizer} against tiktoken over Meta's tokenizer.model, on {args.corpus}:\n"
        f"  documents: {len(bad_docs)} of {docs:,} unique documents differ ({doc_chars / 1e6:.0f} M characters, {t1 - t0:.0f} s)\n"
        f"  distinct words: {len(bad_words)} of {len(ordered):,} differ ({t2 - t1:.0f} s)"
    )
    show("document", bad_docs)
    show("word", bad_words)
    return 1 if bad_docs or bad_words else 0


if __name__ == "__main__":
    raise SystemExit(main())
