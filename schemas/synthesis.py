"""Config for synthesized long-range-dependency chat samples (issues 4 and 5)."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

from schemas.procedural import ProceduralConfig as ProceduralConfig  # issue 4: the `procedural:` section
from schemas.redact import has_userinfo, redact_url

# --- LLM rewriter (issue 5) ------------------------------------------------------------------------------

RewriterKind = Literal["chunk_qa", "multi_hop", "session_state", "rephrase"]


class RewriterPrice(BaseModel):
    """What one model costs, in a currency of your choice per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_per_million: float = Field(default=0.0, ge=0)
    completion_per_million: float = Field(default=0.0, ge=0)


class RewriterSampling(BaseModel):
    """Sampling parameters sent with every request; part of the response-cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=512, ge=16, description="Completion tokens per request.")
    seeded: bool = Field(
        default=True,
        description="Send a per-sample seed derived from run.seed (endpoints that honour it repeat).",
    )


class RewriterStrategy(BaseModel):
    """One synthesis strategy and how many samples to request from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: RewriterKind
    samples: int = Field(ge=0, description="Samples requested (one request each).")
    template: str | None = Field(
        default=None,
        description="Prompt template file stem under pipeline/synth/rewriter/templates; defaults by kind.",
    )
    hops: int = Field(default=2, ge=2, le=8, description="multi_hop: passages per question, far apart.")
    turns: int = Field(default=3, ge=3, le=8, description="session_state: user turns per conversation.")
    inputs: list[str] = Field(
        default_factory=list,
        description="rephrase: ShareGPT/UltraChat-style JSON or JSONL files (globs, relative to the config).",
    )
    grounded: bool = Field(
        default=False, description="rephrase: ground the conversation on a passage of a long context."
    )
    max_input_chars: int = Field(
        default=8000,
        ge=256,
        description="rephrase: longer input conversations are skipped (counted as too_long).",
    )

    @model_validator(mode="after")
    def _inputs_for_rephrase(self) -> RewriterStrategy:
        if self.kind == "rephrase" and self.samples and not self.inputs:
            raise ValueError(
                "rewriter strategy 'rephrase' needs `inputs` (ShareGPT/UltraChat JSON or JSONL files)"
            )
        return self


class RewriterConfig(BaseModel):
    """LLM rewriter: long-range-dependency chat samples through any OpenAI-compatible endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    # endpoint
    base_url: str = Field(
        default="http://127.0.0.1:8080/v1",
        description="OpenAI-compatible base URL. Query parameters are sent with every request and "
        "masked wherever the URL is recorded; user:password@ is refused (use api_key_env).",
    )
    model: str = Field(default="default", description="Model name sent to the endpoint.")
    api_key_env: str | None = Field(
        default="LONGLOOM_REWRITER_API_KEY",
        description="Environment variable holding the API key (preferred).",
    )
    api_key: SecretStr | None = Field(
        default=None, description="The key itself; prefer api_key_env. Never written to any output."
    )
    json_mode: Literal["json_schema", "json_object", "off"] = Field(
        default="json_object",
        description="response_format sent; falls back to tolerant parsing if the endpoint refuses it.",
    )
    sampling: RewriterSampling = Field(default_factory=RewriterSampling)
    prices: dict[str, RewriterPrice] = Field(
        default_factory=dict, description="Price per model name, for the cost report."
    )
    # execution (not part of what the output is)
    concurrency: int = Field(default=8, ge=1, le=1024, description="Requests in flight per task.")
    timeout_seconds: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, description="Attempts per request (429, 5xx, timeouts).")
    backoff_seconds: float = Field(default=1.0, ge=0, description="First retry delay; doubles per attempt.")
    backoff_max_seconds: float = Field(default=60.0, ge=0)
    retry_after_max_seconds: float = Field(
        default=300.0, ge=0, description="Longest Retry-After honoured; longer ones are capped."
    )
    request_budget: int | None = Field(
        default=None, ge=0, description="HTTP requests (retries included) per run, shared out over tasks."
    )
    cache_dir: str | None = Field(
        default=None, description="Response cache folder; default <output.dir>/.longloom/rewriter-cache."
    )
    contexts_per_task: int = Field(default=16, ge=1, description="Contexts (or conversations) per task.")
    progress: bool = Field(default=True, description="Show a progress bar per task.")
    # what samples are made of
    strategies: list[RewriterStrategy] = Field(default_factory=list)
    context_target: int | None = Field(
        default=None, description="Packing target length whose rows are the contexts; default the smallest."
    )
    sample_length: int | None = Field(
        default=None, ge=64, description="Exact tokens per chat sample; default the context target length."
    )
    chat_template: str = Field(
        default="llama3",
        description="Chat template of the samples: llama3, chatml, hf:<tokenizer folder (relative to the config) "
        "or hub id> (the model's own chat_template) or jinja:<template> (pipeline.synth.chat).",
    )
    length_counts: Literal["full_chat", "without_answers", "context_only"] = Field(
        default="full_chat", description="What sample_length counts (see pipeline.synth.chat.LengthCounts)."
    )
    chunk_tokens: int = Field(default=384, ge=16, description="Passage size shown to the model, in tokens.")
    reserve_tokens: int = Field(
        default=768, ge=0, description="Passages end this many tokens before sample_length (room for Q&A)."
    )
    chunk_depths: list[float] | None = Field(
        default=None,
        description="Fixed passage depths (fractions of sample_length); default spread before the tail.",
    )
    reject_tail_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Reject samples whose evidence all lies in this last part of the context.",
    )
    min_quote_chars: int = Field(default=12, ge=1, description="Shorter evidence quotes are rejected.")
    system_prompt: str | None = Field(default=None, description="System message of every sample.")

    @field_validator("api_key", mode="before")
    @classmethod
    def _key_as_text(cls, v: object) -> object:
        # Coerce before validation so a malformed key is never echoed in a validation error; a
        # SecretStr stays itself (str() of it is the mask, which must never replace the key).
        return v if v is None or isinstance(v, SecretStr) else SecretStr(str(v))

    @field_validator("base_url")
    @classmethod
    def _no_userinfo(cls, v: str) -> str:
        # httpx would send user:password@ as Basic auth instead of the API key, and the URL is recorded
        # in many places: refuse it rather than guess which credential the user meant.
        if has_userinfo(v):
            raise ValueError(
                "credentials in the URL (user:password@host) are not supported; remove them and put "
                "the key in the environment variable named by rewriter.api_key_env"
            )
        return v

    @field_serializer("base_url", when_used="json")
    def _recorded_url(self, v: str) -> str:
        # JSON dumps are what gets recorded (manifest, card, config hash, Prefect parameters): no secrets.
        return redact_url(v)

    @field_validator("chunk_depths")
    @classmethod
    def _depths_in_range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not 0 <= d < 1 for d in v)):
            raise ValueError(f"chunk_depths must be a non-empty list of fractions in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _needs_strategies(self) -> RewriterConfig:
        if self.enabled and not any(s.samples for s in self.strategies):
            raise ValueError("rewriter is enabled but no strategy requests samples (strategies[].samples)")
        return self
