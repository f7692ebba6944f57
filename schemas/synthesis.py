"""Config for synthesized long-range-dependency chat samples (issues 4 and 5)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from schemas.procedural import ProceduralConfig as ProceduralConfig  # issue 4: the `procedural:` section
from schemas.redact import has_userinfo, redact_url

# --- LLM rewriter (issue 5) ------------------------------------------------------------------------------

RewriterKind = Literal["chunk_qa", "multi_hop", "session_state", "rephrase"]


def _omit_at_default(model: BaseModel, dumped: Any, names: tuple[str, ...]) -> Any:
    """`dumped` without the fields `names` while they hold their defaults.

    Fields added after a section was first recorded (issue 17) are left out of every dump while unused,
    so a config that does not use them keeps its config hash, stage keys and output bytes.
    """
    if not isinstance(dumped, dict):
        return dumped
    for name in names:
        if name in dumped and getattr(model, name) == type(model).model_fields[name].default:
            del dumped[name]
    return dumped


DEFAULT_INSTRUCTION = (
    "Read the documents below carefully. After them come questions about details they state; answer "
    "each question from the documents, briefly and precisely."
)
DEFAULT_DOCUMENT_HEADER = "### Document {doc_id} ({source}){continued}"


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
    turns_per_context: int = Field(
        default=1,
        ge=1,
        le=64,
        description="chunk_qa: question-answer turns per long context, each on its own passage (one request "
        "per turn), each verified alone; the sample is one conversation of the turns that pass.",
    )
    min_turns: int | None = Field(
        default=None,
        ge=1,
        description="chunk_qa: a sample needs at least this many verified turns (default: 1); fewer: rejected.",
    )

    _NEW_FIELDS = ("turns_per_context", "min_turns")

    @model_serializer(mode="wrap")
    def _recorded(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        return _omit_at_default(self, handler(self), self._NEW_FIELDS)

    @model_validator(mode="after")
    def _turns_for_chunk_qa(self) -> RewriterStrategy:
        if (self.turns_per_context > 1 or self.min_turns is not None) and self.kind != "chunk_qa":
            raise ValueError(
                f"rewriter strategy {self.kind!r}: turns_per_context/min_turns apply to chunk_qa only"
            )
        if self.min_turns is not None and self.min_turns > self.turns_per_context:
            raise ValueError(
                f"rewriter strategy chunk_qa: min_turns {self.min_turns} exceeds turns_per_context "
                f"{self.turns_per_context}; lower min_turns or raise turns_per_context"
            )
        return self

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
    context_format: Literal["plain", "documents"] = Field(
        default="plain",
        description="plain: the context is the documents joined by blank lines, cut at a word end. documents: "
        "an instruction opens the user turn, every document has a header line (document_header), the "
        "context starts at a document or sentence start and ends at a sentence or paragraph end.",
    )
    instruction: str = Field(
        default=DEFAULT_INSTRUCTION,
        min_length=1,
        description="context_format documents: the text that opens the user turn, before the documents.",
    )
    document_header: str = Field(
        default=DEFAULT_DOCUMENT_HEADER,
        min_length=1,
        description="context_format documents: the line before each document; fields {source}, {doc_id}, "
        "{uri}, {continued} (', continued' for a document that began before the context).",
    )

    _NEW_FIELDS = ("context_format", "instruction", "document_header")

    @model_serializer(mode="wrap")
    def _recorded(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        return _omit_at_default(self, handler(self), self._NEW_FIELDS)

    @field_validator("document_header")
    @classmethod
    def _header_fields(cls, v: str) -> str:
        if "\n" in v:
            raise ValueError("document_header must be one line (no line break)")
        try:
            v.format(source="s", doc_id="d", uri="u", continued="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"document_header {v!r}: {err!s}; use only the fields {{source}}, {{doc_id}}, {{uri}}, {{continued}}"
            ) from None
        return v

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
