"""Chat templates rendered straight to token ids, and token-exact assembly of long contexts.

Shared by the procedural generators (issue 4) and the LLM rewriter (issue 5).

Templates. A template turns a messages list into token ids and records where every message and its
content sit. Structure tokens (`<|start_header_id|>`, `<|im_start|>`, ...) are special ids; role names,
the line breaks after headers and every message content are tokenized as ordinary text, each piece on
its own, so a document that spells a special token stays text. For content that does not start with
whitespace (Meta's template trims content), the ids equal a whole-string tokenization of
`render_text()` with special tokens allowed. Built in: "llama3" (Meta's Llama-3 format) and "chatml"
(Qwen-style `<|im_start|>role\\n ... <|im_end|>\\n`).

Assembly. `assemble_chat` builds a sample whose counted length (see `LengthCounts`) is exactly the
target, from real haystack text and pieces (needles, evidence) to insert at given depths. It works on
token ids, not by re-tokenizing the context per try (RULER binary-searched over re-tokenizations):

- the haystack is tokenized once (`Haystack`);
- pieces go in only at *safe boundaries*, where a regex-pretokenized BPE (tiktoken/Llama-3/Qwen
  style) always splits, so tok(A + piece + B) == tok(A) + tok(piece) + tok(B):
  "line" boundaries right after a line break followed by a non-space character (a line piece is
  `text + "\\n"`), and "inline" boundaries before a space that follows a non-space character
  (an inline piece is `" " + sentence`; sentence ends are preferred, so it reads as part of the prose);
- the haystack is cut at a safe boundary a few tokens short of the budget, and the last tokens come
  from re-tokenizing a short window (haystack tail + the context terminator) at a few candidate cut
  points until the count is exact;
- the whole sample is then tokenized once from its text and compared with the assembled ids
  (`AssemblyError` if they differ), so a tokenizer that breaks the boundary assumption cannot
  produce a silently wrong sample.

Positions are reported per piece (char span in the message content, token span in the sample) and per
haystack run (what text of which source segment ended where), so callers can record lineage.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from pipeline.core.tokenizer import Tokenizer, TokenizerError

LengthCounts = Literal["full_chat", "without_answers", "context_only"]
"""What `target_length` counts: the whole rendered sample; the sample minus every assistant turn
(header, content and end token); or only the context (haystack + inserted pieces + terminator)."""

Placement = Literal["line", "inline"]


class AssemblyError(RuntimeError):
    """The assembled ids differ from a full tokenization of the sample text, or sizing failed."""


class HaystackTooShort(AssemblyError):
    """The haystack holds fewer tokens than the target needs; give it more rows."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(
            f"haystack too short: {needed} tokens needed from the start position, {available} available"
        )
        self.needed = needed
        self.available = available


# --- templates ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateSpec:
    """A chat format as special tokens around ordinary-text pieces."""

    name: str
    bos: str | None  # special token once at the start of the sample
    header_start: str  # special token before the role name
    header_end: str | None  # special token after the role name (None: the role is followed by `after_role`)
    after_header: str  # ordinary text between the header and the content
    end_of_message: str  # special token after the content
    after_message: str  # ordinary text after the end token ("" or "\n")


TEMPLATES: dict[str, TemplateSpec] = {
    "llama3": TemplateSpec(
        name="llama3",
        bos="<|begin_of_text|>",
        header_start="<|start_header_id|>",
        header_end="<|end_header_id|>",
        after_header="\n\n",
        end_of_message="<|eot_id|>",
        after_message="",
    ),
    "chatml": TemplateSpec(
        name="chatml",
        bos=None,
        header_start="<|im_start|>",
        header_end=None,
        after_header="\n",
        end_of_message="<|im_end|>",
        after_message="\n",
    ),
}

ROLES = ("system", "user", "assistant")


def _content(m: Mapping[str, Any]) -> str:
    c = m.get("content")
    if not isinstance(c, str):
        raise ValueError(f"message content must be a string, got {type(c).__name__}: {m!r:.80}")
    return c


@dataclass
class RenderedChat:
    """Token ids of a rendered chat and where each message and its content lie in them."""

    ids: np.ndarray  # int32
    roles: list[str]
    message_spans: np.ndarray  # (n, 2) int64: header start .. after the end-of-message text
    content_spans: np.ndarray  # (n, 2) int64: the content tokens alone
    generation_prompt: tuple[int, int] | None  # span of the trailing assistant header, if added
    tok: Tokenizer = field(repr=False)
    _char_starts: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def content_char_starts(self, i: int) -> np.ndarray:
        """Char offset (in message i's content) where each of its tokens starts, plus the total."""
        if i not in self._char_starts:
            a, b = self.content_spans[i]
            self._char_starts[i] = token_char_starts(self.tok, self.ids[a:b])
        return self._char_starts[i]

    def locate(self, i: int, char_start: int, char_end: int) -> tuple[int, int]:
        """Token span (in the sample) of the tokens covering chars [char_start, char_end) of message i."""
        starts = self.content_char_starts(i)
        t0, t1 = chars_to_tokens(starts, char_start, char_end)
        base = int(self.content_spans[i][0])
        return base + t0, base + t1

    def counted(self, policy: LengthCounts, context_tokens: int | None = None) -> int:
        """Length under a `LengthCounts` policy (`context_only` needs the context's token count)."""
        if policy == "full_chat":
            return len(self.ids)
        if policy == "without_answers":
            answers = sum(
                int(b - a)
                for (a, b), r in zip(self.message_spans, self.roles, strict=True)
                if r == "assistant"
            )
            return len(self.ids) - answers
        if context_tokens is None:
            raise ValueError("length_counts 'context_only' needs the context's token count")
        return context_tokens


class ChatTemplate:
    """A `TemplateSpec` bound to a tokenizer: special ids resolved once, headers cached."""

    def __init__(self, spec: TemplateSpec, tok: Tokenizer) -> None:
        self.spec = spec
        self.tok = tok
        try:
            self._bos = [tok.special_token_id(spec.bos)] if spec.bos else []
            self._hs = tok.special_token_id(spec.header_start)
            self._he = [tok.special_token_id(spec.header_end)] if spec.header_end else []
            self._eom = tok.special_token_id(spec.end_of_message)
        except TokenizerError as err:
            raise TokenizerError(
                f"chat template {spec.name!r} does not fit tokenizer {tok.name}: {err}. "
                f"Use 'llama3' with a Llama-3 vocabulary, 'chatml' with a Qwen-style one."
            ) from None
        self._after_msg = self._text_ids(spec.after_message)
        self._headers: dict[str, np.ndarray] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    def _text_ids(self, text: str) -> np.ndarray:
        return self.tok.encode(text) if text else np.zeros(0, np.int32)

    def header_ids(self, role: str) -> np.ndarray:
        if role not in self._headers:
            if self.spec.header_end:
                parts = [[self._hs], self._text_ids(role), self._he, self._text_ids(self.spec.after_header)]
            else:
                parts = [[self._hs], self._text_ids(role + self.spec.after_header)]
            self._headers[role] = np.concatenate([np.asarray(p, np.int32) for p in parts])
        return self._headers[role]

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        content_ids: Mapping[int, np.ndarray] | None = None,
        add_generation_prompt: bool = False,
    ) -> RenderedChat:
        """Ids of the chat. `content_ids[i]`, if given, is used as message i's content tokens as is."""
        given = dict(content_ids or {})
        todo = [i for i in range(len(messages)) if i not in given]
        if todo:
            flat, offs = self.tok.encode_batch([_content(messages[i]) for i in todo])
            for j, i in enumerate(todo):
                given[i] = flat[offs[j] : offs[j + 1]]
        parts: list[np.ndarray] = [np.asarray(self._bos, np.int32)]
        pos = len(self._bos)
        msg_spans = np.zeros((len(messages), 2), np.int64)
        content_spans = np.zeros((len(messages), 2), np.int64)
        roles: list[str] = []
        eom = np.array([self._eom], np.int32)
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ROLES:
                raise ValueError(f"message {i}: role must be one of {ROLES}, got {role!r}")
            roles.append(str(role))
            head = self.header_ids(str(role))
            body = np.asarray(given[i], np.int32)
            msg_spans[i, 0] = pos
            content_spans[i] = (pos + len(head), pos + len(head) + len(body))
            parts += [head, body, eom, self._after_msg]
            pos += len(head) + len(body) + 1 + len(self._after_msg)
            msg_spans[i, 1] = pos
        gen: tuple[int, int] | None = None
        if add_generation_prompt:
            head = self.header_ids("assistant")
            parts.append(head)
            gen = (pos, pos + len(head))
        return RenderedChat(
            ids=np.concatenate(parts).astype(np.int32, copy=False),
            roles=roles,
            message_spans=msg_spans,
            content_spans=content_spans,
            generation_prompt=gen,
            tok=self.tok,
        )

    def render_text(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The sample as one string with special tokens spelled out (what HF's apply_chat_template gives)."""
        s = self.spec
        out = [s.bos or ""]
        for m in messages:
            role = str(m.get("role"))
            head = s.header_start + role + (s.header_end or "") + s.after_header
            out.append(head + _content(m) + s.end_of_message + s.after_message)
        if add_generation_prompt:
            out.append(s.header_start + "assistant" + (s.header_end or "") + s.after_header)
        return "".join(out)


_TEMPLATE_CACHE: dict[tuple[str, str], ChatTemplate] = {}


def load_template(name: str, tok: Tokenizer) -> ChatTemplate:
    """The named template bound to `tok` (cached per process)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    key = (name, tok.name)
    if key not in _TEMPLATE_CACHE:
        _TEMPLATE_CACHE[key] = ChatTemplate(TEMPLATES[name], tok)
    return _TEMPLATE_CACHE[key]


# --- token <-> char positions and safe boundaries -------------------------------------------------------


def token_char_starts(tok: Tokenizer, ids: np.ndarray) -> np.ndarray:
    """int64 array of len(ids) + 1: the char offset where each token starts, then the total chars."""
    _require_byte_level(tok)
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


def _require_byte_level(tok: Tokenizer) -> None:
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
    _require_byte_level(tok)
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


# --- haystack -------------------------------------------------------------------------------------------


@dataclass
class HaystackPart:
    """A run of haystack text that came from one place (a packed row's segment, or given text)."""

    char_start: int  # in the haystack text
    char_end: int
    meta: dict[str, Any] = field(default_factory=dict)  # SEGMENT_TYPE fields, if from a packed row
    row_id: str | None = None
    lead_chars: int = 0  # chars stripped before char_start (relative to the segment's decoded text)
    lead_bytes: int = 0


class Haystack:
    """Real text tokenized once, with its safe boundaries and the lineage of each part."""

    JOIN = "\n\n"  # between documents: a blank line, never a special token

    def __init__(
        self,
        tok: Tokenizer,
        text: str,
        parts: list[HaystackPart] | None = None,
        ids: np.ndarray | None = None,
    ) -> None:
        """`ids`, if given, must be the tokenization of `text` (`from_rows` assembles it from the rows)."""
        _require_byte_level(tok)
        self.tok = tok
        self.text = text
        self.ids = tok.encode(text) if ids is None else np.asarray(ids, np.int32)
        self.reused_ids = ids is not None
        self.parts = parts if parts is not None else [HaystackPart(0, len(text))]
        self._part_starts = [p.char_start for p in self.parts]

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def char_starts(self) -> np.ndarray:
        return token_char_starts(self.tok, self.ids)

    @cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return safe_boundaries(self.tok, self.ids)

    @property
    def line_bounds(self) -> np.ndarray:
        return self._bounds[0]

    @property
    def inline_bounds(self) -> np.ndarray:
        return self._bounds[1]

    @property
    def sentence_bounds(self) -> np.ndarray:
        return self._bounds[2]

    @cached_property
    def any_bounds(self) -> np.ndarray:
        """Line and inline boundaries together, sorted."""
        mask = np.zeros(len(self.ids) + 1, bool)
        mask[self.line_bounds] = True
        mask[self.inline_bounds] = True
        return np.flatnonzero(mask)

    @classmethod
    def from_documents(cls, tok: Tokenizer, docs: Sequence[str]) -> Haystack:
        """Plain documents joined by blank lines (leading/trailing whitespace stripped)."""
        texts: list[str] = []
        parts: list[HaystackPart] = []
        pos = 0
        for d in docs:
            body = d.strip()
            if not body:
                continue
            if texts:
                pos += len(cls.JOIN)
            lead = len(d) - len(d.lstrip())
            parts.append(
                HaystackPart(pos, pos + len(body), lead_chars=lead, lead_bytes=len(d[:lead].encode()))
            )
            texts.append(body)
            pos += len(body)
        return cls(tok, cls.JOIN.join(texts), parts)

    def retokenized(self) -> Haystack:
        """The same text and parts with ids from a full tokenization (the fallback for reused ids)."""
        return Haystack(self.tok, self.text, self.parts)

    @classmethod
    def from_rows(
        cls,
        tok: Tokenizer,
        rows: Sequence[Mapping[str, Any]],
        max_tokens: int | None = None,
        reuse_ids: bool = True,
    ) -> Haystack:
        """Packed rows (`row_id`, `input_ids`, `segments`) decoded segment by segment, joined by blank lines.

        Separators and padding are not text and never enter the haystack. With `max_tokens`, only the
        first `max_tokens` row tokens of text are used (the last segment is cut short and marked split).

        With `reuse_ids`, the haystack is not tokenized again: a segment's row tokens between its first
        and last safe boundary are the tokenization of that text wherever it stands, so only the short
        head and tail of each segment (where it was cut from its document, stripped, and joined to the
        next) are re-tokenized, in one batch.
        """
        texts: list[str] = []
        parts: list[HaystackPart] = []
        plans: list[tuple[np.ndarray, np.ndarray, int] | None] = []  # per part: (seg ids, char starts, lead)
        pos = 0
        used = 0
        for row in rows:
            ids = np.asarray(row["input_ids"])
            for seg in row["segments"]:
                if max_tokens is not None and used >= max_tokens:
                    break
                a, b = int(seg["row_token_start"]), int(seg["row_token_end"])
                if max_tokens is not None and used + (b - a) > max_tokens:
                    cut = max_tokens - used
                    seg = {**seg, "row_token_end": a + cut, "is_split": True}
                    if seg.get("doc_token_start") is not None:
                        seg["doc_token_end"] = int(seg["doc_token_start"]) + cut
                    b = a + cut
                used += b - a
                raw = decode_ordinary(tok, ids[a:b])  # segments hold ordinary tokens only
                # a split segment may begin or end inside a multi-byte character: drop the partial bytes
                head_cut = 0
                while head_cut < len(raw) and head_cut < 3 and raw[head_cut] & 0xC0 == 0x80:
                    head_cut += 1
                decoded = raw[head_cut:].decode("utf-8", errors="ignore")
                body = decoded.strip()
                if not body:
                    continue
                lead = len(decoded) - len(decoded.lstrip())
                if texts:
                    pos += len(cls.JOIN)
                parts.append(
                    HaystackPart(
                        pos,
                        pos + len(body),
                        meta=dict(seg),
                        row_id=row.get("row_id"),
                        lead_chars=lead,
                        lead_bytes=head_cut + len(decoded[:lead].encode()),
                    )
                )
                texts.append(body)
                pos += len(body)
                seg_ids = ids[a:b]
                plans.append((seg_ids, token_char_starts(tok, seg_ids), lead) if head_cut == 0 else None)
        text = cls.JOIN.join(texts)
        if not reuse_ids:
            return cls(tok, text, parts)
        return cls(tok, text, parts, _reuse_row_ids(tok, texts, plans, cls.JOIN))

    def parts_in(self, char_start: int, char_end: int) -> list[tuple[HaystackPart, int, int]]:
        """The parts overlapping haystack chars [char_start, char_end), with the overlap."""
        out = []
        k = max(0, bisect.bisect_right(self._part_starts, char_start) - 1)
        while k < len(self.parts) and self.parts[k].char_start < char_end:
            p = self.parts[k]
            a, b = max(p.char_start, char_start), min(p.char_end, char_end)
            if a < b:
                out.append((p, a, b))
            k += 1
        return out


def _reuse_row_ids(
    tok: Tokenizer,
    bodies: list[str],
    plans: list[tuple[np.ndarray, np.ndarray, int] | None],
    join: str,
) -> np.ndarray:
    """Ids of `join.join(bodies)` from each body's row tokens, re-tokenizing only heads and tails."""
    t = boundary_tables(tok)
    chunks: list[str | np.ndarray] = []  # text to tokenize, or ids to keep, in order
    last = len(bodies) - 1
    for k, (body, plan) in enumerate(zip(bodies, plans, strict=True)):
        tail_join = join if k < last else ""
        if plan is None:
            chunks.append(body + tail_join)
            continue
        seg, cs, lead = plan
        seg64 = seg.astype(np.int64)
        prev, cur = seg64[:-1], seg64[1:]
        safe = (t.ends_newline[prev] & t.starts_nonspace[cur]) | (t.ends_nonspace[prev] & t.starts_space[cur])
        cand = np.flatnonzero(safe) + 1  # token index t >= 1 where a cut is safe
        end = lead + len(body)
        # the characters on both sides of a cut decide whether it is safe, so both must be in the body
        # (what was stripped around it is not in the haystack: a boundary at the body's end is unsafe)
        cand = cand[(cs[cand] >= lead) & (cs[cand] < end)]
        if len(cand) < 2:
            chunks.append(body + tail_join)
            continue
        f, last_b = int(cand[0]), int(cand[-1])
        chunks.append(body[: int(cs[f]) - lead])
        chunks.append(seg[f:last_b])
        chunks.append(body[int(cs[last_b]) - lead :] + tail_join)
    texts = [c for c in chunks if isinstance(c, str)]
    flat, offs = tok.encode_batch(texts)
    out: list[np.ndarray] = []
    j = 0
    for c in chunks:
        if isinstance(c, str):
            out.append(flat[offs[j] : offs[j + 1]])
            j += 1
        else:
            out.append(np.asarray(c, np.int32))
    return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)


# --- assembly -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Text to insert into the context at a relative depth (0 = start, 1 = end of the context)."""

    text: str
    depth: float
    label: str = "needle"
    placement: Placement = "line"

    def normalized(self) -> str:
        """Line pieces are one or more lines ending in "\\n"; inline pieces are " " + a sentence."""
        body = self.text.strip()
        if not body:
            raise ValueError(f"empty {self.label} piece")
        return body + "\n" if self.placement == "line" else " " + body


@dataclass
class PlacedPiece:
    index: int  # position in the `pieces` argument
    label: str
    placement: Placement  # as placed (an inline piece with no inline boundary nearby falls back to "line")
    char_start: int  # in the context message's content
    char_end: int
    token_start: int  # in the rendered sample
    token_end: int
    depth: float  # (token_start - context token start) / context tokens


@dataclass
class HaystackRun:
    """A stretch of haystack text as it lies in the sample, split where inserted pieces interrupt it."""

    hay_char_start: int
    hay_char_end: int
    char_start: int  # in the context message's content
    char_end: int
    token_start: int  # in the rendered sample
    token_end: int


@dataclass
class AssembledChat:
    messages: list[dict[str, str]]
    rendered: RenderedChat
    context_message: int
    context_char_span: tuple[int, int]  # in the context message's content
    context_token_span: tuple[int, int]  # in the rendered sample
    pieces: list[PlacedPiece]
    runs: list[HaystackRun]
    length: int  # under `length_counts`
    length_counts: LengthCounts
    haystack: Haystack = field(repr=False)
    _lineage: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def ids(self) -> np.ndarray:
        return self.rendered.ids

    @property
    def context_tokens(self) -> int:
        a, b = self.context_token_span
        return b - a

    def depth(self, token: int) -> float:
        a, b = self.context_token_span
        return float((token - a) / max(1, b - a))

    def locate(self, message_index: int, char_start: int, char_end: int) -> tuple[int, int]:
        """Token span in the sample of chars [char_start, char_end) of a message's content."""
        return self.rendered.locate(message_index, char_start, char_end)

    def haystack_lineage(self) -> list[dict[str, Any]]:
        """SEGMENT_TYPE records of the haystack text used, one per (segment, run) overlap.

        Source char and byte spans are exact for the text used; doc token spans are the segment's when
        the whole segment was used and null otherwise; row_token_start/end give the span in the sample;
        is_split is true when only part of the document is here.
        """
        if self._lineage is None:
            self._lineage = self._haystack_lineage()
        return [dict(r) for r in self._lineage]

    def _haystack_lineage(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        m = self.context_message
        content = self.messages[m]["content"]
        text = self.haystack.text
        for run in self.runs:
            for part, a, b in self.haystack.parts_in(run.hay_char_start, run.hay_char_end):
                rec: dict[str, Any] = {k: part.meta.get(k) for k in _SEGMENT_FIELDS}
                ctx_a = run.char_start + (a - run.hay_char_start)
                ctx_b = ctx_a + (b - a)
                assert content[ctx_a:ctx_b] == text[a:b]
                t0, t1 = self.locate(m, ctx_a, ctx_b)
                whole = a == part.char_start and b == part.char_end
                if part.meta:
                    skip = part.lead_chars + (a - part.char_start)
                    skip_bytes = part.lead_bytes + len(text[part.char_start : a].encode())
                    rec["char_start"] = int(part.meta["char_start"]) + skip
                    rec["char_end"] = rec["char_start"] + (b - a)
                    rec["byte_start"] = int(part.meta["byte_start"]) + skip_bytes
                    rec["byte_end"] = rec["byte_start"] + len(text[a:b].encode())
                    if not whole:
                        rec["doc_token_start"] = rec["doc_token_end"] = None
                    rec["is_split"] = bool(part.meta.get("is_split")) or not whole
                else:
                    rec.update(
                        char_start=a - part.char_start,
                        char_end=b - part.char_start,
                        is_split=not whole,
                    )
                rec["row_token_start"], rec["row_token_end"] = t0, t1
                rec["separator_after"] = False
                rec["row_id"] = part.row_id
                out.append(rec)
        return out

    def haystack_rows(self) -> list[str]:
        """Ids of the packed rows whose text is in the context, in order of first use."""
        seen: dict[str, None] = {}
        for r in self.haystack_lineage():
            if r.get("row_id"):
                seen.setdefault(r["row_id"])
        return list(seen)


_SEGMENT_FIELDS = (
    "source",
    "uri",
    "revision",
    "record",
    "doc_id",
    "content_hash",
    "char_start",
    "char_end",
    "byte_start",
    "byte_end",
    "doc_token_start",
    "doc_token_end",
    "doc_tokens",
    "row_token_start",
    "row_token_end",
    "separator_after",
    "is_split",
    "part",
    "placed_by",
    "neighbor_similarity",
)


def _snap(bounds: np.ndarray, x: float, lo: int, hi: int) -> int | None:
    """The boundary in [lo, hi] nearest to x, or None."""
    i0, i1 = np.searchsorted(bounds, lo, "left"), np.searchsorted(bounds, hi, "right")
    if i0 >= i1:
        return None
    cand = bounds[i0:i1]
    j = int(np.searchsorted(cand, x))
    best = [int(cand[k]) for k in (j - 1, j) if 0 <= k < len(cand)]
    return min(best, key=lambda b: (abs(b - x), b))


def assemble_chat(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, str]],
    context_message: int,
    haystack: Haystack,
    target_length: int,
    pieces: Sequence[Piece] = (),
    length_counts: LengthCounts = "full_chat",
    prefix: str = "",
    suffix: str = "",
    start_token: int = 0,
    terminator: str = "\n\n",
    inline_window: int = 2048,
    verify: bool = True,
) -> AssembledChat:
    """A chat whose length under `length_counts` is exactly `target_length`.

    Message `context_message` gets content `prefix + context + suffix`, where the context is haystack
    text from the first line boundary at or after `start_token`, with `pieces` inserted near their
    depths and `terminator` after the cut. `prefix` must be empty or end with a line break and `suffix`
    must not start with whitespace, so the three tokenize independently. Other messages are as given.
    """
    tok = template.tok
    if prefix and not prefix.endswith("\n"):
        raise ValueError(
            "prefix must be empty or end with a line break (so the context starts on a new line)"
        )
    if suffix and suffix[0].isspace():
        raise ValueError(
            "suffix must not start with whitespace (the context already ends with the terminator)"
        )
    if not terminator.endswith("\n"):
        raise ValueError("terminator must end with a line break")
    if not 0 <= context_message < len(messages):
        raise ValueError(f"context_message {context_message} out of range for {len(messages)} messages")

    texts = [p.normalized() for p in pieces]
    flat, offs = tok.encode_batch([prefix, suffix, terminator, *texts])
    seq = [flat[offs[k] : offs[k + 1]] for k in range(len(offs) - 1)]
    prefix_ids, suffix_ids, term_ids, piece_ids = seq[0], seq[1], seq[2], seq[3:]

    msgs = [dict(m) for m in messages]
    msgs[context_message]["content"] = prefix + suffix
    base = template.render(msgs, {context_message: np.concatenate([prefix_ids, suffix_ids])})
    fixed = 0 if length_counts == "context_only" else base.counted(length_counts)
    budget = target_length - fixed  # context tokens
    piece_total = sum(len(p) for p in piece_ids)
    if budget < piece_total + len(term_ids) + 1:
        raise AssemblyError(
            f"target {target_length} leaves {budget} context tokens, fewer than the {piece_total} tokens of "
            f"the pieces plus the terminator; raise the target length or insert fewer pieces"
        )

    ctx = _assemble_context(
        haystack, texts, piece_ids, pieces, term_ids, terminator, budget, start_token, inline_window
    )
    content = prefix + ctx.text + suffix
    msgs[context_message]["content"] = content
    ids = np.concatenate([prefix_ids, ctx.ids, suffix_ids]).astype(np.int32)
    rendered = template.render(msgs, {context_message: ids})
    ctx_tok0 = int(rendered.content_spans[context_message][0]) + len(prefix_ids)
    ctx_tokens = len(ctx.ids)
    length = rendered.counted(length_counts, ctx_tokens)
    if length != target_length:
        raise AssemblyError(f"sized to {length} tokens instead of {target_length}")
    if verify:
        check = template.render(msgs)
        if not np.array_equal(check.ids, rendered.ids):
            n = min(len(check.ids), len(rendered.ids))
            where = np.flatnonzero(check.ids[:n] != rendered.ids[:n])
            diff = int(where[0]) if len(where) else n
            raise AssemblyError(
                f"{tok.name}: assembled ids differ from a full tokenization of the sample (first difference at "
                f"token {diff}; {len(check.ids)} vs {len(rendered.ids)} tokens). This tokenizer does not split "
                f"at the assumed boundaries."
            )
    p0 = len(prefix)
    placed = [
        PlacedPiece(
            index=pp.index,
            label=pp.label,
            placement=pp.placement,
            char_start=p0 + pp.char_start,
            char_end=p0 + pp.char_end,
            token_start=ctx_tok0 + pp.token_start,
            token_end=ctx_tok0 + pp.token_end,
            depth=pp.token_start / max(1, ctx_tokens),
        )
        for pp in ctx.placed
    ]
    placed.sort(key=lambda p: p.index)
    runs = [
        HaystackRun(
            r.hay_char_start,
            r.hay_char_end,
            p0 + r.char_start,
            p0 + r.char_end,
            ctx_tok0 + r.token_start,
            ctx_tok0 + r.token_end,
        )
        for r in ctx.runs
    ]
    return AssembledChat(
        messages=msgs,
        rendered=rendered,
        context_message=context_message,
        context_char_span=(p0, p0 + len(ctx.text)),
        context_token_span=(ctx_tok0, ctx_tok0 + ctx_tokens),
        pieces=placed,
        runs=runs,
        length=length,
        length_counts=length_counts,
        haystack=haystack,
    )


@dataclass
class _Context:
    text: str
    ids: np.ndarray
    placed: list[PlacedPiece]  # positions relative to the context
    runs: list[HaystackRun]


def _assemble_context(
    hay: Haystack,
    texts: list[str],
    piece_ids: list[np.ndarray],
    pieces: Sequence[Piece],
    term_ids: np.ndarray,
    terminator: str,
    budget: int,
    start_token: int,
    inline_window: int,
) -> _Context:
    """Haystack tokens + pieces at safe boundaries + an exactly sized tail: `budget` tokens in all.

    Some totals cannot be hit at a given cut (adding one character can add two tokens, e.g. " 2" in
    "of 24"); then the context starts one line later, which moves the cut elsewhere.
    """
    line_b = hay.line_bounds
    i = int(np.searchsorted(line_b, start_token))
    if i >= len(line_b):
        raise HaystackTooShort(budget, 0)
    for attempt in range(8):
        if i + attempt >= len(line_b):
            break
        ctx = _try_context(
            hay,
            list(texts),
            list(piece_ids),
            pieces,
            term_ids,
            terminator,
            budget,
            int(line_b[i + attempt]),
            inline_window,
        )
        if ctx is not None:
            return ctx
    raise AssemblyError(f"could not size the context to {budget} tokens from haystack token {start_token}")


def _try_context(
    hay: Haystack,
    texts: list[str],
    piece_ids: list[np.ndarray],
    pieces: Sequence[Piece],
    term_ids: np.ndarray,
    terminator: str,
    budget: int,
    h0: int,
    inline_window: int,
) -> _Context | None:
    """One assembly from haystack token h0, or None when the tail cannot be sized exactly there."""
    tok = hay.tok
    line_b, inline_b, sent_b = hay.line_bounds, hay.inline_bounds, hay.sentence_bounds
    piece_total = sum(len(p) for p in piece_ids)
    hay_needed = budget - piece_total - len(term_ids)
    available = len(hay) - h0
    if hay_needed + 16 > available:
        raise HaystackTooShort(hay_needed + 16, available)

    # where the exactly-sized tail window starts: a safe boundary a little short of the budget
    margin = 8
    any_b = hay.any_bounds
    s = _snap(any_b, h0 + hay_needed - margin, h0, h0 + hay_needed - margin)
    if s is None:
        s = h0

    # pieces in depth order; desired haystack offset discounts the pieces before them
    order = sorted(range(len(pieces)), key=lambda k: (pieces[k].depth, k))
    inserts: list[tuple[int, int, Placement]] = []  # (haystack token, piece index, placement)
    before = 0
    for k in order:
        p = pieces[k]
        if not 0.0 <= p.depth <= 1.0:
            raise ValueError(f"piece {k} ({p.label}): depth {p.depth} outside [0, 1]")
        x = h0 + p.depth * budget - before
        x = min(max(x, h0), s)
        placement: Placement = p.placement
        b: int | None = None
        if placement == "inline":
            lo, hi = max(h0, int(x) - inline_window), min(s, int(x) + inline_window)
            b = _snap(sent_b, x, lo, hi)
            # no sentence end nearby (verse, code, lists): a line of its own reads better than a
            # sentence dropped mid-sentence; mid-sentence only where there are no lines either
            if b is None and _snap(line_b, x, lo, hi) is None:
                b = _snap(inline_b, x, lo, hi)
            if b is None:
                placement = "line"
                texts[k] = texts[k].strip() + "\n"
                piece_ids[k] = tok.encode(texts[k])
        if b is None:
            b = _snap(line_b, x, h0, s)
        if b is None:
            b = h0
        inserts.append((b, k, placement))
        before += len(piece_ids[k])
    inserts.sort(key=lambda t: (t[0], t[1]))
    # fallbacks may have changed piece sizes: place the tail window again, after every insertion point
    piece_total = sum(len(p) for p in piece_ids)
    last_insert = max((b for b, _, _ in inserts), default=h0)
    goal = h0 + budget - piece_total - len(term_ids) - margin
    s = _snap(any_b, goal, last_insert, max(goal, last_insert)) or last_insert

    cs = hay.char_starts
    id_parts: list[np.ndarray] = []
    text_parts: list[str] = []
    placed: list[PlacedPiece] = []
    runs: list[HaystackRun] = []
    tpos = cpos = 0
    cur = h0

    def add_run(a: int, b: int) -> None:
        nonlocal tpos, cpos
        if b <= a:
            return
        ca, cb = int(cs[a]), int(cs[b])
        id_parts.append(hay.ids[a:b])
        text_parts.append(hay.text[ca:cb])
        runs.append(HaystackRun(ca, cb, cpos, cpos + (cb - ca), tpos, tpos + (b - a)))
        tpos += b - a
        cpos += cb - ca

    for b, k, placement in inserts:
        add_run(cur, b)
        cur = b
        ids_k = piece_ids[k]
        placed.append(
            PlacedPiece(
                k, pieces[k].label, placement, cpos, cpos + len(texts[k]), tpos, tpos + len(ids_k), 0.0
            )
        )
        id_parts.append(ids_k)
        text_parts.append(texts[k])
        tpos += len(ids_k)
        cpos += len(texts[k])
    add_run(cur, s)

    remaining = budget - tpos
    tail = _fit_tail(hay, s, remaining, terminator)
    if tail is None:
        return None
    e_char, filler, tail_ids = tail
    c_s = int(cs[s])
    tail_text = hay.text[c_s:e_char] + filler + terminator
    if e_char > c_s:
        n_hay = len(hay.text[c_s:e_char])
        # token span of the haystack chars inside the window (the terminator may share the last token)
        w_starts = token_char_starts(tok, tail_ids)
        t_end = int(np.searchsorted(w_starts[:-1], n_hay, side="left"))
        runs.append(HaystackRun(c_s, e_char, cpos, cpos + n_hay, tpos, tpos + t_end))
    id_parts.append(tail_ids)
    text_parts.append(tail_text)
    ids = np.concatenate(id_parts).astype(np.int32) if id_parts else np.zeros(0, np.int32)
    assert len(ids) == budget, (len(ids), budget)
    return _Context("".join(text_parts), ids, placed, runs)


# Whitespace-only fillers put between a haystack cut at a word end and the terminator, to make up
# the one to three tokens by which the nearest word ends miss the exact size (no visible text added).
_TAIL_FILLERS = ("", "\n ", " \n ", "\n \n ", " \n \n ", "\n \n \n ")


def _fit_tail(hay: Haystack, s: int, want: int, terminator: str) -> tuple[int, str, np.ndarray] | None:
    """A char end e and a whitespace filler f such that tok(hay.text[cs[s]:e] + f + terminator) has
    exactly `want` tokens, with e at a word end (a sentence end where one fits): the context never
    stops mid-word. None when no such end is near; the caller then starts the context a line later.

    Candidates are tried near the haystack's own token boundaries first (cheap: each try tokenizes
    only the short window), then at word ends near the estimate, with fillers of whitespace.
    """
    tok, text, cs = hay.tok, hay.text, hay.char_starts
    c_s = int(cs[s])
    n_term = len(tok.encode(terminator))
    k0 = s + want - n_term
    if k0 < s:
        return None
    cache: dict[tuple[int, str], np.ndarray] = {}

    def count(e: int, f: str = "") -> np.ndarray:
        if (e, f) not in cache:
            cache[(e, f)] = tok.encode(text[c_s:e] + f + terminator)
        return cache[(e, f)]

    def word_end(e: int) -> bool:
        return e >= len(text) or text[e].isspace() or (e > 0 and text[e - 1] in ".,;:!?)]}\"'")

    def sentence_end(e: int) -> bool:
        return e > 0 and text[e - 1] in ".!?" and (e >= len(text) or text[e].isspace())

    for radius in (4, 16, 64):
        lo, hi = max(s, k0 - radius), min(len(hay), k0 + radius)
        ends = [int(cs[k]) for k in range(lo, hi + 1) if word_end(int(cs[k]))]
        good = [e for e in ends if len(count(e)) == want]
        if good:
            centre = int(cs[min(k0, len(hay))])
            e = min(good, key=lambda x: (not sentence_end(x), abs(x - centre), x))
            return e, "", count(e)
    # word ends near the estimate, sentence ends first, each with the fillers in turn
    centre = int(cs[min(max(k0, s), len(hay))])
    near = [e for d in range(400) for e in (centre + d, centre - d) if c_s <= e <= len(text) and word_end(e)]
    near.sort(key=lambda e: (not sentence_end(e), abs(e - centre)))
    for f in _TAIL_FILLERS:
        for e in near:
            if len(count(e)) <= want and len(count(e, f)) == want:
                return e, f, count(e, f)
    return None


# --- output tables --------------------------------------------------------------------------------------


def chat_table(records: Sequence[Mapping[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """A CHAT_SCHEMA table from dict records; nullable columns a record leaves out become null."""
    from schemas.records import CHAT_SCHEMA

    schema = schema or CHAT_SCHEMA
    cols: dict[str, list[Any]] = {f.name: [] for f in schema}
    for r in records:
        for f in schema:
            if f.name not in r and not f.nullable:
                raise ValueError(f"chat record {r.get('sample_id')!r} lacks required field {f.name!r}")
            cols[f.name].append(r.get(f.name))
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)
