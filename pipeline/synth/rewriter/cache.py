"""On-disk response cache: one small JSON file per request key, written atomically.

A rerun, or the rerun after a crash, finds every response it already paid for and makes no call for
it. Keys hash everything that determines a response (model, template and version, rendered prompt,
sampling parameters and response format); the API key is never part of a key or an entry. The root
may be an fsspec URL (`rewriter.cache_dir: s3://...`): entries go through
`pipeline.core.storage.KeyedFiles` (a hit fetches that one entry; a new one is stored with one PUT).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from pipeline.core.storage import KeyedFiles


class ResponseCache:
    """Responses by key under `root/<2 hex>/<key>.json`; `root=None` disables caching."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = root
        self.files = KeyedFiles(root) if root is not None else None
        self._lock = threading.Lock()
        self.hits = 0
        self.writes = 0

    @staticmethod
    def _rel(key: str) -> str:
        return f"{key[:2]}/{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        if self.files is None:
            return None
        try:
            data = self.files.read_bytes(self._rel(key))
            if data is None:
                return None
            entry = json.loads(data.decode("utf-8"))
        except (OSError, ValueError):
            # A torn or foreign file is a miss, not a crash: the response is fetched and rewritten.
            return None
        if entry.get("key") != key:
            return None
        with self._lock:
            self.hits += 1
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        if self.files is None:
            return
        self.files.write_bytes(self._rel(key), json.dumps({**entry, "key": key}, sort_keys=True).encode())
        with self._lock:
            self.writes += 1
