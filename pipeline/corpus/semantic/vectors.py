"""The corpus's document embeddings, read from the embedding stage's per-shard files by DocIndex position."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.workdir import WorkDir
from pipeline.corpus.index import DocIndex
from pipeline.embedders.documents import embed_dir, embed_documents, open_embeddings
from schemas.stage_config import EmbedConfig

# documents files whose embeddings were verified in this process, with the (size, mtime) of both files:
# selectors and ordering open the same shards several times per run; checksum them once
_VERIFIED: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}


def _stamp(p: Path) -> tuple[int, int]:
    try:
        st = p.stat()
    except FileNotFoundError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


class CorpusEmbeddings:
    """Row-aligned memmaps per shard; a shard whose embeddings are missing is embedded on first use."""

    def __init__(self, cfg: EmbedConfig, idx: DocIndex, work: WorkDir) -> None:
        # a shard whose documents were all filtered has a file but no rows: more files than shards seen
        if len(idx) and len(idx.files) <= int(idx.shard.max()):
            raise ValueError("DocIndex.files must name the documents file of every shard")
        self.cfg = cfg
        self.idx = idx
        self.work = work
        self._maps: dict[int, np.ndarray] = {}

    def shard(self, s: int) -> np.ndarray:
        if s not in self._maps:
            docs = Path(self.idx.files[s])
            shard_id = docs.stem
            stamp = _stamp(docs), _stamp(embed_dir(self.cfg, self.work) / f"{shard_id}.npy")
            if _VERIFIED.get(str(docs)) != stamp:
                # verifies an existing file against its record, or embeds the shard now
                embed_documents(self.cfg, self.work, shard_id, docs)
                _VERIFIED[str(docs)] = (
                    _stamp(docs),
                    _stamp(embed_dir(self.cfg, self.work) / f"{shard_id}.npy"),
                )
            self._maps[s] = open_embeddings(self.cfg, self.work, shard_id)
        return self._maps[s]

    @property
    def dim(self) -> int:
        return int(self.shard(0).shape[1]) if len(self.idx) else 0

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """Vectors of DocIndex positions, in the stored dtype (float16 by default: half the memory)."""
        if not len(positions):
            return np.zeros((0, self.dim), np.float32)
        shards = self.idx.shard[positions]
        first = self.shard(int(shards[0]))
        out = np.empty((len(positions), first.shape[1]), first.dtype)
        for s in np.unique(shards):
            where = np.flatnonzero(shards == s)
            rows = self.idx.row[positions[where]]
            out[where] = self.shard(int(s))[rows]
        return out
