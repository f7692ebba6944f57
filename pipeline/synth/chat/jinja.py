"""A model's own Jinja chat template, rendered to token ids with the same structure as the built-ins.

`chat_template: hf:<tokenizer folder or hub id>` takes the `chat_template` a model ships in its
`tokenizer_config.json` (or `chat_template.jinja`); `chat_template: "jinja:<template>"` takes the template
itself. Either is rendered by transformers' own Jinja renderer (the one `apply_chat_template` uses).

Token-exact assembly needs more than the text: message contents go in as given token ids (a 32K
haystack is never re-tokenized) and evidence spans are located in token space. So a template is
rendered once per role sequence with *sentinel* contents (private-use characters no document holds);
the text between sentinels is the template's fixed text (headers, end tokens, a default system prompt,
a date line, ...). A sample's ids are then: fixed text tokenized with special tokens recognised, and
every content's ids verbatim in between. Two checks keep this honest:

- per sample, the template is rendered once more with the real contents and the text must equal the
  fixed parts joined with the contents (a template that edits content, e.g. trims it, is refused with
  the message it changed);
- per template, probe conversations are tokenized both ways (assembled, and the whole rendered text in
  one go) and must give the same ids; otherwise the template is refused with the first differing token
  (a fixed part that merges with the content next to it under this tokenizer).

Message spans: a message starts where the previous one ended and ends after its end-of-turn special
token (the first special token after its content) and the ordinary text up to the next special token;
`turn_ends` marks the end-of-turn token itself, what a loss mask trains on after an assistant turn.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.tokenizer import Tokenizer, TokenizerError
from pipeline.synth.chat.boundaries import chars_to_tokens, token_char_starts
from pipeline.synth.chat.templates import ROLES, ChatTemplate, RenderedChat, _content

# Private-use code points: no real document or template spells them, and no template trims them.
_SENT_OPEN, _SENT_CLOSE = "\ue000", "\ue001"
_SENT_RE = re.compile(_SENT_OPEN + r"(\d+)" + _SENT_CLOSE)

# Probe conversations for the boundary check: contents that start and end with letters, digits,
# punctuation, spaces and line breaks, in the role orders samples use.
_PROBES: tuple[tuple[tuple[str, str], ...], ...] = (
    (
        ("system", "You answer briefly."),
        ("user", "Context:\nThe key is 42.\n\nWhat is the key?"),
        ("assistant", "42"),
    ),
    (("user", " leading space and trailing line\n"), ("assistant", "It ends with a period.")),
    (
        ("user", "Read this.\n\n"),
        ("assistant", "Done!"),
        ("user", "Q2: and now?"),
        ("assistant", "7, 8 and 9"),
    ),
)


class TemplateError(ValueError):
    """A Jinja chat template that cannot be rendered token-exactly."""


def _token_text(tok: Any) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, str):
        return tok
    if isinstance(tok, Mapping):
        return str(tok.get("content"))
    return str(getattr(tok, "content", tok))


class JinjaChatTemplate(ChatTemplate):
    """A Jinja chat template bound to a tokenizer; `render` returns the same `RenderedChat` as the
    built-in templates (ids, content spans, message spans)."""

    def __init__(  # no super().__init__(): there is no TemplateSpec behind a Jinja template
        self,
        name: str,
        source: str,
        tok: Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        check: bool = True,
    ) -> None:
        self._name = name
        self.source = source
        self.tok = tok
        try:
            self._specials = tok.special_tokens()
        except TokenizerError as err:
            raise TemplateError(f"chat template {name}: {err}") from None
        self.bos_token = (
            bos_token if bos_token is not None else self._guess(("<|begin_of_text|>", "<s>", "<bos>"))
        )
        self.eos_token = eos_token if eos_token is not None else self._guess((tok.end_of_text,))
        # longest first, so a special token that contains another is matched whole
        alts = sorted(self._specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alts))) if alts else None
        self._skeletons: dict[tuple[tuple[str, ...], bool], tuple[list[str], list[int]]] = {}
        if check:
            self.check()

    def _guess(self, candidates: Sequence[str]) -> str | None:
        return next((c for c in candidates if c in self._specials), None)

    @property
    def name(self) -> str:
        return self._name

    # --- text rendering -------------------------------------------------------------------------------
    def render_text(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The sample as one string, as `apply_chat_template(..., tokenize=False)` renders it."""
        from transformers.utils.chat_template_utils import render_jinja_template

        msgs = [{"role": str(m.get("role")), "content": _content(m)} for m in messages]
        try:
            rendered, _ = render_jinja_template(  # type: ignore[str-unpack]  # returns (texts, indices)
                conversations=[msgs],
                chat_template=self.source,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except Exception as err:  # the template's own raise_exception, or a Jinja error
            raise TemplateError(f"chat template {self.name} failed to render: {err}") from None
        return str(rendered[0])

    def _skeleton(self, roles: tuple[str, ...], add_generation_prompt: bool) -> tuple[list[str], list[int]]:
        """The fixed text around the contents (len(roles) + 1 parts) and the message whose content comes
        at each place (a template may move a system prompt into a later turn, as Mistral's do)."""
        key = (roles, add_generation_prompt)
        if key not in self._skeletons:
            probe = [{"role": r, "content": f"{_SENT_OPEN}{i}{_SENT_CLOSE}"} for i, r in enumerate(roles)]
            text = self.render_text(probe, add_generation_prompt)
            found = [int(m.group(1)) for m in _SENT_RE.finditer(text)]
            if sorted(found) != list(range(len(roles))):
                raise TemplateError(
                    f"chat template {self.name} does not place each message's content exactly once "
                    f"for roles {list(roles)} (found messages {found}); it cannot be rendered token-exactly"
                )
            self._skeletons[key] = (_SENT_RE.split(text)[::2], found)
        return self._skeletons[key]

    # --- ids ------------------------------------------------------------------------------------------
    def encode_with_specials(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Ids of a text whose special-token spellings are special tokens, and a flag per id."""
        pieces: list[tuple[str, bool]] = []
        pos = 0
        if self._special_re is not None:
            for m in self._special_re.finditer(text):
                if m.start() > pos:
                    pieces.append((text[pos : m.start()], False))
                pieces.append((m.group(0), True))
                pos = m.end()
        if pos < len(text):
            pieces.append((text[pos:], False))
        ordinary = [p for p, special in pieces if not special]
        flat, offs = (
            self.tok.encode_batch(ordinary) if ordinary else (np.zeros(0, np.int32), np.zeros(1, np.int64))
        )
        ids: list[np.ndarray] = []
        flags: list[np.ndarray] = []
        j = 0
        for p, special in pieces:
            if special:
                ids.append(np.array([self._specials[p]], np.int32))
                flags.append(np.ones(1, bool))
            else:
                part = flat[offs[j] : offs[j + 1]]
                j += 1
                ids.append(part.astype(np.int32))
                flags.append(np.zeros(len(part), bool))
        if not ids:
            return np.zeros(0, np.int32), np.zeros(0, bool)
        return np.concatenate(ids), np.concatenate(flags)

    def header_ids(self, role: str) -> np.ndarray:
        """For "assistant": the generation prompt's ids after a user turn (what a prompt ends with)."""
        if role != "assistant":
            raise ValueError("a Jinja template only has a generation prompt (role 'assistant')")
        return self._generation_prompt_ids

    @cached_property
    def _generation_prompt_ids(self) -> np.ndarray:
        r = self.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        assert r.generation_prompt is not None
        a, b = r.generation_prompt
        return r.ids[a:b]

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        content_ids: Mapping[int, np.ndarray] | None = None,
        add_generation_prompt: bool = False,
    ) -> RenderedChat:
        """Ids of the chat. `content_ids[i]`, if given, is used as message i's content tokens as is.

        Ordinary text between two special tokens is tokenized in one go (a system prompt that a
        template joins to the user's text with a blank line may share a token with it), except that a
        content given as ids is kept as is and the text on either side of it is tokenized on its own.
        A content span is then the tokens covering the content's characters.
        """
        roles: list[str] = []
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ROLES:
                raise ValueError(f"message {i}: role must be one of {ROLES}, got {role!r}")
            roles.append(str(role))
        fixed, order = self._skeleton(tuple(roles), False)
        contents = [_content(m) for m in messages]
        self._check_text(messages, fixed, [contents[i] for i in order], order)
        given = {int(k): np.asarray(v, np.int32) for k, v in (content_ids or {}).items()}
        n = len(messages)
        tail = ""
        if add_generation_prompt:
            with_gen = self._skeleton(tuple(roles), True)[0][-1]
            if not with_gen.startswith(fixed[-1]):
                raise TemplateError(
                    f"chat template {self.name}: the generation prompt changes the text before it; "
                    f"it cannot be appended token-exactly"
                )
            tail = with_gen[len(fixed[-1]) :]
        # the sample as items: ("s", special text, -1) | ("t", text, message index or -1 for fixed text)
        items: list[tuple[str, str, int]] = []
        for k, part in enumerate(fixed):
            items += self._split_specials(part)
            if k < n:
                items.append(("t", contents[order[k]], order[k]))
        n_main = len(items)
        items += self._split_specials(tail)
        ids_parts: list[np.ndarray] = []
        special_pos: list[int] = []
        content_spans = np.zeros((n, 2), np.int64)
        gen_start = 0
        pos = 0
        run: list[tuple[str, int]] = []

        def flush() -> None:
            nonlocal pos
            if not run:
                return
            if not self.tok.byte_level:  # no char positions of tokens: each piece on its own
                flat, offs = self.tok.encode_batch([t for t, _ in run])
                for q, (_, m) in enumerate(run):
                    a, b = int(offs[q]), int(offs[q + 1])
                    if m >= 0:
                        content_spans[m] = (pos + a, pos + b)
                ids_parts.append(flat)
                pos += len(flat)
                run.clear()
                return
            text = "".join(t for t, _ in run)
            ids = self.tok.encode(text) if text else np.zeros(0, np.int32)
            if any(m >= 0 for _, m in run):
                starts = token_char_starts(self.tok, ids)
                c = 0
                for t, m in run:
                    if m >= 0:
                        t0, t1 = chars_to_tokens(starts, c, c + len(t))
                        content_spans[m] = (pos + t0, pos + t1)
                    c += len(t)
            ids_parts.append(ids)
            pos += len(ids)
            run.clear()

        for j, (kind, text, mi) in enumerate(items):
            if j == n_main:
                flush()
                gen_start = pos
            if kind == "s":
                flush()
                ids_parts.append(np.array([self._specials[text]], np.int32))
                special_pos.append(pos)
                pos += 1
            elif mi >= 0 and mi in given:
                flush()
                content_spans[mi] = (pos, pos + len(given[mi]))
                ids_parts.append(given[mi])
                pos += len(given[mi])
            else:
                run.append((text, mi))
        flush()
        if n_main == len(items):
            gen_start = pos
        ids_all = (
            np.concatenate(ids_parts).astype(np.int32, copy=False) if ids_parts else np.zeros(0, np.int32)
        )
        sp = np.asarray(special_pos, np.int64)
        turn_ends = np.zeros(n, np.int64)
        msg_spans = np.zeros((n, 2), np.int64)
        bos = self._specials.get(self.bos_token) if self.bos_token else None
        start = 1 if (len(ids_all) and bos is not None and int(ids_all[0]) == bos) else 0
        for j, k in enumerate(order):  # in the order the contents stand in the text
            end = int(content_spans[k, 1])
            limit = int(content_spans[order[j + 1], 0]) if j + 1 < n else gen_start
            after = sp[(sp >= end) & (sp < limit)]
            turn_ends[k] = int(after[0]) + 1 if len(after) else end
            if j + 1 == n:
                msg_spans[k] = (start, gen_start)
            else:
                msg_spans[k] = (start, int(after[1]) if len(after) > 1 else int(turn_ends[k]))
            start = int(msg_spans[k, 1])
        gen = (gen_start, len(ids_all)) if add_generation_prompt else None
        return RenderedChat(
            ids=ids_all,
            roles=roles,
            message_spans=msg_spans,
            content_spans=content_spans,
            generation_prompt=gen,
            tok=self.tok,
            turn_ends=turn_ends,
        )

    def _split_specials(self, text: str) -> list[tuple[str, str, int]]:
        out: list[tuple[str, str, int]] = []
        pos = 0
        if self._special_re is not None:
            for m in self._special_re.finditer(text):
                if m.start() > pos:
                    out.append(("t", text[pos : m.start()], -1))
                out.append(("s", m.group(0), -1))
                pos = m.end()
        if pos < len(text):
            out.append(("t", text[pos:], -1))
        return out

    def _check_text(
        self, messages: Sequence[Mapping[str, Any]], fixed: list[str], contents: list[str], order: list[int]
    ) -> None:
        text = self.render_text(messages)
        pos = 0
        for k, part in enumerate(fixed):
            if not text.startswith(part, pos):
                raise TemplateError(
                    f"chat template {self.name} renders the text around message {order[max(k - 1, 0)]}'s content "
                    f"when the content is real text (its fixed text depends on the content, or it edits the content, "
                    f"e.g. trims whitespace); strip the content first or use a template that inserts content as is"
                )
            pos += len(part)
            if k < len(contents):
                if not text.startswith(contents[k], pos):
                    raise TemplateError(
                        f"chat template {self.name} changes message {order[k]}'s content when rendering it (e.g. trims "
                        f"whitespace or rewrites it); strip the content first or use a template that inserts "
                        f"content as is"
                    )
                pos += len(contents[k])
        if pos != len(text):
            raise TemplateError(f"chat template {self.name} renders text after the last fixed part")

    def check(self) -> None:
        """Refuse the template if assembling ids differs from tokenizing the whole rendered text."""
        for probe in _PROBES:
            msgs = [{"role": r, "content": c} for r, c in probe]
            for gen, given in [(False, None), (True, None)] + [
                (False, i) for i, m in enumerate(msgs) if m["role"] == "user"
            ]:  # contexts given as ids are user turns (assembly verifies other cases itself)
                ids = None if given is None else {given: self.tok.encode(msgs[given]["content"])}
                got = self.render(msgs, ids, add_generation_prompt=gen).ids
                want, _ = self.encode_with_specials(self.render_text(msgs, gen))
                if not np.array_equal(got, want):
                    n = min(len(got), len(want))
                    diff = np.flatnonzero(got[:n] != want[:n])
                    i = int(diff[0]) if len(diff) else n
                    show = self.tok.decode(want[i : i + 1]) if i < len(want) else "<end>"
                    raise TemplateError(
                        f"chat template {self.name} with tokenizer {self.tok.name}: the whole rendered text "
                        f"tokenizes differently from its parts (first difference at token {i}, expected "
                        f"{show!r}); its fixed text merges with message contents"
                    )


# --- loading ----------------------------------------------------------------------------------------------


def _hf_template(spec: str, base_dir: str | Path | None) -> tuple[str, str | None, str | None]:
    """(chat_template, bos_token, eos_token) of a tokenizer folder or hub id, via transformers."""
    from transformers import AutoTokenizer

    path = Path(spec)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    where = str(path) if path.exists() else spec
    try:
        hf = AutoTokenizer.from_pretrained(where)
    except Exception as err:
        raise TemplateError(
            f"chat template hf:{spec}: could not load the tokenizer ({err}); give a folder holding "
            f"tokenizer_config.json (relative to the config's folder) or a reachable hub id"
        ) from None
    source = hf.chat_template
    if isinstance(source, dict):
        source = source.get("default")
    if not source:
        raise TemplateError(
            f"chat template hf:{spec}: the tokenizer has no chat_template; give one as 'jinja:<template>'"
        )
    return str(source), _token_text(hf.bos_token), _token_text(hf.eos_token)


_CACHE: dict[tuple[str, str, str], JinjaChatTemplate] = {}


def load_jinja_template(name: str, tok: Tokenizer, base_dir: str | Path | None = None) -> JinjaChatTemplate:
    """`hf:<folder or hub id>` or `jinja:<template>` bound to `tok` (cached per process)."""
    key = (name, tok.name, str(base_dir))
    if key in _CACHE:
        return _CACHE[key]
    kind, _, spec = name.partition(":")
    if kind == "hf":
        source, bos, eos = _hf_template(spec, base_dir)
        label = name
    elif kind == "jinja":
        source, bos, eos = spec, None, None
        label = "jinja:" + hashlib.sha256(spec.encode()).hexdigest()[:12]
    else:
        raise ValueError(f"unknown chat template kind {kind!r}")
    if not source.strip():
        raise TemplateError(f"chat template {label}: the template is empty")
    _CACHE[key] = JinjaChatTemplate(label, source, tok, bos, eos)
    return _CACHE[key]
