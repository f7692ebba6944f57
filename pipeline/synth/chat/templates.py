"""Chat templates rendered straight to token ids (structure tokens as special ids, text as text)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.core.tokenizer import Tokenizer, TokenizerError
from pipeline.synth.chat.base import LengthCounts
from pipeline.synth.chat.boundaries import chars_to_tokens, token_char_starts

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
    # per message: the token index just after its end-of-turn special token (what an assistant-token
    # loss mask covers after the content); None: right after the content's end-of-message token
    turn_ends: np.ndarray | None = field(default=None, repr=False)
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

    def loss_mask(self, turns: str = "all_assistant_turns") -> np.ndarray:
        """int8 per token: 1 on what a trainer learns, an assistant turn's content and its end-of-turn
        token (`turn_ends`), for every assistant turn or (`final_answer`) the last one only."""
        mask = np.zeros(len(self.ids), np.int8)
        ends = self.turn_ends if self.turn_ends is not None else self.content_spans[:, 1] + 1
        assistant = [i for i, r in enumerate(self.roles) if r == "assistant"]
        if turns == "final_answer":
            assistant = assistant[-1:]
        elif turns != "all_assistant_turns":
            raise ValueError(f"loss mask turns must be all_assistant_turns or final_answer, got {turns!r}")
        for i in assistant:
            mask[int(self.content_spans[i][0]) : int(ends[i])] = 1
        return mask

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
            turn_ends=content_spans[:, 1] + 1,
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
