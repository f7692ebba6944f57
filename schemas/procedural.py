"""Config of the procedural long-range-dependency generators (issue 4): the `procedural:` section.

Each task entry names its generator in `task:` and carries that generator's parameters beside the
sample count, so a typo in a parameter is a config error naming the field, before any work starts.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Task(_Strict):
    samples: int = Field(default=2, ge=0, description="Samples of this task per target length.")
    name: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_]*$",
        description="Label for this entry (sample ids, reports); defaults to the task name.",
    )

    @property
    def label(self) -> str:
        return self.name or str(getattr(self, "task"))  # noqa: B009  (every subclass defines `task`)

    def params(self) -> dict:
        """The generator parameters: everything but the bookkeeping fields."""
        return self.model_dump(mode="json", exclude={"samples", "name"})


class HashChainTask(_Task):
    """Magic's HashHop: hash pairs `a → b` shuffled through the context; follow a chain from its start."""

    task: Literal["hash_chain"] = "hash_chain"
    hash_length: int = Field(default=16, ge=4, le=64)
    alphabet: str = Field(default="0123456789abcdef", min_length=2, description="Characters of a hash.")
    chains: int = Field(default=4, ge=1, le=1000, description="Chains in the context (the rest distract).")
    hops: int = Field(default=4, ge=1, le=100, description="Links per chain.")
    queries: int = Field(default=1, ge=1, description="Chains asked about, one user turn each.")
    completion: Literal["chain_of_thought", "skip", "two_hop"] = Field(
        default="chain_of_thought",
        description="Answer with every hash of the chain, only the last one, or every second one.",
    )
    haystack: Literal["text", "hashes"] = Field(
        default="text",
        description="text: the links sit in the run's text; hashes: HashHop's setting, the whole context is "
        "shuffled hash pairs (the chains asked about plus as many distractor chains as fill it).",
    )
    prose_share: float = Field(
        default=0.0,
        ge=0.0,
        le=0.9,
        description="With haystack 'hashes': share of the context given to lines of the run's text, "
        "interleaved with the hash pairs.",
    )

    @field_validator("alphabet")
    @classmethod
    def _distinct_plain(cls, v: str) -> str:
        if len(set(v)) != len(v) or any(c.isspace() or c in "→" for c in v):
            raise ValueError("alphabet must be distinct, non-whitespace characters")
        return v

    @model_validator(mode="after")
    def _fits(self) -> HashChainTask:
        if self.queries > self.chains:
            raise ValueError(f"queries ({self.queries}) cannot exceed chains ({self.chains})")
        if len(self.alphabet) ** self.hash_length < 1e9:
            raise ValueError("alphabet ** hash_length is too small for collision-free random hashes")
        if self.prose_share and self.haystack != "hashes":
            raise ValueError("prose_share needs haystack: hashes (with text haystacks all context is prose)")
        return self

    def params(self) -> dict:
        # the HashHop knobs appear only when set, so the params of existing configs stay as they were
        out = super().params()
        if self.haystack == "text":
            out.pop("haystack")
            out.pop("prose_share")
        return out


class MultiNeedleTask(_Task):
    """RULER's multi-key / multi-value / multi-query needles, classic or written like the text around them."""

    task: Literal["multi_needle"] = "multi_needle"
    # not `keys`: a model attribute named keys makes dict(model) (Prefect's parameter walk) call it
    num_keys: int = Field(
        default=4, ge=1, le=500, description="Keys with needles (those not asked distract)."
    )
    values_per_key: int = Field(default=1, ge=1, le=20)
    queries: int = Field(default=1, ge=1, description="Keys asked about, one user turn each.")
    style: Literal["classic", "stealth", "mixed"] = Field(
        default="mixed",
        description="classic: 'The special magic number for K is: V.' on its own line; stealth: a "
        "sentence inside the prose that does not stand out; mixed: alternate per sample.",
    )
    value_kind: Literal["number", "uuid", "word"] = "number"
    key_kind: Literal["word", "number", "uuid"] = Field(
        default="word", description="Classic keys: adjective-noun words (default), 7-digit numbers or UUIDs."
    )
    haystack: Literal["text", "noise", "needles"] = Field(
        default="text",
        description="text: the run's rows; noise: repeated plain sentences (RULER's noise haystack); "
        "needles: nothing but distractor needles of the same form with other keys (RULER's multikey_2/3).",
    )

    @model_validator(mode="after")
    def _fits(self) -> MultiNeedleTask:
        if self.queries > self.num_keys:
            raise ValueError(f"queries ({self.queries}) cannot exceed num_keys ({self.num_keys})")
        if self.style != "classic" and (self.key_kind != "word" or self.haystack != "text"):
            raise ValueError("key_kind and haystack other than the defaults need style: classic")
        if self.style != "classic" and self.value_kind == "word":
            raise ValueError("value_kind: word needs style: classic")
        return self

    def params(self) -> dict:
        # the RULER knobs appear only when set, so the params of existing configs stay as they were
        out = super().params()
        for k, default in (("key_kind", "word"), ("haystack", "text")):
            if out[k] == default:
                out.pop(k)
        return out


class VariableTrackingTask(_Task):
    """RULER's variable tracking: `VAR A = 12345`, `VAR B = VAR A`, ...; which names hold the value?"""

    task: Literal["variable_tracking"] = "variable_tracking"
    chains: int = Field(default=1, ge=1, le=50, description="Chains asked about (one turn each).")
    hops: int = Field(default=4, ge=1, le=100, description="Assignments after the first, per chain.")
    distractors: int = Field(default=2, ge=0, le=200, description="Chains with other values.")
    name_length: int = Field(default=5, ge=3, le=12)
    haystack: Literal["text", "noise"] = Field(
        default="text", description="text: the run's rows; noise: repeated plain sentences (as in RULER)."
    )

    def params(self) -> dict:
        out = super().params()
        if out["haystack"] == "text":
            out.pop("haystack")
        return out


class AggregationTask(_Task):
    """RULER's common-word extraction over log entries spread through the whole context."""

    task: Literal["aggregation"] = "aggregation"
    top_k: int = Field(default=5, ge=1, le=50, description="How many most frequent items to name.")
    frequent_count: int = Field(default=8, ge=2, le=200, description="Entries of each frequent item.")
    rare_items: int = Field(default=15, ge=0, le=500, description="Items that appear less often.")
    rare_count: int = Field(default=2, ge=1, le=100, description="Entries of each rare item.")
    haystack: Literal["text", "entries"] = Field(
        default="text",
        description="text: entries spread through the run's rows; entries: the context is nothing but "
        "entries, the rest filled with made-up rare items, rare_count each (RULER's common-word extraction).",
    )

    def params(self) -> dict:
        out = super().params()
        if out["haystack"] == "text":
            out.pop("haystack")
        return out

    @model_validator(mode="after")
    def _separable(self) -> AggregationTask:
        if self.rare_count >= self.frequent_count:
            raise ValueError("rare_count must be smaller than frequent_count")
        return self


class FrequentWordsTask(_Task):
    """RULER's frequent-word extraction: made-up words with Zipf-distributed frequencies; name the top few."""

    task: Literal["frequent_words"] = "frequent_words"
    top_k: int = Field(default=3, ge=1, le=10, description="How many most frequent words to name.")
    alpha: float = Field(default=2.0, gt=0.0, le=5.0, description="Zipf exponent of the word frequencies.")
    vocabulary: int = Field(default=1000, ge=20, le=100_000, description="Distinct made-up words.")
    words_per_line: int = Field(default=40, ge=10, le=200)


class AdversarialTask(_Task):
    """Adversarial and conflicting evidence: near-miss keys, contradicting updates, prefix-sharing decoy chains."""

    task: Literal["adversarial"] = "adversarial"
    kind: Literal["near_miss", "update_latest", "update_original", "prefix_chain"] = Field(
        default="near_miss",
        description="near_miss: distractor needles whose keys share a word with the asked key; "
        "update_latest / update_original: the value is corrected later in the context, the question asks "
        "for the last / the first value; prefix_chain: a hash chain with decoy chains whose hashes share "
        "their first characters with the real chain's.",
    )
    distractors: int = Field(
        default=4, ge=1, le=100, description="Near-miss keys, corrections, or decoy chains."
    )
    hops: int = Field(default=4, ge=1, le=100, description="prefix_chain: links of the real chain.")
    hash_length: int = Field(default=16, ge=8, le=64, description="prefix_chain: characters of a hash.")
    alphabet: str = Field(
        default="0123456789abcdef", min_length=2, description="prefix_chain: hash characters."
    )
    shared_prefix: int = Field(
        default=8,
        ge=1,
        le=60,
        description="prefix_chain: leading characters a decoy hash shares with the real one.",
    )

    @model_validator(mode="after")
    def _fits(self) -> AdversarialTask:
        if self.kind == "prefix_chain":
            if len(set(self.alphabet)) != len(self.alphabet) or any(
                c.isspace() or c == "→" for c in self.alphabet
            ):
                raise ValueError("alphabet must be distinct, non-whitespace characters")
            if len(self.alphabet) ** (self.hash_length - self.shared_prefix) < 1e6:
                raise ValueError(
                    "alphabet ** (hash_length - shared_prefix) is too small: decoy hashes would collide"
                )
        return self


class QATask(_Task):
    """RULER's qa_1 / qa_2: a QA row's gold paragraph(s) among other rows' paragraphs; answer its question."""

    task: Literal["qa"] = "qa"
    path: str | None = Field(
        default=None, description="A JSONL file (.gz allowed) of QA rows, relative to the config file."
    )
    dataset: str | None = Field(
        default=None, description="Or: a Hugging Face dataset (local folder or hub id)."
    )
    split: str = "train"
    question_field: str = "question"
    answers_field: str = Field(
        default="answers", description="A string, a list of strings, or SQuAD's {text: [...]}."
    )
    context_field: str = Field(
        default="context",
        description="The gold paragraph(s): a string, a list of strings, or HotpotQA's {sentences: [[...]]}.",
    )
    answers: Literal["any", "all"] = Field(
        default="any",
        description="any: any listed answer is right (SQuAD, HotpotQA); all: every listed answer is asked for.",
    )
    # where a relative `path` starts; set by the stage from the config's folder, never recorded in params
    base_dir: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _one_source(self) -> QATask:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("qa: give exactly one of `path` (JSONL) or `dataset` (Hugging Face)")
        return self


class ICLTask(_Task):
    """Many-shot in-context learning: k labelled examples of a dataset, then the label of a held-out row."""

    task: Literal["icl"] = "icl"
    path: str | None = Field(
        default=None,
        description="A JSONL (.gz allowed) or Parquet file of labelled rows, relative to the config.",
    )
    dataset: str | None = Field(
        default=None, description="Or: a Hugging Face dataset (local folder or hub id)."
    )
    split: str = "train"
    text_field: str = "text"
    label_field: str = "label"
    shots: int = Field(default=64, ge=1, le=200_000, description="Examples in the context (k).")
    balance: Literal["natural", "balanced"] = Field(
        default="balanced",
        description="natural: examples drawn in the dataset's label proportions; balanced: as even as possible.",
    )
    order: Literal["shuffled", "grouped"] = Field(
        default="shuffled",
        description="shuffled: labels interleaved at random; grouped: all of a label together.",
    )
    max_example_chars: int = Field(
        default=600, ge=20, le=100_000, description="Longer texts are cut at a word end."
    )
    # where a relative `path` starts; set by the stage from the config's folder, never recorded in params
    base_dir: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _one_source(self) -> ICLTask:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("icl: give exactly one of `path` (JSONL/Parquet) or `dataset` (Hugging Face)")
        return self


TaskConfig = Annotated[
    HashChainTask
    | MultiNeedleTask
    | VariableTrackingTask
    | AggregationTask
    | FrequentWordsTask
    | AdversarialTask
    | QATask
    | ICLTask,
    Field(discriminator="task"),
]

DEFAULT_SYSTEM = "You are a careful assistant. Answer using only the document the user gives you."


def _default_tasks() -> list[TaskConfig]:
    return [HashChainTask(), MultiNeedleTask(), VariableTrackingTask(), AggregationTask()]


class ProceduralConfig(_Strict):
    enabled: bool = False
    tasks: list[TaskConfig] = Field(default_factory=_default_tasks)
    target_lengths: list[int] | None = Field(
        default=None, description="Sample lengths in tokens; default: the packing target lengths."
    )
    chat_template: str = Field(
        default="llama3",
        description="Chat template: llama3, chatml, hf:<tokenizer folder (relative to the config) or hub id> "
        "(the model's own chat_template) or jinja:<template>.",
    )
    system_prompt: str | None = Field(default=DEFAULT_SYSTEM, description="None: no system message.")
    length_counts: Literal["full_chat", "without_answers", "context_only"] = Field(
        default="full_chat",
        description="What target_length counts: the whole chat, the chat without the assistant turns, "
        "or the context alone.",
    )
    seed: int | None = Field(default=None, description="Default: run.seed.")
    depth_range: tuple[float, float] = Field(
        default=(0.0, 0.8),
        description=(
            "Evidence depths are spread evenly over this part of the context. The default leaves the "
            "last 20% out, so every answer sits well before the question."
        ),
    )
    samples_per_batch: int = Field(default=16, ge=1, description="Samples per flow task and output file.")
    config_name: str = Field(default="procedural", pattern=r"^[a-z0-9][a-z0-9_]*$")
    eval_config_name: str | None = Field(
        default="procedural_eval",
        pattern=r"^[a-z0-9][a-z0-9_]*$",
        description="Evaluation export (one row per question); None: no export.",
    )

    @field_validator("target_lengths")
    @classmethod
    def _lengths(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if any(x < 512 or x > 16_777_216 for x in v):
                raise ValueError("target lengths must be between 512 and 16777216 tokens")
            if len(set(v)) != len(v):
                raise ValueError(f"target lengths must be distinct, got {v}")
        return v

    @field_validator("depth_range")
    @classmethod
    def _depths(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 1.0:
            raise ValueError("depth_range must be (lo, hi) with 0 <= lo < hi <= 1")
        return v

    @model_validator(mode="after")
    def _distinct_labels(self) -> ProceduralConfig:
        labels = [t.label for t in self.tasks]
        if len(set(labels)) != len(labels):
            raise ValueError(f"task labels must be distinct (set `name:` on repeated tasks), got {labels}")
        if self.eval_config_name == self.config_name:
            raise ValueError("eval_config_name must differ from config_name")
        return self
