"""Token <-> character positions and *safe boundaries*, where a regex-pretokenized BPE always splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.tokenizer import Tokenizer, TokenizerError

# --- token <-> char positions and safe boundaries -------------------------------------------------------


def token_char_starts(tok: Tokenizer, ids: np.ndarray) -> np.ndarray:
    """int64 array of len(ids) + 1: the char offset where each token starts, then the total chars."""
    require_byte_level(tok)
    out = np.zeros(len(ids) + 1, np.int64)
    if len(ids):
        np.cumsum(tok.token_nchars[np.asarray(ids, np.int64)], out=out[1:])
    return out


def chars_to_tokens(starts: np.ndarray, char_start: int, char_end: int) -> tuple[int, int]:
    """Token span covering chars [char_start, char_end), given `token_char_starts` output."""
    n = len(starts) - 1
    t0 = int(np.searchsorted(starts[:n], char_start, side="right")) - 1
    t1 = int(np.searchsorted(starts[:n], char_end, side="left"))
    return max(t0, 0), max(t1, max(t0, 0))


def require_byte_level(tok: Tokenizer) -> None:
    if not tok.byte_level:
        raise TokenizerError(
            f"{tok.name}: token-exact assembly needs a byte-level BPE tokenizer (quicktok:, tiktoken:, or an "
            f"hf: tokenizer with a ByteLevel decoder)"
        )


@dataclass(frozen=True)
class BoundaryTables:
    """Per-token-id flags from which safe boundaries are found with vectorised lookups."""

    starts_nonspace: np.ndarray  # first character is a complete, non-whitespace character
    starts_space: np.ndarray  # first byte is " "
    starts_space_upper: np.ndarray  # " " followed by an ASCII capital: a sentence may start here
    ends_newline: np.ndarray  # last byte is "\n"
    ends_nonspace: np.ndarray  # last character is a complete, non-whitespace character
    ends_sentence: np.ndarray  # last byte is one of . ! ?


def _first_char(b: bytes) -> str | None:
    for k in range(1, min(4, len(b)) + 1):
        try:
            return b[:k].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def _last_char(b: bytes) -> str | None:
    for k in range(1, min(4, len(b)) + 1):
        try:
            return b[-k:].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


_TABLES: dict[str, BoundaryTables] = {}
_BYTES: dict[str, list[bytes]] = {}
_FLAT: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """Bytes of every ordinary token id (b"" for specials), cached per vocabulary."""
    key = tok.identity.vocab_hash
    if key not in _BYTES:
        _BYTES[key] = tok._token_bytes()
    return _BYTES[key]


def decode_ordinary(tok: Tokenizer, ids: np.ndarray) -> bytes:
    """Bytes of ordinary (non-special) token ids, gathered with numpy: ~20x a per-token Python join."""
    key = tok.identity.vocab_hash
    if key not in _FLAT:
        table = token_bytes(tok)
        lens = np.fromiter((len(b) for b in table), np.int64, count=len(table))
        _FLAT[key] = (np.frombuffer(b"".join(table), np.uint8), np.r_[0, np.cumsum(lens)[:-1]])
    flat, starts = _FLAT[key]
    ids = np.asarray(ids, np.int64)
    lens = tok.token_nbytes[ids]
    total = int(lens.sum())
    if total == 0:
        return b""
    out_start = np.cumsum(lens) - lens
    idx = np.repeat(starts[ids] - out_start, lens) + np.arange(total, dtype=np.int64)
    return flat[idx].tobytes()


def boundary_tables(tok: Tokenizer) -> BoundaryTables:
    """The flag tables of a tokenizer's vocabulary (built once per process, ~0.2 s for 128K ids)."""
    key = tok.identity.vocab_hash
    if key in _TABLES:
        return _TABLES[key]
    require_byte_level(tok)
    table = token_bytes(tok)
    n = len(table)
    sn, ss, su, en, ens, es = (np.zeros(n, bool) for _ in range(6))
    for i, b in enumerate(table):
        if not b:
            continue
        f = _first_char(b)
        sn[i] = f is not None and not f.isspace()
        ss[i] = b[0] == 0x20
        su[i] = len(b) > 1 and b[0] == 0x20 and 0x41 <= b[1] <= 0x5A
        last = _last_char(b)
        en[i] = b[-1] == 0x0A
        ens[i] = last is not None and not last.isspace()
        es[i] = b[-1] in b".!?"
    _TABLES[key] = BoundaryTables(sn, ss, su, en, ens, es)
    return _TABLES[key]


def safe_boundaries(tok: Tokenizer, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token indices of line, inline and sentence boundaries in a tokenized text.

    Line: token t follows a token ending in "\\n" and starts with a non-space character (t = 0 counts
    when it starts with a non-space character). Inline: token t starts with " " and follows a token
    ending in a non-space character. Sentence: inline boundaries after . ! ? before " " + capital.
    """
    t = boundary_tables(tok)
    ids = np.asarray(ids, np.int64)
    if len(ids) == 0:
        e = np.zeros(0, np.int64)
        return e, e, e
    prev, cur = ids[:-1], ids[1:]
    line = np.flatnonzero(t.ends_newline[prev] & t.starts_nonspace[cur]) + 1
    if t.starts_nonspace[ids[0]]:
        line = np.r_[0, line]
    inline_mask = t.ends_nonspace[prev] & t.starts_space[cur]
    inline = np.flatnonzero(inline_mask) + 1
    sentence = np.flatnonzero(inline_mask & t.ends_sentence[prev] & t.starts_space_upper[cur]) + 1
    return line.astype(np.int64), inline.astype(np.int64), sentence.astype(np.int64)
