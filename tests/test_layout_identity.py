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

# Recorded from main's code (commit 0659666, before merging it into the refactor), see the module docstring;
# first recorded at 128c71a with quicktok:llama3, which main now refuses in configs. Re-recorded for
# issue 17: rows gained `cu_seqlens` (pretrain) and `loss_mask` (chat), the config hash in lineage
# changed with the new output fields, and the card documents them and gives the supervised-token
# share per task; no other column changed.
EXPECTED: dict[str, str] = {
    "data/pretrain_16384/train-00000-of-00001.parquet": "8f8b5034c0cbddb632001d6c30960bf091ea2bcfd9083a27e76aee92b865f440",
    "data/pretrain_65536/train-00000-of-00001.parquet": "06b470a0e6ca72e6cd5e216101faa9b01731d9390376e9882112376a81ba8218",
    "data/procedural/train-00000-of-00001.parquet": "f1bdbaf3922dfae8ccb46fba6c1f625da4558959ba67626772ddc19cc3255e5e",
    "data/procedural_eval/train-00000-of-00001.parquet": "efafcb4908d855e6d663f366788570aa1863e21e60650d9e7f78fb37e6ed77da",
    "audit/filtered/filtered-00000-of-00001.parquet": "8606c3fe129363f8d90ad14c43a403b928cd52b894dc843b853c6d6ce9927d31",
    "audit/quarantine/quarantine-00000-of-00001.parquet": "5f7796767bc71e18037544e58146c111379ba4c76441cefd0acda016bb117e29",
    "manifest.json": "3b48f6b6192f0a24b6c811728c396ea70a7092db247a307c37d464e671ce4b84",
    "README.md": "ab2c997f2adb388efba4ec31f6e7403719ebaf6e256043c78782a081e91e5f69",
}


PINNED_COMMAND = "longloom build pinned.yaml --output out"


def pinned_config_dict(out: Path) -> dict[str, Any]:
    """The bundled sample, with the parts a refactor must not silently change written out."""
    data: dict[str, Any] = yaml.safe_load((DATA / "sample.yaml").read_text(encoding="utf-8"))
    data["tokenizer"] = {"name": "fastokens:llama3"}
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
