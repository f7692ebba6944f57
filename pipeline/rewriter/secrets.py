"""The endpoint's API key: where it comes from, and how it is kept out of everything written."""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

from schemas.synthesis import RewriterConfig

log = logging.getLogger("longloom.rewriter")

# Sent when no key is configured: local OpenAI-compatible servers accept any bearer token.
NO_KEY = "no-key"


def resolve_api_key(cfg: RewriterConfig) -> str:
    """The key from the environment variable the config names, else from the config, else a placeholder."""
    if cfg.api_key_env and os.environ.get(cfg.api_key_env):
        return os.environ[cfg.api_key_env]
    if cfg.api_key is not None and cfg.api_key.get_secret_value():
        return cfg.api_key.get_secret_value()
    if cfg.api_key_env:
        log.warning("rewriter: environment variable %s is not set; sending no API key", cfg.api_key_env)
    return NO_KEY


def endpoint_host(base_url: str) -> str:
    """host[:port] of the endpoint: no scheme, credentials, path or query string."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host


def url_secrets(base_url: str) -> list[str]:
    """Credentials embedded in a base URL (user:password@host), which must be redacted too."""
    parts = urlsplit(base_url)
    return [s for s in (parts.password, parts.username) if s]


class Redactor:
    """Replaces every secret in a text with '***' (errors and raw responses pass through it)."""

    def __init__(self, secrets: list[str]) -> None:
        # A placeholder or a very short string is not a secret worth masking (it would mangle text).
        self._secrets = sorted(
            {s for s in secrets if s and s != NO_KEY and len(s) >= 4}, key=len, reverse=True
        )

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, "***")
        return text
