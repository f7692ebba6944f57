"""Issue 14 item 2 (finalize as a tree): finalize is units and a small merge, not one process reading
every audit row and every output byte.

- the audit merge is planned from footers and each file is written from its own slice: the files equal
  a plain one-process concatenation written here (the reference), with the other inputs removed, and
  only the row groups that overlap the slice are read;
- a multi-shard build runs finalize as many units (one per audit file, per shard group, extras), and the
  published audit tables hold every per-shard audit row exactly once;
- a run killed between finalize units (SIGKILL, LONGLOOM_FAULT) or failing in one, then rerun, gives the
  uninterrupted run's files;
- the recount checks still fail when a shard or an audit row changes under finalize.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.output.audit as audit_mod
import pipeline.stages.finalize as finalize_mod
from pipeline.build import run_build, run_stages
from pipeline.core.parquet_io import sha256_file
from pipeline.output.audit import plan_audit, write_audit_part
from pipeline.stages.base import RunContext
from pipeline.stages.finalize import AuditUnit, ChecksumUnit, ExtrasUnit, FinalizeStage
from schemas.records import FILTERED_SCHEMA
from tests.conftest import make_config, sample_dict
from tests.opskit import SMALL_OUTPUT, output_digest, run_cli, write_config

KILLED = -signal.SIGKILL

SCHEMA = pa.schema(
    [pa.field("source", pa.string()), pa.field("reason", pa.string()), pa.field("n", pa.int64())]
)


def _input(path: Path, start: int, groups: list[int]) -> None:
    """An audit-like file of sum(groups) rows written in row groups of the given sizes; row i holds n=start+i."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, SCHEMA) as w:
        pos = start
        for g in groups:
            w.write_table(
                pa.table(
                    {
                        "source": [f"s{(pos + i) % 3}" for i in range(g)],
                        "reason": [f"r{(pos + i) % 5}" for i in range(g)],
                        "n": list(range(pos, pos + g)),
                    },
                    schema=SCHEMA,
                )
            )
            pos += g


def _reference(out: Path, name: str, inputs: list[Path], rows_per_file: int) -> dict[str, str]:
    """The one-process merge, written here: stream each input in 65,536-row batches, cut a new file every
    `rows_per_file` rows. Path -> sha256 of each file."""
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in inputs)
    n = max(1, -(-total // rows_per_file))
    files: dict[str, str] = {}
    writers: list[tuple[str, pq.ParquetWriter]] = []

    def writer(k: int) -> pq.ParquetWriter:
        rel = f"ref/{name}-{k:05d}-of-{n:05d}.parquet"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        w = pq.ParquetWriter(
            out / rel,
            SCHEMA,
            compression="zstd",
            compression_level=1,
            use_dictionary=["source", "reason"],
            write_statistics=False,
        )
        writers.append((rel, w))
        return w

    k, in_file, w = 0, 0, writer(0)
    for p in inputs:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=65_536):
            while batch.num_rows:
                if in_file == rows_per_file:
                    k, in_file, w = k + 1, 0, writer(k + 1)
                take = min(rows_per_file - in_file, batch.num_rows)
                w.write_table(pa.Table.from_batches([batch.slice(0, take)]))
                batch, in_file = batch.slice(take), in_file + take
    for rel, w in writers:
        w.close()
        files[rel.removeprefix("ref/")] = sha256_file(out / rel)
    return files


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Five per-shard files (one empty), row groups that do not line up with 65,536-row batches."""
    out = tmp_path_factory.mktemp("audit")
    layout = [[70_000, 50_000], [], [10, 3], [150_000], [40_000, 40_000, 1]]
    rels, start = [], 0
    for i, groups in enumerate(layout):
        rel = f".longloom/prepare-x/f{i}.parquet"
        _input(out / rel, start, groups)
        rels.append(rel)
        start += sum(groups)
    return out, rels


@pytest.mark.parametrize("rows_per_file", [100_000, 65_536, 1_000_000, 7])
def test_audit_parts_equal_a_one_process_concatenation(
    inputs: tuple[Path, list[str]], rows_per_file: int, tmp_path: Path
) -> None:
    out, rels = inputs
    if rows_per_file == 7:  # a tiny file size on a small table: 13 rows in 2 files
        rels = [rels[1], rels[2]]
    ref = _reference(tmp_path, "t", [out / r for r in rels], rows_per_file)
    parts = plan_audit(out, "t", rels, rows_per_file)
    assert [Path(p.path).name for p in parts] == sorted(ref)
    for part in parts:
        # only this part's input files exist in a fresh folder: the part reads nothing else
        alone = tmp_path / f"alone-{part.index}"
        for s in {s.path for s in part.slices}:
            (alone / s).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / s, alone / s)
        entry = write_audit_part(alone, part, SCHEMA, 1)
        assert entry.sha256 == ref[Path(part.path).name], part.path
        assert entry.rows == pq.ParquetFile(alone / part.path).metadata.num_rows
    assert sum(p.rows for p in parts) == sum(pq.ParquetFile(out / r).metadata.num_rows for r in rels)


def test_an_audit_part_reads_only_the_row_groups_of_its_slice(
    inputs: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, rels = inputs
    read: list[tuple[int, ...] | None] = []  # the row groups of each read (None: the whole file)
    original = pq.ParquetFile.iter_batches

    def spy(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Any:
        groups = kwargs.get("row_groups")
        read.append(None if groups is None else tuple(groups))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    parts = plan_audit(out, "t", rels, 100_000)
    # f0 120,000 rows, f1 none, f2 13, f3 150,000 (one group), f4 40,000 + 40,000 + 1: file 2 holds rows
    # 200,000..299,999 of the concatenation, f3's last 70,013 and f4's first 29,987 (in its first group)
    part = parts[2]
    assert [(s.path.rsplit("/", 1)[1], s.start, s.stop) for s in part.slices] == [
        ("f3.parquet", 79_987, 150_000),
        ("f4.parquet", 0, 29_987),
    ]
    alone = tmp_path / "alone"
    for s in part.slices:
        (alone / s.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / s.path, alone / s.path)
    read.clear()
    write_audit_part(alone, part, SCHEMA, 1)
    assert read == [(0,), (0,)]  # f3's one group; f4's first group only, never its other two
    t = pq.read_table(alone / part.path)
    assert t.column("n").to_pylist() == list(range(200_000, 300_000))


def small_config(out: Path) -> Any:
    """The sample with small shards (5 per target length) and procedural samples off: a quick build."""
    output = {**sample_dict()["output"], **SMALL_OUTPUT, "dir": str(out)}
    return make_config(out, output=output, procedural={"enabled": False})


def _rows(paths: list[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(p, schema=FILTERED_SCHEMA) for p in paths])


def test_finalize_is_units_and_a_failed_unit_then_rerun_gives_the_same_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_mod, "AUDIT_ROWS_PER_FILE", 7)  # several audit files from the sample
    cfg = small_config(tmp_path / "a" / "out")
    done = run_stages(cfg)
    m = done["finalize"]
    assert m.ok, [c for c in m.checks if not c.ok]
    out = Path(cfg.output.dir)
    n_audit = len(m.audit["filtered"]) + len(m.audit["quarantine"])
    assert len(m.audit["filtered"]) > 1
    assert [e.rows for e in m.audit["filtered"][:-1]] == [7] * (len(m.audit["filtered"]) - 1)
    assert sum(len(t.shards) for t in m.targets) == 10
    report = json.loads((out / "report.json").read_text())
    units = next(s["units"] for s in report["stages"] if s["stage"] == "finalize")
    assert units > 1
    shard_groups = sum(-(-len(t.shards) // finalize_mod.SHARDS_PER_CHECK) for t in m.targets)
    assert units == n_audit + shard_groups + 1  # audit files, shard groups, the optional stages

    # every per-shard audit row is published once, in order: the prepare shards', then selection's
    work = RunContext(cfg).work
    per_shard = [work.prepare_dir / r.files["filtered"] for r in done["prepare"]]
    per_shard.append(work.select_dir / done["select"].filtered_file)
    published = _rows([out / e.path for e in m.audit["filtered"]])
    assert published.equals(_rows(per_shard))
    assert sum(e.rows for e in m.audit["filtered"]) == published.num_rows

    # the same build in another folder, with the third finalize unit failing: no manifest is written;
    # the rerun writes the same files as the run above
    calls = Counter[str]()
    real = finalize_mod.write_audit_file

    def failing(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("injected: the disk went away mid-finalize")
        return real(*args)

    cfg_b = small_config(tmp_path / "b" / "out")
    monkeypatch.setattr(finalize_mod, "write_audit_file", failing)
    with pytest.raises(OSError, match="injected"):
        run_build(cfg_b)
    out_b = Path(cfg_b.output.dir)
    assert not (out_b / "manifest.json").exists()
    assert len(list((out_b / "audit").rglob("*.parquet"))) == 2  # two units had finished
    monkeypatch.setattr(finalize_mod, "write_audit_file", real)
    assert run_build(cfg_b).ok
    assert output_digest(out_b) == output_digest(out)


def test_sigkill_between_finalize_units_then_rerun_gives_the_uninterrupted_output(
    tmp_path: Path, small_shard_reference: dict[str, Any]
) -> None:
    out = tmp_path / "out"
    cfg = write_config(tmp_path, out)
    # after the first audit file, then (resumed) after the second: the manifest is never there early
    for fault in ["finalize_audit:1", "finalize_audit:2"]:
        done = run_cli(["build", str(cfg), "--no-prefect"], fault=fault)
        assert done.returncode == KILLED, f"{fault}: {done.returncode}: {done.stderr[-2000:]}"
        assert not (out / "manifest.json").exists()
        assert list((out / "audit").rglob("*.parquet"))
    done = run_cli(["build", str(cfg), "--no-prefect"])
    assert done.returncode == 0, done.stderr[-3000:]
    digest = output_digest(out)
    assert digest["files"] == small_shard_reference["files"]
    assert digest["manifest"] == small_shard_reference["manifest"]


def test_the_recount_checks_fail_when_a_shard_or_an_audit_row_changes(tmp_path: Path) -> None:
    cfg = small_config(tmp_path / "out")
    done = run_stages(cfg)
    assert done["finalize"].ok
    work = RunContext(cfg).work
    target = done["finalize"].targets[0]
    shard = work.out / target.shards[1].path
    # a written shard replaced after its write record: the same rows, other bytes (still a readable
    # file, so the card can be drawn and the checksum check is what must notice)
    pq.write_table(pq.read_table(shard), shard, compression="none")
    # one filtered row of a prepare shard now gives another reason than the stage's counts say
    audit_file = next(
        p
        for r in done["prepare"]
        if pq.ParquetFile(p := work.prepare_dir / r.files["filtered"]).metadata.num_rows
    )
    t = pq.read_table(audit_file)
    source = t.column("source")[0].as_py()
    reasons = t.column("reason").to_pylist()
    reasons[0] = "tampered"
    pq.write_table(t.set_column(t.schema.get_field_index("reason"), "reason", pa.array(reasons)), audit_file)

    job = FinalizeStage().bind(RunContext(cfg), done)
    units = job.units()
    assert {type(u) for u in units} == {AuditUnit, ChecksumUnit, ExtrasUnit}
    manifest = job.merge([job.run_unit(u) for u in units])
    failed = {c.name: c.detail for c in manifest.checks if not c.ok}
    assert set(failed) == {
        f"{target.config_name}: shard checksums",
        f"{source}: filtered table matches counts",
    }
    assert failed[f"{target.config_name}: shard checksums"] == target.shards[1].path
    assert "'tampered': 1" in failed[f"{source}: filtered table matches counts"]
