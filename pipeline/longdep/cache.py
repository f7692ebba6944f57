"""A resumable on-disk cache of long-dependency scores, keyed by (model fingerprint, document hash, settings).

One small JSON file per key under a two-character fan-out directory, written atomically (temporary
file + rename), so an interrupted run leaves only complete entries and a rerun resumes from them.
Entries hold scores and hashes only: no text, no endpoint URL, no key. The root may be an fsspec URL
(`long_dependency.cache_dir: s3://...`): entries go through `pipeline.core.storage.KeyedFiles` (a hit
fetches that one entry; a new one is stored with one PUT, whole or absent).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.core.storage import KeyedFiles


class ScoreCache:
    def __init__(self, root: str | Path) -> None:
        self.files = KeyedFiles(root)
        self.root = self.files.local  # the local copy (the cache itself for a local root)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def digest(key: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def _rel(self, key: dict[str, Any]) -> str:
        d = self.digest(key)
        return f"{d[:2]}/{d}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        data = self.files.read_bytes(self._rel(key))
        if data is None:
            self.misses += 1
            return None
        try:
            rec = json.loads(data)
        except ValueError:  # cannot happen with atomic writes, but never trust a cache blindly
            self.misses += 1
            return None
        if rec.get("key") != key:  # a digest collision or a foreign file: recompute
            self.misses += 1
            return None
        self.hits += 1
        return dict(rec["result"])

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> None:
        self.files.write_bytes(
            self._rel(key), json.dumps({"key": key, "result": result}, sort_keys=True).encode()
        )
