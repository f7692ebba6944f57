"""The card's YAML metadata: configs, features, licence roll-up, size, tasks, tags and languages.

Everything is derived from the manifest and the Parquet files, in the form `datasets` and the hub
read: `configs:` (one per target length, synthesized set and audit table) and `dataset_info:`
(features from the Arrow schemas, rows per split from the Parquet footers).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import DatasetCardData

from pipeline.output.card.stats import CardStats, table_tag
from schemas.manifest import FileEntry, Manifest
from schemas.publish import CardConfig
from schemas.records import (
    CHAT_SCHEMA,
    EVAL_SCHEMA,
    FILTERED_SCHEMA,
    PRUNED_SCHEMA,
    QUARANTINE_SCHEMA,
    REWRITER_AUDIT_SCHEMA,
    row_schema,
)

# Tables with a definition in schemas/records.py, by the `longloom.table` tag they carry.
KNOWN_SCHEMAS: dict[str, pa.Schema] = {
    (s.metadata or {})[b"longloom.table"].decode(): s
    for s in (
        CHAT_SCHEMA,
        EVAL_SCHEMA,
        FILTERED_SCHEMA,
        PRUNED_SCHEMA,
        QUARANTINE_SCHEMA,
        REWRITER_AUDIT_SCHEMA,
    )
}

# Licence identifiers the Hugging Face hub accepts in `license:`; anything else becomes `other`.
HF_LICENSES = frozenset(
    [
        "apache-2.0",
        "mit",
        "openrail",
        "bigscience-openrail-m",
        "creativeml-openrail-m",
        "bigscience-bloom-rail-1.0",
        "bigcode-openrail-m",
        "afl-3.0",
        "artistic-2.0",
        "bsl-1.0",
        "bsd",
        "bsd-2-clause",
        "bsd-3-clause",
        "bsd-3-clause-clear",
        "c-uda",
        "cc",
        "cc0-1.0",
        "cc-by-2.0",
        "cc-by-2.5",
        "cc-by-3.0",
        "cc-by-4.0",
        "cc-by-sa-3.0",
        "cc-by-sa-4.0",
        "cc-by-nc-2.0",
        "cc-by-nc-3.0",
        "cc-by-nc-4.0",
        "cc-by-nd-4.0",
        "cc-by-nc-nd-3.0",
        "cc-by-nc-nd-4.0",
        "cc-by-nc-sa-2.0",
        "cc-by-nc-sa-3.0",
        "cc-by-nc-sa-4.0",
        "cdla-sharing-1.0",
        "cdla-permissive-1.0",
        "cdla-permissive-2.0",
        "wtfpl",
        "ecl-2.0",
        "epl-1.0",
        "epl-2.0",
        "etalab-2.0",
        "eupl-1.1",
        "eupl-1.2",
        "agpl-3.0",
        "gfdl",
        "gpl",
        "gpl-2.0",
        "gpl-3.0",
        "lgpl",
        "lgpl-2.1",
        "lgpl-3.0",
        "isc",
        "h-research",
        "intel-research",
        "lppl-1.3c",
        "ms-pl",
        "apple-ascl",
        "apple-amlr",
        "mpl-2.0",
        "odc-by",
        "odbl",
        "openrail++",
        "osl-3.0",
        "postgresql",
        "ofl-1.1",
        "ncsa",
        "unlicense",
        "zlib",
        "pddl",
        "lgpl-lr",
        "deepfloyd-if-license",
        "llama2",
        "llama3",
        "llama3.1",
        "llama3.2",
        "llama3.3",
        "llama4",
        "gemma",
        "unknown",
        "other",
    ]
)

SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
]


@dataclass
class ConfigFiles:
    """One `configs:` entry: its name, folder and files, and what kind of table it is."""

    name: str
    folder: str
    kind: str  # "pretrain", "chat", "eval", "table" or "audit"
    files: list[FileEntry]
    default: bool = False


@dataclass
class LicenceShare:
    licence: str
    sources: list[str] = field(default_factory=list)
    tokens: int = 0  # document tokens of these sources in the pretraining rows


def config_files(
    manifest: Manifest, stats: CardStats | None = None, include_audit: bool = True
) -> list[ConfigFiles]:
    """Every loadable config of the run, in card order.

    Tables without rows are left out: `datasets` cannot load an empty split ("corresponds to no
    data"), so listing one would break `load_dataset` for that config. `empty_tables` names them.
    Without `include_audit` (`publish.include_audit: false`) the audit tables are not configs: they
    are not uploaded, and a card listing them would point `datasets` at files the repo lacks.
    """
    kinds = {c.config_name: "chat" for c in stats.chat} if stats else {}
    kinds |= {e.config_name: "eval" for e in stats.evals} if stats else {}
    out = [
        c
        for c in _all_configs(manifest, kinds)
        if sum(e.rows for e in c.files) > 0 and (include_audit or c.kind != "audit")
    ]
    if out:
        out[0].default = True
    return out


def empty_tables(manifest: Manifest) -> list[str]:
    """Configs the run wrote files for that hold no rows (not listed under `configs:`)."""
    return [c.name for c in _all_configs(manifest, {}) if sum(e.rows for e in c.files) == 0]


def _all_configs(manifest: Manifest, kinds: dict[str, str]) -> list[ConfigFiles]:
    out: list[ConfigFiles] = []
    for t in manifest.targets:
        if t.shards:
            out.append(ConfigFiles(t.config_name, f"data/{t.config_name}", "pretrain", list(t.shards)))
    for name, files in manifest.extra_configs.items():
        if files:
            out.append(ConfigFiles(name, f"data/{name}", kinds.get(name, "table"), files))
    for name, files in manifest.audit.items():
        if files:
            out.append(ConfigFiles(f"audit_{name}", f"audit/{name}", "audit", files))
    return out


def include_audit_of(manifest: Manifest) -> bool:
    """`publish.include_audit` of the run's config (True when unset)."""
    return bool((manifest.config.get("publish") or {}).get("include_audit", True))


def dataset_configs(manifest: Manifest, include_audit: bool = True) -> list[dict[str, Any]]:
    """The `configs:` list: one entry per target length, synthesized set and (unless left out) audit table."""
    return [_config_entry(c) for c in config_files(manifest, include_audit=include_audit)]


def _config_entry(c: ConfigFiles) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "config_name": c.name,
        "data_files": [{"split": "train", "path": f"{c.folder}/*.parquet"}],
    }
    if c.default:
        entry["default"] = True
    return entry


def known_schema(tag: str | None, schema: pa.Schema) -> pa.Schema | None:
    """The schemas/records.py definition a table's `longloom.table` tag names, if any."""
    if tag in ("pretrain@1", "pretrain@2"):
        return row_schema(
            "text" in schema.names, [n for n in ("cu_seqlens", "position_ids") if n in schema.names]
        )
    return KNOWN_SCHEMAS.get(tag or "")


@dataclass
class SchemaCheck:
    config: str
    table: str | None
    ok: bool
    detail: str


def schema_check(out: Path, c: ConfigFiles) -> SchemaCheck:
    """Do the config's files all have one schema, and is it the one schemas/records.py defines?"""
    first = pq.read_schema(out / c.files[0].path)
    tag = table_tag(out / c.files[0].path)
    for e in c.files[1:]:
        other = pq.read_schema(out / e.path)
        if not other.remove_metadata().equals(first.remove_metadata()):
            return SchemaCheck(c.name, tag, False, f"{e.path} has another schema than {c.files[0].path}")
    expected = known_schema(tag, first)
    if expected is None:
        return SchemaCheck(c.name, tag, True, "schema read from the Parquet files")
    ok = expected.remove_metadata().equals(first.remove_metadata())
    detail = f"matches schemas/records.py ({tag})" if ok else f"differs from schemas/records.py ({tag})"
    return SchemaCheck(c.name, tag, ok, detail)


def _batches(paths: list[Path]) -> Iterator[pa.Table]:
    """The files' rows as `datasets` reads them back: one table per row-group-sized batch, in order."""
    import pyarrow.dataset as pds

    fmt = pds.ParquetFileFormat()
    for path in paths:
        with open(path, "rb") as f:
            fragment = fmt.make_fragment(f)
            if not fragment.row_groups:
                continue
            batches = fragment.to_batches(
                batch_size=fragment.row_groups[0].num_rows, batch_readahead=0, fragment_readahead=0
            )
            for batch in batches:
                yield pa.Table.from_batches([batch])


def datasets_num_bytes(paths: list[Path], features: Any) -> int:
    """The split's `num_bytes` as `datasets` records it when it loads these Parquet files.

    `datasets` does not use Parquet sizes: it reads each file in batches of the first row group's
    row count, casts every batch to the features, and counts the Arrow bytes its writer receives
    (single-row batches are first pooled and concatenated). We replay exactly that through its own
    `ArrowWriter` on a byte-counting null stream, so the figure is the one a `load_dataset` of the
    output records, whatever the row-group layout. It reads every column once (a batch at a time).
    The reference for `arrow_num_bytes`, which finalize uses where it can.
    """
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import table_cast

    writer = ArrowWriter(features=features, stream=pa.MockOutputStream())
    for batch in _batches(paths):
        table = table_cast(batch, features.arrow_schema)
        if len(table) == 1:
            writer.write_row(table)
        else:
            writer.write_table(table)
    _, num_bytes = writer.finalize()
    return int(num_bytes)


# `datasets`' writer pools single-row tables and writes them this many at a time (its
# config.DEFAULT_MAX_BATCH_SIZE, the ArrowWriter default)
_DATASETS_ROW_POOL = 1000


def arrow_num_bytes(paths: list[Path]) -> int:
    """`datasets_num_bytes` without `datasets` (whose import costs seconds and ~60 MB in finalize): the
    same batches, pooled the same way, counted by Arrow's `nbytes`. Only for schemas `datasets_features`
    describes, whose cast to the features renames list items at most and leaves the buffers alone (the
    tests compare both on every schema Longloom writes, with nulls and single-row row groups)."""
    total = 0
    pool: list[pa.Table] = []

    def flush() -> None:
        nonlocal total
        if pool:
            total += pa.concat_tables(pool).combine_chunks().nbytes
            pool.clear()

    for table in _batches(paths):
        if len(table) == 1:
            pool.append(table)
            if len(pool) >= _DATASETS_ROW_POOL:
                flush()
        else:
            flush()
            total += table.combine_chunks().nbytes
    flush()
    return total


_YAML_DTYPES = {
    pa.bool_(): "bool",
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.uint8(): "uint8",
    pa.uint16(): "uint16",
    pa.uint32(): "uint32",
    pa.uint64(): "uint64",
    pa.float16(): "float16",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.binary(): "binary",
    pa.large_binary(): "large_binary",
}


def _yaml_feature(t: pa.DataType) -> dict[str, Any] | None:
    """One feature as `datasets` writes it in `dataset_info` YAML (`Features._to_yaml_list`), or None
    for a type outside the plain ones handled here (then `datasets` itself describes it)."""
    if t in _YAML_DTYPES:
        return {"dtype": _YAML_DTYPES[t]}
    if pa.types.is_struct(t):
        fields = [_yaml_field(t.field(i)) for i in range(t.num_fields)]
        return None if any(f is None for f in fields) else {"struct": fields}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _yaml_feature(t.value_type)
        if inner is None:
            return None
        key = "list" if pa.types.is_list(t) else "large_list"
        # datasets shortens `{dtype: x}` to `x` and `{struct: [...]}` to `[...]` under a list
        if list(inner) == ["dtype"] and not isinstance(inner["dtype"], dict):
            return {key: inner["dtype"]}
        if list(inner) == ["struct"]:
            return {key: inner["struct"]}
        return {key: inner}
    return None


def _yaml_field(f: pa.Field) -> dict[str, Any] | None:
    inner = _yaml_feature(f.type)
    return None if inner is None else {"name": f.name, **inner}


def datasets_features(schema: pa.Schema) -> list[dict[str, Any]] | None:
    """`Features.from_arrow_schema(schema)._to_yaml_list()` for the plain types Longloom writes, without
    importing `datasets`; None where `datasets` must say it (other types, or features in the metadata)."""
    if schema.metadata and b"huggingface" in schema.metadata:
        return None
    fields = [_yaml_field(f) for f in schema]
    return None if any(f is None for f in fields) else fields  # type: ignore[return-value]


def dataset_info(out: Path, c: ConfigFiles) -> dict[str, Any]:
    """One `dataset_info:` entry, as `datasets` would record it: features, split sizes, bytes."""
    schema = pq.read_schema(out / c.files[0].path)
    rows = sum(pq.ParquetFile(out / e.path).metadata.num_rows for e in c.files)
    paths = [out / e.path for e in c.files]
    features = datasets_features(schema)
    if features is not None:
        num_bytes = arrow_num_bytes(paths)
        # DatasetInfo._to_yaml_dict: its fields in declaration order, the split without shard lengths
        return {
            "features": features,
            "config_name": c.name,
            "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": rows}],
            "download_size": sum(e.bytes for e in c.files),
            "dataset_size": num_bytes,
        }
    return datasets_dataset_info(out, c)


def datasets_dataset_info(out: Path, c: ConfigFiles) -> dict[str, Any]:
    """`dataset_info` computed by `datasets` itself (any schema; the reference for the fast path)."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo

    features = Features.from_arrow_schema(pq.read_schema(out / c.files[0].path))
    rows = sum(pq.ParquetFile(out / e.path).metadata.num_rows for e in c.files)
    num_bytes = datasets_num_bytes([out / e.path for e in c.files], features)
    splits = SplitDict()
    splits.add(SplitInfo(name="train", num_bytes=num_bytes, num_examples=rows))
    info = DatasetInfo(
        features=features,
        splits=splits,
        download_size=sum(e.bytes for e in c.files),
        dataset_size=num_bytes,
        config_name=c.name,
    )
    return info._to_yaml_dict()


def licence_shares(manifest: Manifest, stats: CardStats) -> list[LicenceShare]:
    """Sources grouped by their configured licence, with their tokens in the rows."""
    tokens = stats.source_tokens()
    shares: dict[str, LicenceShare] = {}
    for s in manifest.config.get("sources", []):
        lic = (s.get("license") or "unknown").strip().lower()
        share = shares.setdefault(lic, LicenceShare(lic))
        share.sources.append(s["name"])
        share.tokens += tokens.get(s["name"], 0)
    return sorted(shares.values(), key=lambda x: (-x.tokens, x.licence))


def licence_metadata(shares: list[LicenceShare]) -> dict[str, Any]:
    """`license:` (and `license_name:` when some licence is not a hub identifier)."""
    ids = sorted({s.licence for s in shares})
    known = [i for i in ids if i in HF_LICENSES]
    unknown = [i for i in ids if i not in HF_LICENSES]
    meta: dict[str, Any] = {}
    if unknown:
        known.append("other")
        meta["license_name"] = "-and-".join(unknown)
        meta["license_link"] = "README.md#licences"
    meta = {"license": known[0] if len(known) == 1 else known, **meta}
    return meta


def size_category(n: int) -> str:
    for limit, label in SIZE_CATEGORIES:
        if n < limit:
            return label
    return "n>1T"


def card_metadata(
    out: Path, manifest: Manifest, stats: CardStats, card: CardConfig, configs: list[ConfigFiles]
) -> DatasetCardData:
    """The YAML front matter, built with huggingface_hub's `DatasetCardData` (the hub's own model)."""
    examples = (
        sum(p.rows for p in stats.pretrain)
        + sum(c.rows for c in stats.chat)
        + sum(e.rows for e in stats.evals)
    )
    sources = manifest.config.get("sources", [])
    languages = sorted({s["language"] for s in sources if s.get("language")})
    tags = ["long-context", "longloom", "pretraining", "packed", "tokenized"]
    if stats.chat:
        tags.append("synthetic")
    tags += [t for t in card.tags if t not in tags]
    tasks = ["text-generation"] + (["question-answering"] if stats.chat else [])
    base = Path(str(manifest.config.get("base_dir") or "."))
    hub_sources = sorted(
        {
            s["dataset"]
            for s in sources
            if s.get("kind") == "hf" and is_hub_id(s.get("dataset")) and not (base / s["dataset"]).exists()
        }
    )
    return DatasetCardData(
        pretty_name=pretty_name(manifest, card),
        **licence_metadata(licence_shares(manifest, stats)),
        language=languages or None,
        size_categories=[size_category(examples)],
        task_categories=tasks,
        source_datasets=hub_sources or None,
        tags=tags,
        configs=[_config_entry(c) for c in configs],
        dataset_info=[dataset_info(out, c) for c in configs],
    )


def is_hub_id(dataset: str | None) -> bool:
    """An `hf` source's `dataset` that names a hub repo (ORG/NAME), not a local folder."""
    if not dataset or dataset.startswith((".", "/", "~")) or dataset.count("/") != 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(dataset)
    except HFValidationError:
        return False
    return True


def pretty_name(manifest: Manifest, card: CardConfig) -> str:
    return card.pretty_name or str(manifest.config.get("run", {}).get("name") or "longloom")
