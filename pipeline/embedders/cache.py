"""On-disk embedding cache keyed by (document content hash, embedding key).

The embedding key names the model weights, the chunking and the pipeline tokenizer (see
`pipeline.stages.embed.embedding_key`), so a vector is reused only where it would come out the same.
Layout: `<root>/<key>/` holds append-only segments, each a pair of .npy files written atomically
(`<seg>.vecs.npy` first, then `<seg>.keys.npy`, whose presence marks the segment complete). Writers never
touch another writer's segment, so parallel shard tasks (threads, processes, Dask workers) can share a
cache without locks; a text embedded twice concurrently simply appears in two segments.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import numpy as np

KEY_DTYPE = "S64"  # hex sha256, as in the tokenized documents


class EmbeddingCache:
    def __init__(self, root: Path, key: str, dim: int, dtype: str) -> None:
        self.dir = root / key
        self.dim = dim
        self.dtype = np.dtype(dtype)

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("*.keys.npy")) if self.dir.is_dir() else []

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask over `keys`, vectors of the found keys in order); reads only the rows hit."""
        found = np.zeros(len(keys), bool)
        segs = self.segments()
        if not segs or not len(keys):
            return found, np.zeros((0, self.dim), self.dtype)
        parts = [np.load(p) for p in segs]
        all_keys = np.concatenate(parts)
        seg_of = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        row_of = np.concatenate([np.arange(len(p)) for p in parts])
        order = np.argsort(all_keys, kind="stable")
        sorted_keys = all_keys[order]
        pos = np.searchsorted(sorted_keys, keys)
        inside = pos < len(sorted_keys)
        found[inside] = sorted_keys[pos[inside]] == keys[inside]
        hit = order[pos[found]]
        out = np.empty((int(found.sum()), self.dim), self.dtype)
        seg_hit, row_hit = seg_of[hit], row_of[hit]
        for s in np.unique(seg_hit):
            where = np.flatnonzero(seg_hit == s)
            vecs = np.load(str(segs[s]).replace(".keys.npy", ".vecs.npy"), mmap_mode="r")
            out[where] = vecs[row_hit[where]]
        return found, out

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Publish a new segment (vectors first, keys last: a segment without keys is ignored)."""
        if not len(keys):
            return
        assert vectors.shape == (len(keys), self.dim), "one vector per key"
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "cache.json"
        if not meta.exists():
            _atomic_write(meta, (json.dumps({"dim": self.dim, "dtype": self.dtype.name}) + "\n").encode())
        name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for suffix, arr in (
            (".vecs.npy", np.asarray(vectors, self.dtype)),
            (".keys.npy", keys.astype(KEY_DTYPE)),
        ):
            final = self.dir / f"{name}{suffix}"
            tmp = self.dir / f".tmp-{name}{suffix}"
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, final)

    def size(self) -> int:
        return sum(len(np.load(p, mmap_mode="r")) for p in self.segments())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}"
    tmp.write_bytes(data)
    os.replace(tmp, path)
