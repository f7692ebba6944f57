"""The endpoint's API key: where it comes from, and how it is kept out of everything written."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from schemas.redact import redact_url as redact_url
from schemas.redact import url_secrets as url_secrets
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


def all_secrets(cfg: RewriterConfig, api_key: str) -> list[str]:
    """Every secret a run of this config knows: the key it sends, the key written in the config, and
    the credential values in the base URL (config validation refuses userinfo; query keys remain)."""
    configured = cfg.api_key.get_secret_value() if cfg.api_key is not None else ""
    return [api_key, configured, *url_secrets(cfg.base_url)]


class Redactor:
    """Replaces every secret in a text with '***' (errors and raw responses pass through it)."""

    def __init__(self, secrets: list[str]) -> None:
        # A placeholder or a very short string is not a secret worth masking (it would mangle text).
        self._secrets = sorted(
            {s for s in secrets if s and s != NO_KEY and len(s) >= 4}, key=len, reverse=True
        )

    @property
    def secrets(self) -> list[str]:
        return list(self._secrets)

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, "***")
        return text


class _SecretMasker:
    """A log record factory that masks the run's secrets in every record this process creates.

    httpx logs every request URL at INFO (query string included), the openai SDK logs requests at
    DEBUG, and which loggers those are depends on versions (this environment's openai uses `httpx2`).
    Masking at record creation covers them all, and every handler (console, Prefect's API, files),
    whatever the logger. Records without a secret are passed on untouched.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._redactor = Redactor([])
        self._secrets: set[str] = set()
        self._factory: Callable[..., logging.LogRecord] | None = None

    def add(self, secrets: list[str]) -> None:
        with self._lock:
            self._secrets.update(secrets)
            self._redactor = Redactor(sorted(self._secrets))
            if self._factory is None:
                self._factory = logging.getLogRecordFactory()
                logging.setLogRecordFactory(self._make)

    def _make(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        assert self._factory is not None
        record = self._factory(*args, **kwargs)
        redact = self._redactor
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to fix; logging reports it as usual
            return record
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            # the traceback text is cached on the record, so handlers print the masked one
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record


_MASKER = _SecretMasker()


def redact_http_logs(secrets: list[str]) -> None:
    """Mask these secrets, from now on, in every log record of this process (see `_SecretMasker`)."""
    _MASKER.add(secrets)
