"""Byte identity across refactors: a pinned build must produce exactly the recorded bytes.

The layout and stage-protocol refactor (issue 13) must change no behaviour. This test builds a
pinned config in-process (`pipeline.build.run_build`, no Prefect) and compares the sha256 of every
output shard, every audit table, the manifest and the dataset card with values recorded from the
code before the refactor. The run is given a fixed command line, so no byte names the temporary
output folder, and nothing is normalised before hashing.

Re-record (only when behaviour is meant to change, and say why in the commit):
    python tests/test_layout_identity.py OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"

# Recorded from the code at the start of issue 13 (commit 128c71a), see the module docstring.
EXPECTED: dict[str, str] = {
    "data/pretrain_16384/train-00000-of-00001.parquet": "5269f49a73ae462a6dbb69bee33682f9c7122726abf131c1c32e38475a277c37",
    "data/pretrain_65536/train-00000-of-00001.parquet": "555a0c10461d1be8bff92faffe95e36475ea44bea2ffe531029ad21958679e6b",
    "data/procedural/train-00000-of-00001.parquet": "0b7a289049ce49946e6de21e16ed29a930329e2762ed4a059604e1ae926867d5",
    "data/procedural_eval/train-00000-of-00001.parquet": "a0ace57ede9ea9ef2d8021b62a82a5c76a4027894fb5cb76b7f58a60e28baded",
    "audit/filtered/filtered-00000-of-00001.parquet": "8606c3fe129363f8d90ad14c43a403b928cd52b894dc843b853c6d6ce9927d31",
    "audit/quarantine/quarantine-00000-of-00001.parquet": "5f7796767bc71e18037544e58146c111379ba4c76441cefd0acda016bb117e29",
    "manifest.json": "889eef6240c07033663080f45f53a759f54a989b20bdd1485d2f63a602efe5d0",
    "README.md": "51678185b90c3384c2e73f403103700e519425375dd11af9871d55daeef1544b",
}


PINNED_COMMAND = "longloom build pinned.yaml --output out"


def pinned_config_dict(out: Path) -> dict[str, Any]:
    """The bundled sample, with the parts a refactor must not silently change written out."""
    data: dict[str, Any] = yaml.safe_load((DATA / "sample.yaml").read_text(encoding="utf-8"))
    data["tokenizer"] = {"name": "quicktok:llama3"}
    data["packing"] = {**data["packing"], "separator": "<|end_of_text|>"}
    data["output"] = {**data.get("output", {}), "dir": str(out)}
    return data


def build_digests(out: Path) -> dict[str, str]:
    """Build the pinned config into `out` and return {relative path: sha256} of what must not change."""
    from pipeline.build import run_build
    from schemas.config import parse_config

    run_build(parse_config(pinned_config_dict(out), base_dir=DATA), command=PINNED_COMMAND)
    return output_digests(out)


def output_digests(out: Path) -> dict[str, str]:
    digests: dict[str, str] = {}
    files = sorted((out / "data").rglob("*.parquet")) + sorted((out / "audit").rglob("*.parquet"))
    for f in files:
        digests[f.relative_to(out).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    for name in ("manifest.json", "README.md"):
        digests[name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    return digests


def test_pinned_build_is_byte_identical(tmp_path: Path) -> None:
    got = build_digests(tmp_path / "out")
    assert set(got) == set(EXPECTED), f"output files changed: {sorted(set(got) ^ set(EXPECTED))}"
    changed = {k: got[k] for k in EXPECTED if got[k] != EXPECTED[k]}
    assert not changed, f"bytes changed: {changed}"


if __name__ == "__main__":
    print(json.dumps(build_digests(Path(sys.argv[1])), indent=4))
