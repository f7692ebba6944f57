"""`longloom export`: Megatron `.bin/.idx` written by megatron-core's builder, read back by its
`IndexedDataset`, with the lineage sidecar, document boundaries, and an all-or-nothing destination;
MosaicML MDS shards written by mosaicml-streaming's `MDSWriter` in another Python (it cannot be
installed beside Longloom) and read back there by its `StreamingDataset`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.build import run_build
from pipeline.output.export import MARKER, ExportError, export, is_export
from schemas.manifest import Manifest
from tests.conftest import ROOT, make_config

with warnings.catch_warnings():  # megatron-core warns that Transformer Engine and Apex are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    """The bundled sample with procedural samples, in several shards of several row groups each."""
    out = tmp_path_factory.mktemp("export") / "out"
    cfg = make_config(
        out,
        output={"dir": str(out), "shard_tokens": 131_072, "row_group_tokens": 32_768, "store_text": True},
    )
    return run_build(cfg), out


def parquet_rows(out: Path, files: list[str]) -> list[dict[str, Any]]:
    """Every row of a config's shards in order, with where it came from (read independently of the export)."""
    rows = []
    for rel in files:
        for k, row in enumerate(pq.read_table(out / rel).to_pylist()):
            rows.append({**row, "_file": rel, "_row": k})
    return rows


def config_files(manifest: Manifest) -> dict[str, list[str]]:
    files = {t.config_name: [e.path for e in t.shards] for t in manifest.targets}
    files.update({k: [e.path for e in v] for k, v in manifest.extra_configs.items()})
    return files


def test_megatron_round_trip_ids_and_lineage(built: tuple[Manifest, Path], tmp_path: Path) -> None:
    manifest, out = built
    files = config_files(manifest)
    assert any(len(f) > 1 for f in files.values())  # the export must walk several shards ...
    assert pq.ParquetFile(out / files["pretrain_16384"][0]).num_row_groups > 1  # ... and row groups
    dest = tmp_path / "megatron"
    res = export(out, dest, "megatron")
    exported = {c.name for c in res.configs}
    # every config with token ids; the evaluation table has none
    assert exported == {"pretrain_16384", "pretrain_65536", "procedural"}
    meta = json.loads((dest / MARKER).read_text())
    for name in exported:
        rows = parquet_rows(out, files[name])
        ds = IndexedDataset(str(dest / name / "tokens"))
        assert len(ds) == len(rows) > 0
        # one row = one sequence = one document, in the Parquet order
        assert ds.document_indices.tolist() == list(range(len(rows) + 1))
        for i, row in enumerate(rows):
            got = ds[i]
            assert got.tolist() == row["input_ids"], f"{name} sequence {i}"
        side = pq.read_table(dest / name / "lineage.parquet").to_pylist()
        assert [s["index"] for s in side] == list(range(len(rows)))
        key = "row_id" if name.startswith("pretrain") else "sample_id"
        for s, row in zip(side, rows, strict=True):
            assert (s["source_file"], s["source_row"]) == (row["_file"], row["_row"])
            assert s[key] == row[key]
            assert s["lineage"] == row["lineage"]
            if "segments" in row:
                assert s["segments"] == row["segments"]
            assert "input_ids" not in s and "text" not in s
        entry = next(c for c in meta["configs"] if c["name"] == name)
        assert entry["rows"] == len(rows)
        assert entry["tokens"] == sum(len(r["input_ids"]) for r in rows) == int(ds.sequence_lengths.sum())
        assert [f["path"] for f in entry["sources"]] == files[name]


def reference_boundaries(row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """cu_seqlens and position_ids walked token by token: a token starts a new sequence when the
    document that owns it (separator included; padding and uncovered tokens own themselves) changes."""
    owner: dict[int, int] = {}
    for k, seg in enumerate(row["segments"]):
        end = seg["row_token_end"] + (1 if seg["separator_after"] else 0)
        for t in range(seg["row_token_start"], end):
            owner[t] = k
    cu: list[int] = []
    pos: list[int] = []
    prev: object = object()
    for t in range(row["length"]):
        who = owner.get(t, "none")
        if who != prev:
            cu.append(t)
            prev = who
        pos.append(t - cu[-1])
    return [*cu, row["length"]], pos


def test_boundaries_agree_with_segments(built: tuple[Manifest, Path], tmp_path: Path) -> None:
    manifest, out = built
    files = config_files(manifest)
    dest = tmp_path / "b"
    export(out, dest, "megatron", configs=["pretrain_16384", "procedural"], with_boundaries=True)
    rows = parquet_rows(out, files["pretrain_16384"])
    side = pq.read_table(dest / "pretrain_16384" / "lineage.parquet").to_pylist()
    padded = multi = 0
    for s, row in zip(side, rows, strict=True):
        cu, pos = reference_boundaries(row)
        assert s["cu_seqlens"] == cu, row["row_id"]
        assert s["position_ids"] == pos, row["row_id"]
        if row["n_pad"]:  # the padding is the last sequence, exactly n_pad long
            padded += 1
            assert cu[-1] - cu[-2] == row["n_pad"]
        multi += len(cu) > 3
    assert padded and multi  # the sample has rows of several documents and padded rows
    chat = pq.read_table(dest / "procedural" / "lineage.parquet").to_pylist()
    for s, row in zip(chat, parquet_rows(out, files["procedural"]), strict=True):
        n = len(row["input_ids"])
        assert s["cu_seqlens"] == [0, n] and s["position_ids"] == list(range(n))


def test_killed_export_never_looks_complete_and_rerun_replaces(
    built: tuple[Manifest, Path], tmp_path: Path
) -> None:
    _, out = built
    dest = tmp_path / "exp"
    export(out, dest, "megatron", configs=["pretrain_65536"])
    before = (dest / MARKER).read_text()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LONGLOOM_FAULT": "export_row_group:4",  # SIGKILL after three row groups are written
    }
    cmd = [sys.executable, "-m", "flows.cli", "export", str(out), "--format", "megatron", "--to", str(dest)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    # the previous export is untouched; the killed one sits only in a hidden folder beside it
    assert is_export(dest) and (dest / MARKER).read_text() == before
    assert sorted(p.name for p in dest.iterdir()) == [MARKER, "pretrain_65536"]
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".exp.partial-")]
    assert len(partial) == 1 and not (partial[0] / MARKER).exists()

    env.pop("LONGLOOM_FAULT")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # leftovers cleared, old copy gone
    meta = json.loads((dest / MARKER).read_text())
    assert sorted(c["name"] for c in meta["configs"]) == ["pretrain_16384", "pretrain_65536", "procedural"]
    assert len(IndexedDataset(str(dest / "pretrain_16384" / "tokens"))) == meta["configs"][0]["rows"]


def test_clear_errors_and_foreign_folders_left_alone(built: tuple[Manifest, Path], tmp_path: Path) -> None:
    _, out = built
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a Longloom export"):
        export(out, foreign, "megatron")
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match=r"procedural_eval.*choose from"):
        export(out, tmp_path / "x", "megatron", configs=["procedural_eval"])
    with pytest.raises(ExportError, match="output folder itself"):
        export(out, out, "megatron")
    with pytest.raises(ExportError, match="no manifest"):
        export(tmp_path, tmp_path / "y", "megatron")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_changed_shard_is_refused(built: tuple[Manifest, Path], tmp_path: Path) -> None:
    """A shard that no longer matches its manifest checksum is named, and nothing is published."""
    manifest, out = built
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".longloom"))
    shard = copy / manifest.targets[0].shards[-1].path
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard)
    with pytest.raises(ExportError, match=f"{shard.name}: sha256 differs"):
        export(copy, tmp_path / "e", "megatron")
    assert not (tmp_path / "e").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".e.")]


def test_cli_error_is_one_line(built: tuple[Manifest, Path], tmp_path: Path) -> None:
    """The command line says what is wrong in one line and exits 2, with no traceback."""
    _, out = built
    cmd = [sys.executable, "-m", "flows.cli", "export", str(out), "--format", "megatron"]
    cmd += ["--to", str(tmp_path / "e"), "--config", "nope"]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --config nope: not a config with token ids in {out.resolve()}; "
        "choose from pretrain_16384, pretrain_65536, procedural"
    ]


# The Python of an environment with mosaicml-streaming (e.g. an llm-foundry one): the MDS round trip
# runs there. Without it only the refusal is tested.
MDS_PYTHON = os.environ.get("LONGLOOM_MDS_PYTHON")
# Read back with streaming's own reader, in its environment: every sample's tokens, in order.
MDS_READER = """
import json, sys
from streaming import StreamingDataset
from streaming.base.util import clean_stale_shared_memory
clean_stale_shared_memory()
ds = StreamingDataset(local=sys.argv[1], shuffle=False, batch_size=1)
with open(sys.argv[2], "w") as f:
    for i in range(ds.num_samples):
        f.write(json.dumps(ds.get_item(i)["tokens"].tolist()) + "\\n")
"""


def test_mds_export_without_streaming_says_where_to_get_it(
    built: tuple[Manifest, Path], tmp_path: Path
) -> None:
    _, out = built
    dest = tmp_path / "mds"
    with pytest.raises(ExportError) as err:  # this environment has no mosaicml-streaming
        export(out, dest, "mds", configs=["pretrain_16384"], mds_python=sys.executable)
    message = str(err.value)
    assert "mosaicml-streaming" in message and "--mds-python" in message and "\n" not in message
    assert not dest.exists() and not list(tmp_path.glob(".mds.*"))  # nothing half-written left


@pytest.mark.skipif(not MDS_PYTHON, reason="LONGLOOM_MDS_PYTHON: a Python with mosaicml-streaming")
def test_mds_round_trip_read_back_by_streaming(built: tuple[Manifest, Path], tmp_path: Path) -> None:
    manifest, out = built
    assert MDS_PYTHON is not None
    dest = tmp_path / "mds"
    res = export(out, dest, "mds", mds_python=MDS_PYTHON)
    files = config_files(manifest)
    assert {c.name for c in res.configs} == {"pretrain_16384", "pretrain_65536", "procedural"}
    meta = json.loads((dest / MARKER).read_text())
    for c in res.configs:
        rows = parquet_rows(out, files[c.name])
        dumped = tmp_path / f"{c.name}.jsonl"
        subprocess.run([MDS_PYTHON, "-c", MDS_READER, str(dest / c.name / "mds"), str(dumped)], check=True)
        got = [json.loads(line) for line in dumped.read_text().splitlines()]
        assert got == [row["input_ids"] for row in rows], c.name
        side = pq.read_table(dest / c.name / "lineage.parquet").to_pylist()
        assert [s["index"] for s in side] == list(range(len(rows)))
        assert [(s["source_file"], s["source_row"]) for s in side] == [(r["_file"], r["_row"]) for r in rows]
        described = next(d for d in meta["configs"] if d["name"] == c.name)
        assert described["mds_folder"] == f"{c.name}/mds" and described["rows"] == len(rows)
