"""The build configuration: one validated model, loaded from YAML, shared by CLI, flows and library.

Every field a user can set lives here. Sections other issues own (diversity, synthesis, card, ...)
are separate models in their own modules and plugged in below, so each stays small.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.diversity import DiversityConfig
from schemas.errors import ConfigError
from schemas.longdep import LongDepConfig
from schemas.publish import CardConfig, PublishConfig
from schemas.redact import redact_url
from schemas.synthesis import ProceduralConfig, RewriterConfig

SourceName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ShortDocDownsample(Strict):
    """Keep documents shorter than `below_tokens` with probability `keep_prob` (Fu et al. 2024)."""

    below_tokens: int = Field(gt=0)
    keep_prob: float = Field(ge=0.0, le=1.0)


class CodeOptions(Strict):
    """How a source-code repository directory becomes one repository-level document."""

    include_extensions: list[str] | None = Field(
        default=None,
        description="Only these file extensions (e.g. ['.py', '.md']); None keeps every text file.",
    )
    exclude_dirs: list[str] = Field(
        default_factory=lambda: [
            ".git",
            ".hg",
            ".svn",
            "node_modules",
            "vendor",
            "vendors",
            "third_party",
            "third-party",
            "site-packages",
            "dist-packages",
            "__pycache__",
            ".venv",
            "venv",
            "env",
            "build",
            "dist",
            ".tox",
            ".mypy_cache",
            ".pytest_cache",
            ".ruff_cache",
            ".idea",
            ".vscode",
            "bower_components",
        ]
    )
    max_file_bytes: int = Field(
        default=2_000_000, gt=0, description="Larger files are quarantined as too_large."
    )


class SourceConfig(Strict):
    name: SourceName
    kind: Literal["jsonl", "parquet", "hf", "code"]
    paths: list[str] = Field(default_factory=list, description="Glob patterns, relative to the config file.")
    dataset: str | None = Field(default=None, description="hf: a local dataset folder or a hub id.")
    subset: str | None = Field(default=None, description="hf: the dataset config name.")
    split: str = "train"
    revision: str | None = Field(default=None, description="hf: a hub revision; recorded in lineage.")
    text_field: str = "text"
    id_field: str | None = None
    license: str | None = None
    language: str | None = None
    token_budget: int | None = Field(
        default=None, gt=0, description="Keep at most this many tokens of this source."
    )
    short_docs: ShortDocDownsample | None = None
    code: CodeOptions = Field(default_factory=CodeOptions)
    on_bad_file: Literal["quarantine", "fail"] = Field(
        default="quarantine",
        description="parquet: a file that cannot be read or lacks the text/id column is quarantined "
        "(every row, with the reason) and the run goes on; 'fail' stops the run instead.",
    )

    @model_validator(mode="after")
    def _inputs_given(self) -> SourceConfig:
        if self.kind == "hf":
            if not self.dataset:
                raise ValueError(
                    f"source {self.name!r}: kind 'hf' needs `dataset` (a local folder or a hub id)"
                )
        elif not self.paths:
            raise ValueError(
                f"source {self.name!r}: kind {self.kind!r} needs `paths` (one or more glob patterns)"
            )
        return self


class TokenizerConfig(Strict):
    name: str = Field(
        default="fastokens:llama3",
        description="'fastokens:<encoding>' or 'tiktoken:<encoding>' (llama3 bundled: Meta's ranks and split "
        "pattern), 'quicktok:<encoding>' or 'hf:<tokenizer.json path, folder or hub id>'.",
    )
    max_piece_chars: int = Field(
        default=65_536,
        ge=1024,
        description="Longer documents are cut, only where the cut cannot change the ids, before tokenizing.",
    )
    threads: int = Field(default=0, ge=0, description="Tokenizer threads; 0 = all cores.")
    verify: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Share of documents (chosen by run.seed, at least one per shard) re-tokenized by an "
        "independent implementation of the same vocabulary; any difference stops the run. 0 = off.",
    )

    @field_validator("name")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        backend = v.split(":", 1)[0]
        if ":" not in v or backend not in ("fastokens", "tiktoken", "quicktok", "hf"):
            raise ValueError(
                f"tokenizer {v!r}: expected '<backend>:<name>' with backend one of 'fastokens', 'tiktoken', "
                f"'quicktok', 'hf'"
            )
        if v == "quicktok:llama3":  # measured: not canonical (see README, Tokenizers)
            raise ValueError(
                "tokenizer 'quicktok:llama3' gives non-canonical ids (' girding' -> [120546, 983], Meta's "
                "tokenizer gives [342, 2668, 287]); use 'tiktoken:llama3' (the default)"
            )
        return v


class FilterConfig(Strict):
    min_tokens: int = Field(default=1, ge=0, description="Drop documents with fewer tokens.")
    max_tokens: int | None = Field(default=None, gt=0, description="Drop documents with more tokens.")
    exact_dedup: bool = True


class TargetConfig(Strict):
    length: int = Field(ge=16, le=16_777_216, description="Tokens per row.")
    token_budget: int | None = Field(
        default=None, gt=0, description="Stop routing documents here after this many."
    )
    weight: float = Field(
        default=1.0, gt=0, description="Share of documents routed here while budgets allow."
    )


class PackingConfig(Strict):
    strategy: Literal["greedy", "best_fit", "similarity"] = "best_fit"
    targets: list[TargetConfig] = Field(min_length=1)
    separator: str | None = Field(
        default=None,
        description="Special token placed after every document; defaults to the tokenizer's end-of-text "
        "token (<|end_of_text|> for llama3, <|endoftext|> for cl100k/o200k).",
    )
    pad_token: str | None = Field(
        default=None, description="Special token for padding; defaults to the separator."
    )
    last_row: Literal["drop", "pad"] = Field(
        default="pad", description="What happens to a final partial row."
    )
    doc_order: Literal["input", "shuffle"] = "input"
    open_bins: int = Field(default=1024, ge=1, le=65536, description="best_fit: rows kept open at once.")
    lookahead_docs: int = Field(default=16384, ge=1, description="best_fit: documents sorted together.")
    min_piece_tokens: int = Field(
        default=64,
        ge=1,
        description=(
            "Smallest piece a cut may leave (at most half a row). A document that fits in a row is cut "
            "at most once; where no cut keeps this minimum, the row ends in padding. 1: cut anywhere."
        ),
    )

    @field_validator("targets")
    @classmethod
    def _distinct_lengths(cls, v: list[TargetConfig]) -> list[TargetConfig]:
        lengths = [t.length for t in v]
        if len(set(lengths)) != len(lengths):
            raise ValueError(f"target lengths must be distinct, got {lengths}")
        return v


BoundaryColumn = Literal["cu_seqlens", "position_ids"]


class OutputConfig(Strict):
    dir: str = Field(
        default="out/longloom",
        description="Output folder, relative to the current directory. Not given: out/<config file name>; "
        "a run there never replaces the output of another config (it stops and says so).",
    )
    shard_tokens: int = Field(
        default=16_777_216, ge=1024, description="Tokens per output shard (at least one row)."
    )
    row_group_tokens: int = Field(default=4_194_304, ge=1024, description="Tokens per Parquet row group.")
    store_text: bool = Field(default=False, description="Also store each row's decoded text.")
    compression_level: int = Field(default=1, ge=1, le=22)
    boundary_columns: list[BoundaryColumn] = Field(
        default_factory=lambda: list[BoundaryColumn](["cu_seqlens"]),
        description="Document-boundary columns of packed rows: cu_seqlens (offsets where each document "
        "starts, then the row end; one int32 per document) and position_ids (one int32 per token, "
        "restarting at each document: doubles a row's size, and is derivable from cu_seqlens).",
    )
    loss_mask: Literal["all_assistant_turns", "final_answer"] = Field(
        default="all_assistant_turns",
        description="Which assistant turns of a chat sample the loss_mask column marks: all of them, or "
        "only the last one (the final answer).",
    )


class RunConfig(Strict):
    name: str = "longloom"
    seed: int = 0
    task_runner: Literal["threads", "dask"] = "threads"
    workers: int = Field(default=2, ge=1, description="Concurrent tasks (threads, or local Dask workers).")
    dask_address: str | None = Field(
        default=None, description="tcp://host:8786 of an existing Dask scheduler."
    )
    retries: int = Field(default=2, ge=0)
    retry_delay_seconds: float = Field(default=2.0, ge=0)
    select_partitions: int = Field(
        default=1,
        ge=1,
        le=65536,
        description="The select stage as this many hash-partition units plus a streaming layout pass "
        "(pipeline.corpus.partition): memory per unit stays bounded as the corpus grows; the output is "
        "byte-identical. 1: one unit over the whole corpus.",
    )


class BuildConfig(Strict):
    """The whole run. `base_dir` (where relative input paths start) is set by the loader, not in YAML."""

    run: RunConfig = Field(default_factory=RunConfig)
    sources: list[SourceConfig] = Field(min_length=1)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    diversity: DiversityConfig = Field(default_factory=DiversityConfig)
    long_dependency: LongDepConfig = Field(default_factory=LongDepConfig)
    packing: PackingConfig
    procedural: ProceduralConfig = Field(default_factory=ProceduralConfig)
    rewriter: RewriterConfig = Field(default_factory=RewriterConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    card: CardConfig = Field(default_factory=CardConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    base_dir: str = Field(default=".", description="Set by the loader: the config file's folder.")
    output_named: bool = Field(
        default=True,
        description="Set by the loader: false when neither the config nor --output named output.dir.",
    )

    @field_validator("sources")
    @classmethod
    def _distinct_sources(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be distinct, got {names}")
        return v

    @model_validator(mode="after")
    def _strategy_needs_embeddings(self) -> BuildConfig:
        if self.packing.strategy == "similarity" and not self.diversity.embedder:
            raise ValueError("packing.strategy 'similarity' needs diversity.embedder to be set")
        return self

    @model_validator(mode="after")
    def _long_dependency_sources(self) -> BuildConfig:
        ld = self.long_dependency
        unknown = sorted(set(ld.sources) - {s.name for s in self.sources})
        if unknown:
            raise ValueError(
                f"long_dependency.sources names {unknown}, which are not sources of this config "
                f"({[s.name for s in self.sources]}); fix the names or remove the entries"
            )
        if not ld.enabled and (ld.filters_any() or ld.route != "input"):
            raise ValueError(
                "long_dependency: min_score/keep_top_fraction/route need scores; set "
                "long_dependency.enabled: true (or remove them)"
            )
        return self

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def resolve(self, path: str) -> Path:
        """A local input path from the config, made absolute against the config file's folder; a
        `file://` URL is its path. URLs of stores are fetched by `pipeline.core.storage.input_path`
        (schemas import nothing of the pipeline), which the readers call."""
        head, sep, rest = path.partition("://")
        if sep and head.lower() in ("file", "local"):
            path = rest
        elif sep and head.isalnum():
            raise ValueError(f"{head}:// is a store's URL: read it through pipeline.core.storage.input_path")
        p = Path(path)
        return p if p.is_absolute() else (Path(self.base_dir) / p)


# Fields that change how a run executes but never what it writes: left out of the config hash,
# so moving a run to Dask or changing worker counts reuses completed work.
_EXECUTION_ONLY: dict[str, Any] = {
    "base_dir": True,
    "output_named": True,
    "run": {
        "task_runner",
        "workers",
        "dask_address",
        "retries",
        "retry_delay_seconds",
        "name",
        "select_partitions",
    },
    "output": {"dir"},
    "diversity": {"cache_dir", "progress"},
    "card": True,
    "publish": True,
    "rewriter": {
        "api_key",
        "api_key_env",
        "concurrency",
        "timeout_seconds",
        "max_attempts",
        "backoff_seconds",
        "backoff_max_seconds",
        "retry_after_max_seconds",
        "cache_dir",
        "contexts_per_task",
        "progress",
        "prices",
    },
    # the score cache's place and progress bars; batch size and devices change no score (equal-length
    # sequences are batched without padding), the endpoint's key and timeout none either
    "long_dependency": {
        "cache_dir": True,
        "progress": True,
        "batch_size": True,
        "backend": {"device": True, "threads": True, "api_key": True, "timeout_seconds": True},
    },
}
# Sections left out of every hash while they are off: adding one to the config (off by default) then
# changes no existing config hash, stage key or output byte.
_OPTIONAL_SECTIONS: dict[str, str] = {"long_dependency": "enabled"}


def optional_off(cfg: BuildConfig) -> dict[str, bool]:
    """The optional sections that are off, as a pydantic `exclude` (records and hashes leave them out)."""
    return {s: True for s, flag in _OPTIONAL_SECTIONS.items() if not getattr(getattr(cfg, s), flag)}


def _dump(cfg: BuildConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude={**_EXECUTION_ONLY, **optional_off(cfg)})


def config_hash(cfg: BuildConfig) -> str:
    """A stable hash of everything that determines the output bytes."""
    payload = _dump(cfg)
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def section_hash(cfg: BuildConfig, *sections: str) -> str:
    """Hash of a few config sections: lets a stage's cached work survive changes to later stages."""
    dump = _dump(cfg)
    payload = {s: dump.get(s) for s in sections if s in dump or s not in _OPTIONAL_SECTIONS}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# The sections each kind of output row depends on. Rows carry the hash of their own sections (not of the
# whole config), so changing only the procedural or rewriter settings leaves the pretraining shards
# byte-identical and a publish uploads only what changed.
PREPARE_SECTIONS = ("sources", "tokenizer", "filters", "run")  # the prepare stage's (its documents files)
# `long_dependency` counts only when enabled (its filters and routing change which documents are packed).
PRETRAINING_SECTIONS = (
    "sources",
    "tokenizer",
    "filters",
    "diversity",
    "long_dependency",
    "packing",
    "output",
    "run",
)
ROW_SECTIONS: dict[str, tuple[str, ...]] = {
    "pretraining": PRETRAINING_SECTIONS,
    "procedural": (*PRETRAINING_SECTIONS, "procedural"),
    "rewriter": (*PRETRAINING_SECTIONS, "rewriter"),
}


def _describe(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        if isinstance(got, str) and "://" in got:
            got = redact_url(got)  # a URL in an error message must not show its credentials
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field; `longloom schema` lists the fields of every section"
        lines.append(f"  - {loc}: {msg}{shown}")
    return "\n".join(lines)


def default_output_dir(config_path: str | Path) -> str:
    """Where a config that names no output.dir writes: out/<config file name without its suffix>."""
    return f"out/{Path(config_path).stem or 'longloom'}"


def parse_config(
    data: dict[str, Any],
    base_dir: str | Path = ".",
    origin: str = "<config>",
    default_output: str | None = None,
) -> BuildConfig:
    """Validate a config mapping. Without output.dir it writes to `default_output` (or out/longloom), and
    the config records that the folder was not named (see `output_named`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(data).__name__}")
    data = {**data, "base_dir": str(Path(base_dir).resolve())}
    data.pop("output_named", None)  # set here, never by the YAML
    output = data.get("output")
    if not (isinstance(output, dict) and output.get("dir")):
        data["output"] = {**(output if isinstance(output, dict) else {})}
        data["output"]["dir"] = default_output or OutputConfig.model_fields["dir"].default
        data["output_named"] = False
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, origin)) from None


def _unmasked(value: Any) -> Any:
    """A python-mode dump with every SecretStr replaced by the secret it holds (never by its mask)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _unmasked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_unmasked(v) for v in value]
    return value


def with_overrides(cfg: BuildConfig, section: str, **values: Any) -> BuildConfig:
    """A copy of `cfg` with some fields of one section replaced, validated like the YAML was.

    The copy starts from a python-mode dump with secrets unwrapped: a JSON dump masks a SecretStr as
    "**********" (and redacts URLs), and the copy would then send the mask instead of the user's key.
    """
    data = _unmasked(cfg.model_dump())
    data[section] = {**data[section], **{k: v for k, v in values.items() if v is not None}}
    new_dir = values.get("dir") if section == "output" else None
    if new_dir is not None and Path(new_dir).resolve() != Path(cfg.output.dir).resolve():
        data["output_named"] = True  # --output names the folder (making the same path absolute does not)
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, "command-line options")) from None


def load_config(path: str | Path) -> BuildConfig:
    """Read and validate a YAML config; relative input paths start at the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return parse_config(data or {}, base_dir=p.parent, origin=str(p), default_output=default_output_dir(p))
