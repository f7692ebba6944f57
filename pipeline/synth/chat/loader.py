"""Which template a config names: a built-in one (`templates`), or a model's own through Jinja (`jinja`).

The one place that knows every kind, so the built-in templates and the Jinja renderer (which builds on
them) never import each other.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.tokenizer import Tokenizer
from pipeline.synth.chat.jinja import load_jinja_template
from pipeline.synth.chat.templates import TEMPLATES, ChatTemplate

_TEMPLATE_CACHE: dict[tuple[str, str], ChatTemplate] = {}


def load_template(name: str, tok: Tokenizer, base_dir: str | Path | None = None) -> ChatTemplate:
    """The named template bound to `tok` (cached per process).

    A built-in name, `hf:<tokenizer folder or hub id>` (the model's own chat_template; a relative folder
    starts at `base_dir`, the config's folder) or `jinja:<template>` (see `pipeline.synth.chat.jinja`).
    """
    if name.startswith(("hf:", "jinja:")):
        return load_jinja_template(name, tok, base_dir)
    if name not in TEMPLATES:
        raise ValueError(
            f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}, hf:<tokenizer folder or hub id>, "
            f"jinja:<template>"
        )
    key = (name, tok.name)
    if key not in _TEMPLATE_CACHE:
        _TEMPLATE_CACHE[key] = ChatTemplate(TEMPLATES[name], tok)
    return _TEMPLATE_CACHE[key]
