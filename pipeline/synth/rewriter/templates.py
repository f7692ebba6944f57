"""Prompt templates: versioned files under `templates/`, rendered with Jinja2.

A template file is YAML front matter (name, version, the kind of strategy it serves, and the JSON
schema its answer must follow) and two sections, `=== system ===` and `=== user ===`. The version is
part of every sample's lineage and of the response-cache key; bump it whenever the wording changes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import yaml

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
_SECTION = re.compile(r"^=== (system|user) ===[ \t]*$", re.MULTILINE)
_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False, trim_blocks=True
)


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: str
    kind: str
    path: str
    sha256: str
    response_schema: dict[str, Any] | None
    system: jinja2.Template = field(repr=False, compare=False)
    user: jinja2.Template = field(repr=False, compare=False)

    def render(self, **values: Any) -> list[dict[str, str]]:
        """The chat messages of one request."""
        out = []
        system = self.system.render(**values).strip()
        if system:
            out.append({"role": "system", "content": system})
        out.append({"role": "user", "content": self.user.render(**values).strip()})
        return out

    def response_format(self, mode: str, array_items: dict[str, int] | None = None) -> dict[str, Any] | None:
        """The `response_format` request field for a json_mode setting; `array_items` pins the length of
        top-level array properties (an endpoint that enforces the schema then cannot add or drop turns)."""
        if mode == "off":
            return None
        if mode == "json_schema" and self.response_schema:
            schema = copy.deepcopy(self.response_schema)
            for prop, n in (array_items or {}).items():
                if prop in schema.get("properties", {}):
                    schema["properties"][prop].update(minItems=n, maxItems=n)
            return {
                "type": "json_schema",
                "json_schema": {"name": self.name, "schema": schema, "strict": False},
            }
        return {"type": "json_object"}


def parse_template(text: str, path: str) -> PromptTemplate:
    """A template from the text of its file; errors name the file and what is missing."""
    if not text.startswith("---\n"):
        raise TemplateError(f"{path}: must start with YAML front matter between '---' lines")
    head, sep, body = text[4:].partition("\n---\n")
    if not sep:
        raise TemplateError(f"{path}: front matter is not closed by a '---' line")
    meta = yaml.safe_load(head) or {}
    for key in ("name", "version", "kind"):
        if key not in meta:
            raise TemplateError(f"{path}: front matter needs `{key}`")
    parts = _SECTION.split(body)
    sections = dict(zip(parts[1::2], parts[2::2], strict=True))
    if "user" not in sections:
        raise TemplateError(f"{path}: needs a '=== user ===' section")
    schema = meta.get("response_schema")
    if isinstance(schema, str):
        schema = json.loads(schema)
    try:
        system = _ENV.from_string(sections.get("system", "").strip())
        user = _ENV.from_string(sections["user"].strip())
    except jinja2.TemplateSyntaxError as err:
        raise TemplateError(f"{path}: line {err.lineno}: {err.message}") from None
    return PromptTemplate(
        name=str(meta["name"]),
        version=str(meta["version"]),
        kind=str(meta["kind"]),
        path=path,
        sha256=hashlib.sha256(text.encode()).hexdigest()[:16],
        response_schema=schema,
        system=system,
        user=user,
    )


@lru_cache(maxsize=64)
def load_template(name: str, directory: str | None = None) -> PromptTemplate:
    """Template `<name>.txt` from the bundled folder (or another one)."""
    root = Path(directory) if directory else TEMPLATE_DIR
    path = root / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in root.glob("*.txt"))
        raise TemplateError(f"no prompt template {name!r} in {root}; known: {', '.join(known)}")
    return parse_template(path.read_text(encoding="utf-8"), str(path.name))


def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt"))
