"""Embedding cache keyed by (document content hash, embedding key): a local folder or an fsspec URL.

The embedding key names the model weights, the chunking and the pipeline tokenizer (see
`pipeline.stages.embed.embedding_key`), so a vector is reused only where it would come out the same.
Layout: `<root>/<key>/` holds append-only segments, each a pair of .npy files written atomically
(`<seg>.vecs.npy` first, then `<seg>.keys.npy`, whose presence marks the segment complete). Writers never
touch another writer's segment, so parallel shard tasks (threads, processes, Dask workers) can share a
cache without locks; a text embedded twice concurrently simply appears in two segments. On a URL
(`s3://...`) segments go through `pipeline.core.storage.KeyedFiles`: a lookup fetches the key files it
has not seen and the vectors of the segments it hits, a new segment is stored with one PUT per file.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np

from pipeline.core.storage import KeyedFiles

KEY_DTYPE = "S64"  # hex sha256, as in the tokenized documents


class EmbeddingCache:
    def __init__(self, root: str | Path, key: str, dim: int, dtype: str) -> None:
        self.files = KeyedFiles(root)
        self.key = key
        self.dir = self.files.local / key  # the local copy (the cache itself for a local root)
        self.dim = dim
        self.dtype = np.dtype(dtype)

    def segments(self) -> list[Path]:
        """Complete segments' key files, as local files (a store's are fetched once per machine)."""
        found = (self.files.path(rel) for rel in self.files.list(self.key, ".keys.npy"))
        return [p for p in found if p is not None]

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
            name = segs[s].name.replace(".keys.npy", ".vecs.npy")
            vec_file = self.files.path(f"{self.key}/{name}")
            if vec_file is None:  # cannot happen: a segment's keys are stored after its vectors
                raise FileNotFoundError(f"{self.files / f'{self.key}/{name}'}: embedding cache segment")
            vecs = np.load(vec_file, mmap_mode="r")
            out[where] = vecs[row_hit[where]]
        return found, out

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Publish a new segment (vectors first, keys last: a segment without keys is ignored)."""
        if not len(keys):
            return
        assert vectors.shape == (len(keys), self.dim), "one vector per key"
        meta = f"{self.key}/cache.json"
        if not (self.files.local / meta).exists():
            data = (json.dumps({"dim": self.dim, "dtype": self.dtype.name}) + "\n").encode()
            self.files.write_bytes(meta, data)
        name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for suffix, arr in (
            (".vecs.npy", np.asarray(vectors, self.dtype)),
            (".keys.npy", keys.astype(KEY_DTYPE)),
        ):
            buf = io.BytesIO()
            np.save(buf, arr)
            self.files.write_bytes(f"{self.key}/{name}{suffix}", buf.getvalue())

    def size(self) -> int:
        return sum(len(np.load(p, mmap_mode="r")) for p in self.segments())
