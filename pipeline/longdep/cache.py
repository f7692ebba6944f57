"""A resumable on-disk cache of long-dependency scores, keyed by (model fingerprint, document hash, settings).

One small JSON file per key under a two-character fan-out directory, written atomically (temporary
file + rename), so an interrupted run leaves only complete entries and a rerun resumes from them.
Entries hold scores and hashes only: no text, no endpoint URL, no key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


class ScoreCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def digest(key: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def _path(self, key: dict[str, Any]) -> Path:
        d = self.digest(key)
        return self.root / d[:2] / f"{d}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        p = self._path(key)
        try:
            rec = json.loads(p.read_text())
        except FileNotFoundError:
            self.misses += 1
            return None
        except json.JSONDecodeError:  # cannot happen with atomic writes, but never trust a cache blindly
            self.misses += 1
            return None
        if rec.get("key") != key:  # a digest collision or a foreign file: recompute
            self.misses += 1
            return None
        self.hits += 1
        return dict(rec["result"])

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "result": result}, sort_keys=True))
        os.replace(tmp, p)
