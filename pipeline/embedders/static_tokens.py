"""A static embedder over the pipeline tokenizer's own vocabulary: document vectors straight from token ids.

Spec `static-tokens`. Prepared documents store pipeline token ids; the other embedders decode them to text
and tokenize again with their own tokenizer, which is most of a static model's cost. Here a table holds
rows indexed by pipeline token ids, so a span of ids is embedded as the mean of its rows (one
`torch.nn.functional.embedding_bag` over the flat ids of a batch), with no decoding or re-tokenization.

The table is built from `static-minilm` (`pipeline.embedders.static_minilm`: the model2vec recipe on the bundled
MiniLM, i.e. teacher vectors of MiniLM's word pieces, PCA to 256-d, smooth inverse frequency weights): a
pipeline token's row is the sum of the rows of the MiniLM pieces its text splits into. A document's mean
over pipeline-token rows is then `static-minilm`'s mean over pieces wherever the two segmentations agree.
Where they disagree is inside words: Llama-3 cuts "Mesopotamian" into " Mes|opot|am|ian", and a piece
that continues a word is a `##` piece to MiniLM. So an id whose text starts with a word character has a
second row, its text split as a word continuation ("opot" -> ##op ##ot), used when the previous token
ends with a word character. Ids whose text gives no piece (whitespace, special tokens, lone UTF-8 byte
fragments, characters MiniLM only knows as [UNK]) have zero rows and do not count.

Why not run MiniLM on every vocabulary token's text, as model2vec does for its own vocabulary: tried on
Llama-3 (76K distinct piece sequences, ~2.5 min on 2 cores, then PCA and SIF weights by pipeline-token
frequency), it agreed less with MiniLM (Spearman of pairwise similarities on 600 Wikipedia leads 0.47,
with continuation rows) and scored more unrelated code blocks as near-duplicates (4.0% above 0.97) than
this composition (0.54; 2.0%), which keeps per-piece weights and takes seconds.

Cached under `<cache>/models/static-tokens-<vocab hash>-<key>/`, keyed by the tokenizer's vocabulary hash
and the fingerprint of the `static-minilm` folder (itself keyed by MiniLM's weights and the recipe's
parameters). `python -m pipeline.embedders.static_tokens [tokenizer name]` builds it ahead of time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.parquet_io import write_json_atomic
from pipeline.core.progress import waiting
from pipeline.core.tokenizer import Tokenizer, load_tokenizer
from pipeline.embedders.base import STATIC_TOKENS, Embedder, folder_fingerprint
from pipeline.embedders.static_minilm import cache_root, static_minilm

TABLE_STEP = "token_table@1"
MAX_WORD_CHARS = 100  # WordPiece's own limit: a longer word is [UNK]
FILES = ("rows.npy", "cont_row.npy", "glue_left.npy", "glue_right.npy")
INFO_FILE = "longloom_table.json"


def vocabulary_texts(tok: Tokenizer) -> list[str]:
    """The text of every id: "" for special ids; bytes that are no whole UTF-8 character are dropped."""
    return [b.decode("utf-8", errors="ignore") for b in tok._token_bytes()]


def splits_words(c: str) -> bool:
    """True where MiniLM's pre-tokenizer ends a word: whitespace and (BERT's notion of) punctuation."""
    if c.isspace():
        return True
    o = ord(c)
    if 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126:
        return True
    return unicodedata.category(c).startswith("P")


def continuation_pieces(fast: Any, vocab: dict[str, int], text: str) -> list[int]:
    """MiniLM pieces of `text` read as the rest of a word: its first word as `##` pieces, the rest as usual."""
    words = fast.pre_tokenizer.pre_tokenize_str(text)
    if not words or words[0][1][0] != 0:
        return list(fast.encode(text, add_special_tokens=False).ids)
    word, (_, end) = words[0]
    pieces: list[int] = []
    start = 0
    while start < len(word) and len(word) <= MAX_WORD_CHARS:  # greedy longest match, as WordPiece
        stop = len(word)
        while stop > start and f"##{word[start:stop]}" not in vocab:
            stop -= 1
        if stop == start:  # no piece fits: WordPiece makes the whole word [UNK]
            pieces = []
            break
        pieces.append(vocab[f"##{word[start:stop]}"])
        start = stop
    rest = text[end:]
    return pieces + (list(fast.encode(rest, add_special_tokens=False).ids) if rest.strip() else [])


@dataclass
class TokenTable:
    """Rows for pipeline token ids, plus the rows of ids that continue a word."""

    rows: np.ndarray  # (n_vocab + n_continuation_rows, dim) float32
    cont_row: np.ndarray  # (n_vocab,) int64: an id's row when it continues a word (its own id if none)
    glue_left: np.ndarray  # (n_vocab,) bool: the text starts with a word character
    glue_right: np.ndarray  # (n_vocab,) bool: the text ends with a word character

    @property
    def n_vocab(self) -> int:
        return len(self.cont_row)

    def row_index(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The row of every position of the spans `ids[offsets[i]:offsets[i+1]]`."""
        ids = np.asarray(ids, np.int64)
        cont = np.zeros(len(ids), bool)
        if len(ids) > 1:
            cont[1:] = self.glue_left[ids[1:]] & self.glue_right[ids[:-1]]
        starts = np.asarray(offsets[:-1], np.int64)
        cont[starts[starts < len(ids)]] = False  # a span's first token starts its word
        return np.where(cont, self.cont_row[ids], ids)

    def save(self, folder: Path) -> None:
        for name, arr in zip(FILES, (self.rows, self.cont_row, self.glue_left, self.glue_right), strict=True):
            np.save(folder / name, arr)

    @classmethod
    def load(cls, folder: Path) -> TokenTable:
        return cls(*(np.load(folder / name) for name in FILES))


def build_token_table(tok: Tokenizer, static_folder: Path) -> TokenTable:
    """Compose the table for `tok` from the rows of the static model at `static_folder`."""
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    module = StaticEmbedding.load(str(static_folder))
    piece_rows = module.embedding.weight.detach().numpy().astype(np.float32)
    fast = module.tokenizer
    vocab = fast.get_vocab()
    unk = vocab.get("[UNK]", -1)
    # normalise as MiniLM does (lower case, no accents, spaces around CJK characters) before reading words
    texts = [fast.normalizer.normalize_str(t) if fast.normalizer else t for t in vocabulary_texts(tok)]
    n = len(texts)
    glue_left = np.array([bool(t) and not splits_words(t[0]) for t in texts])
    glue_right = np.array([bool(t) and not splits_words(t[-1]) for t in texts])

    def row(pieces: list[int]) -> np.ndarray:
        kept = [p for p in pieces if p != unk]
        return piece_rows[kept].sum(0) if kept else np.zeros(piece_rows.shape[1], np.float32)

    starts = [row(e.ids) for e in fast.encode_batch(texts, add_special_tokens=False)]
    cont_ids = np.flatnonzero(glue_left)
    cont = [row(continuation_pieces(fast, vocab, texts[i])) for i in cont_ids.tolist()]
    rows = np.stack(starts + cont).astype(np.float32)
    cont_row = np.arange(n, dtype=np.int64)
    cont_row[cont_ids] = n + np.arange(len(cont_ids))
    return TokenTable(rows, cont_row, glue_left, glue_right)


_BUILD_LOCK = threading.Lock()


def token_table_dir(tok: Tokenizer, root: Path | None = None, static_folder: Path | None = None) -> Path:
    """The cached table folder for `tok` (under `root`/models, default the cache root), built on first use."""
    static = static_folder or static_minilm()
    vocab = tok.identity.vocab_hash
    key = hashlib.sha256(f"{TABLE_STEP}|{folder_fingerprint(static)}|{vocab}".encode()).hexdigest()[:12]
    out = (root or cache_root()) / "models" / f"static-tokens-{vocab}-{key}"
    with _BUILD_LOCK:
        if not (out / INFO_FILE).exists():
            print(
                f"longloom: building the static-tokens table for {tok.name} into {out} (once)",
                file=sys.stderr,
            )
            started = time.perf_counter()
            with waiting(f"building the static-tokens table for {tok.name} (first use only)"):
                table = build_token_table(tok, static)
            tmp = out.parent / f".tmp-{os.getpid()}-{threading.get_ident()}-{out.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            table.save(tmp)
            info = {
                "step": TABLE_STEP,
                "tokenizer": tok.name,
                "vocab_hash": vocab,
                "from": str(static),
                "rows": len(table.rows),
                "ids_with_rows": int((np.abs(table.rows[: table.n_vocab]).sum(1) > 0).sum()),
                "continuation_rows": len(table.rows) - table.n_vocab,
                "seconds": round(time.perf_counter() - started, 1),
            }
            write_json_atomic(tmp / INFO_FILE, info)  # written last: marks the folder complete
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished first: theirs is as good as ours
                shutil.rmtree(tmp, ignore_errors=True)
    return out


class TokenStaticEmbedder(Embedder):
    """Spans of pipeline token ids -> mean of their table rows, L2-normalised; texts are tokenized first."""

    def __init__(self, spec: str, identity: str, table: TokenTable, tokenizer: Tokenizer) -> None:
        import torch

        if table.n_vocab != tokenizer.n_vocab:
            raise ValueError(
                f"token table for {table.n_vocab} ids does not fit {tokenizer.n_vocab} token ids"
            )
        super().__init__(spec, identity, int(table.rows.shape[1]), None)
        self.table = table
        self._rows = torch.from_numpy(np.ascontiguousarray(table.rows, np.float32))
        self.tokenizer = tokenizer

    def encode_ids(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """One unit vector per span `ids[offsets[i]:offsets[i+1]]`; a span with no known token gives zeros."""
        n = len(offsets) - 1
        if n <= 0:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            self.calls += 1
            self.texts += n
        out = self._sum_rows(ids, offsets)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def _sum_rows(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        # embedding_bag gathers and sums rows per span in one pass; numpy's rows[ids] + add.reduceat was
        # ~100x slower here (it materialises a 1 KB row per token)
        import torch

        index = torch.from_numpy(self.table.row_index(ids, offsets))
        starts = torch.from_numpy(np.asarray(offsets[:-1], np.int64))
        return torch.nn.functional.embedding_bag(index, self._rows, starts, mode="sum").numpy()

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        ids, offsets = self.tokenizer.encode_batch(texts)
        return self._sum_rows(ids, offsets)


def load_token_embedder(tok: Tokenizer, root: Path | None = None) -> TokenStaticEmbedder:
    """The `static-tokens` embedder for `tok` (table built on first use, then cached)."""
    folder = token_table_dir(tok, root)
    identity = f"{STATIC_TOKENS}@{tok.identity.vocab_hash}-{folder_fingerprint(folder)}"
    return TokenStaticEmbedder(STATIC_TOKENS, identity, TokenTable.load(folder), tok)


if __name__ == "__main__":
    print(token_table_dir(load_tokenizer(sys.argv[1] if len(sys.argv) > 1 else "fastokens:llama3")))
