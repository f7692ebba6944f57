"""The card's YAML metadata: configs, features, licence roll-up, size, tasks, tags and languages.

Everything is derived from the manifest and the Parquet files, in the form `datasets` and the hub
read: `configs:` (one per target length, synthesized set and audit table) and `dataset_info:`
(features from the Arrow schemas, rows per split from the Parquet footers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.card.stats import CardStats, table_tag
from schemas.manifest import FileEntry, Manifest
from schemas.publish import CardConfig
from schemas.records import CHAT_SCHEMA, FILTERED_SCHEMA, QUARANTINE_SCHEMA, row_schema

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
    kind: str  # "pretrain", "chat", "table" or "audit"
    files: list[FileEntry]
    default: bool = False


@dataclass
class LicenceShare:
    licence: str
    sources: list[str] = field(default_factory=list)
    tokens: int = 0  # document tokens of these sources in the pretraining rows


def config_files(manifest: Manifest, stats: CardStats | None = None) -> list[ConfigFiles]:
    """Every loadable config of the run, in card order.

    Tables without rows are left out: `datasets` cannot load an empty split ("corresponds to no
    data"), so listing one would break `load_dataset` for that config. `empty_tables` names them.
    """
    chat = {c.config_name for c in stats.chat} if stats else set()
    out = [c for c in _all_configs(manifest, chat) if sum(e.rows for e in c.files) > 0]
    if out:
        out[0].default = True
    return out


def empty_tables(manifest: Manifest) -> list[str]:
    """Configs the run wrote files for that hold no rows (not listed under `configs:`)."""
    return [c.name for c in _all_configs(manifest, set()) if sum(e.rows for e in c.files) == 0]


def _all_configs(manifest: Manifest, chat: set[str]) -> list[ConfigFiles]:
    out: list[ConfigFiles] = []
    for t in manifest.targets:
        if t.shards:
            out.append(ConfigFiles(t.config_name, f"data/{t.config_name}", "pretrain", list(t.shards)))
    for name, files in manifest.extra_configs.items():
        if files:
            out.append(ConfigFiles(name, f"data/{name}", "chat" if name in chat else "table", files))
    for name, files in manifest.audit.items():
        if files:
            out.append(ConfigFiles(f"audit_{name}", f"audit/{name}", "audit", files))
    return out


def dataset_configs(manifest: Manifest) -> list[dict[str, Any]]:
    """The `configs:` list: one entry per target length, synthesized set and audit table."""
    entries = []
    for c in config_files(manifest):
        entry: dict[str, Any] = {
            "config_name": c.name,
            "data_files": [{"split": "train", "path": f"{c.folder}/*.parquet"}],
        }
        if c.default:
            entry["default"] = True
        entries.append(entry)
    return entries


def known_schema(tag: str | None, schema: pa.Schema) -> pa.Schema | None:
    """The schemas/records.py definition a table's `longloom.table` tag names, if any."""
    if tag == "pretrain@1":
        return row_schema("text" in schema.names)
    return {"chat@1": CHAT_SCHEMA, "filtered@1": FILTERED_SCHEMA, "quarantine@1": QUARANTINE_SCHEMA}.get(
        tag or ""
    )


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


def dataset_info(out: Path, c: ConfigFiles) -> dict[str, Any]:
    """One `dataset_info:` entry, in the form `datasets` writes: features, split sizes, bytes."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo

    schema = pq.read_schema(out / c.files[0].path)
    rows = num_bytes = 0
    for e in c.files:
        meta = pq.ParquetFile(out / e.path).metadata
        rows += meta.num_rows
        num_bytes += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    splits = SplitDict()
    splits.add(SplitInfo(name="train", num_bytes=num_bytes, num_examples=rows))
    info = DatasetInfo(
        features=Features.from_arrow_schema(schema),
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


def card_metadata(out: Path, manifest: Manifest, stats: CardStats, card: CardConfig) -> dict[str, Any]:
    """The YAML front matter, in the order the hub shows it."""
    configs = config_files(manifest, stats)
    examples = sum(p.rows for p in stats.pretrain) + sum(c.rows for c in stats.chat)
    languages = sorted({s["language"] for s in manifest.config.get("sources", []) if s.get("language")})
    tags = ["long-context", "longloom", "pretraining", "packed", "tokenized"]
    if stats.chat:
        tags.append("synthetic")
    tags += [t for t in card.tags if t not in tags]
    tasks = ["text-generation"] + (["question-answering"] if stats.chat else [])
    meta: dict[str, Any] = {"pretty_name": pretty_name(manifest, card)}
    meta.update(licence_metadata(licence_shares(manifest, stats)))
    if languages:
        meta["language"] = languages
    meta["size_categories"] = [size_category(examples)]
    meta["task_categories"] = tasks
    meta["tags"] = tags
    meta["configs"] = dataset_configs(manifest)
    meta["dataset_info"] = [dataset_info(out, c) for c in configs]
    return meta


def pretty_name(manifest: Manifest, card: CardConfig) -> str:
    return card.pretty_name or str(manifest.config.get("run", {}).get("name") or "longloom")
