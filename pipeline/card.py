"""The output folder's README.md: the `configs:` metadata that lets `datasets` load every config."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.parquet_io import atomic_path
from schemas.manifest import Manifest


def dataset_configs(manifest: Manifest) -> list[dict]:
    """One `configs:` entry per target length and per audit/synthesized table, in Hugging Face form."""
    configs: list[dict] = []
    for i, t in enumerate(manifest.targets):
        entry: dict = {
            "config_name": t.config_name,
            "data_files": [{"split": "train", "path": f"data/{t.config_name}/*.parquet"}],
        }
        if i == 0:
            entry["default"] = True
        configs.append(entry)
    for name, files in manifest.extra_configs.items():
        if files:
            configs.append(
                {"config_name": name, "data_files": [{"split": "train", "path": f"data/{name}/*.parquet"}]}
            )
    for name, files in manifest.audit.items():
        if files:
            configs.append(
                {
                    "config_name": f"audit_{name}",
                    "data_files": [{"split": "train", "path": f"audit/{name}/*.parquet"}],
                }
            )
    return configs


def write_readme(out: Path, manifest: Manifest) -> None:
    meta = yaml.safe_dump({"configs": dataset_configs(manifest)}, sort_keys=False)
    lines = [
        f"---\n{meta}---",
        "",
        f"# {manifest.config.get('run', {}).get('name', 'longloom')} (Longloom output)",
        "",
    ]
    lines.append(
        f"Built by Longloom {manifest.longloom_version}, config hash `{manifest.config_hash}`, "
        f"tokenizer `{manifest.tokenizer.name}` (vocab `{manifest.tokenizer.vocab_hash}`)."
    )
    lines.append("")
    for t in manifest.targets:
        lines.append(f"- `{t.config_name}`: {t.rows} rows of {t.target_length} tokens ({t.strategy})")
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
