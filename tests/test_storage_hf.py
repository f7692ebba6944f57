"""Sources on the Hugging Face hub as `hf://datasets/...` URLs (issue 14.1), against the hub stand-in.

`tests/hub_server.py` serves the endpoints `huggingface_hub`'s filesystem reads (repo info, tree
listing, paths-info, `resolve/` downloads), so the build reads the sample's files through
`HfFileSystem` exactly as it would from huggingface.co, with `HF_ENDPOINT` pointing at the stand-in.
The reference is the same config with the same files as local paths: the rows must hold the same
tokens, and the manifest the same input revisions (content hashes), byte counts and record counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.conftest import DATA, sample_dict
from tests.hub_server import HubServer, regular
from tests.opskit import SMALL_OUTPUT, base_env, run_cli, save_config
from tests.s3kit import SOURCES

REPO = "longloom-test/corpus"


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    """A public dataset repo holding the sample's sources (no code source) under src/<source>/."""
    with HubServer(token="hf_unused") as server:
        server.create("dataset", REPO, private=False)
        repo = server.repos[("dataset", REPO)]
        tree = dict(repo.trees[repo.branches["main"]])
        for name, pattern in SOURCES.items():
            for p in sorted(DATA.glob(pattern)):
                tree[f"src/{name}/{p.name}"] = regular(p.read_bytes())
        server._commit(repo, "main", tree, "add the sample")
        yield server


def config(folder: Path, paths: dict[str, str]) -> Path:
    """The sample config (no code source, one target, small shards) with each source's one pattern."""
    cfg = sample_dict()
    cfg["sources"] = [s for s in cfg["sources"] if s["name"] in SOURCES]
    for s in cfg["sources"]:
        s["paths"] = [paths[s["name"]]]
    cfg["packing"]["targets"] = [{"length": 16384, "weight": 1.0}]
    cfg["procedural"]["target_lengths"] = [16384]
    cfg["output"] = {**cfg["output"], **SMALL_OUTPUT, "dir": str(folder / "out")}
    return save_config(folder, cfg, {})


def env(hub: HubServer, folder: Path) -> dict[str, str]:
    """A process with its own HOME, TMPDIR (input cache) and HF_HOME, reading the hub stand-in."""
    for d in ("home", "tmp", "hf"):
        (folder / d).mkdir(parents=True, exist_ok=True)
    return base_env(
        HF_ENDPOINT=hub.url,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(folder / "hf"),
        HOME=str(folder / "home"),
        TMPDIR=str(folder / "tmp"),
    )


def rows(out: Path) -> list[list[int]]:
    """Every packed row's token ids, in the manifest's shard order."""
    ids: list[list[int]] = []
    for target in json.loads((out / "manifest.json").read_text())["targets"]:
        for shard in target["shards"]:
            ids += pq.read_table(out / shard["path"], columns=["input_ids"]).column("input_ids").to_pylist()
    return ids


def inputs(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "manifest.json").read_text())["inputs"]


def test_sources_on_the_hub_build_the_same_rows_as_local_files(hub: HubServer, tmp_path: Path) -> None:
    on_hub = {name: f"hf://datasets/{REPO}/src/{name}/{Path(p).name}" for name, p in SOURCES.items()}
    local = {name: str(DATA / p) for name, p in SOURCES.items()}
    r = run_cli(
        ["build", str(config(tmp_path / "hub", on_hub)), "--no-prefect"], env=env(hub, tmp_path / "hub")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(
        ["build", str(config(tmp_path / "local", local)), "--no-prefect"], env=env(hub, tmp_path / "local")
    )
    assert r.returncode == 0, r.stderr[-3000:]

    got, want = tmp_path / "hub" / "out", tmp_path / "local" / "out"
    assert rows(got) and rows(got) == rows(want)
    hub_inputs, local_inputs = inputs(got), inputs(want)
    assert len(hub_inputs) == len(local_inputs) == sum(len(list(DATA.glob(p))) for p in SOURCES.values())
    for h, loc in zip(hub_inputs, local_inputs, strict=True):
        assert h["uri"] == f"hf://datasets/{REPO}/src/{h['source']}/{Path(loc['uri']).name}"
        assert (h["revision"], h["bytes"], h["records"]) == (loc["revision"], loc["bytes"], loc["records"])
    # every input file was downloaded from the stand-in (resolve/), none of them from anywhere else
    downloaded = {r.path.split("/resolve/main/", 1)[1] for r in hub.requests if "/resolve/main/" in r.path}
    assert downloaded == {f"src/{h['source']}/{Path(h['uri']).name}" for h in hub_inputs}


def test_a_missing_hub_repository_fails_in_preflight(hub: HubServer, tmp_path: Path) -> None:
    paths = {name: f"hf://datasets/{REPO}/src/{name}/{Path(p).name}" for name, p in SOURCES.items()}
    paths["books"] = "hf://datasets/longloom-test/no-such-corpus/src/*.jsonl.zst"
    r = run_cli(["build", str(config(tmp_path, paths)), "--no-prefect"], env=env(hub, tmp_path))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert "hf://datasets/longloom-test/no-such-corpus" in errors[0]
    assert "does not exist" in errors[0]
    assert not (tmp_path / "out" / "data").exists()  # no work was done
