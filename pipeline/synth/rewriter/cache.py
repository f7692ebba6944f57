"""On-disk response cache: one small JSON file per request key, written atomically.

A rerun, or the rerun after a crash, finds every response it already paid for and makes no call for
it. Keys hash everything that determines a response (model, template and version, rendered prompt,
sampling parameters and response format); the API key is never part of a key or an entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any


class ResponseCache:
    """Responses by key under `root/<2 hex>/<key>.json`; `root=None` disables caching."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._lock = threading.Lock()
        self.hits = 0
        self.writes = 0

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        if self.root is None:
            return None
        p = self._path(key)
        try:
            entry = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # A torn or foreign file is a miss, not a crash: the response is fetched and rewritten.
            return None
        if entry.get("key") != key:
            return None
        with self._lock:
            self.hits += 1
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        if self.root is None:
            return
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.parent / f".tmp-{os.getpid()}-{threading.get_ident()}-{p.name}"
        try:
            tmp.write_text(json.dumps({**entry, "key": key}, sort_keys=True), encoding="utf-8")
            os.replace(tmp, p)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        with self._lock:
            self.writes += 1
