"""Nothing silently switched off or lost (issue 11 items 4, 10-15; issue 12 items 2, 3).

Early errors, damaged records redone, bad files quarantined, intermediates collected, a full disk
reported in one line, rows and manifests that depend only on what produced them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, sample_dict
from tests.opskit import base_env


def _config_file(folder: Path, **overrides: Any) -> Path:
    """The sample config with absolute input paths, output in folder/out, saved as folder/c.yaml."""
    cfg = sample_dict()
    for s in cfg["sources"]:
        s["paths"] = [str(ROOT / "data" / p) for p in s["paths"]]
    cfg["output"] = {**cfg["output"], "dir": str(folder / "out")}
    for key, value in overrides.items():
        cfg[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- 11.4: `longloom build` runs the preflight before Prefect starts ---------------------------------


def test_build_checks_the_config_before_starting_the_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.build
    from flows.cli import main

    cfg = sample_dict()
    cfg["sources"][0]["paths"] = [str(tmp_path / "missing" / "*.jsonl")]
    for s in cfg["sources"][1:]:
        s["paths"] = [str(ROOT / "data" / p) for p in s["paths"]]
    cfg["output"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    started: list[object] = []
    monkeypatch.setattr(flows.build, "run", lambda *a, **k: started.append(a) or {"checks_ok": True})
    assert main(["build", str(path)]) == 2
    assert started == [], "the Prefect flow was started before the preflight checks"


def test_build_cli_fails_on_inputs_without_starting_prefect(tmp_path: Path) -> None:
    """Through `python -m flows.cli build` (Prefect mode): the error, and no Prefect database created."""
    cfg = sample_dict()
    for s in cfg["sources"]:
        s["paths"] = [str(ROOT / "data" / p) for p in s["paths"]]
    cfg["tokenizer"] = {"name": "quicktok:no_such_encoding"}
    cfg["output"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    home = tmp_path / "prefect-home"
    env = base_env(PREFECT_HOME=str(home))
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "build", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "tokenizer" in done.stderr and "no_such_encoding" in done.stderr
    # Prefect's temporary API creates its SQLite database in PREFECT_HOME when it starts
    assert not list(home.rglob("*.db")), f"a Prefect server was started: {list(home.rglob('*'))}"
    assert not (tmp_path / "out").exists()


# ---- 11.10: a configured SemDeDup/D4 that cannot load is an error -------------------------------------


def _diversity_config(out: Path) -> Any:
    from tests.conftest import make_config

    return make_config(
        out,
        diversity={"embedder": "static-tokens", "semdedup": {"threshold": 0.9}, "d4": {"keep_fraction": 0.8}},
        procedural={"enabled": False},
    )


def test_unloadable_diversity_stage_fails_the_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.build import preflight
    from schemas.config import ConfigError

    cfg = _diversity_config(tmp_path / "out")
    monkeypatch.setitem(sys.modules, "pipeline.corpus.semantic", None)  # `import pipeline.corpus.semantic` fails
    with pytest.raises(ConfigError, match=r"diversity\.semdedup and diversity\.d4 configured"):
        preflight(cfg)


def test_selection_never_skips_a_configured_diversity_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.core.workdir import WorkDir
    from pipeline.readers import list_input_shards
    from pipeline.stages.plan import select as select_and_layout
    from pipeline.stages.prepare import prepare_shard
    from schemas.config import ConfigError

    cfg = _diversity_config(tmp_path / "out")
    work = WorkDir(cfg)
    prepared = [prepare_shard(cfg, s, work) for s in list_input_shards(cfg)]
    monkeypatch.setitem(sys.modules, "pipeline.corpus.semantic", None)
    with pytest.raises(ConfigError, match="cannot be loaded"):
        select_and_layout(cfg, work, prepared)
    assert not (work.select_dir / "select.json").exists()


# ---- 11.11: a Parquet file without the text column is quarantined, the run goes on -------------------


def _mixed_parquet_config(tmp_path: Path, on_bad_file: str | None = None) -> Any:
    import shutil

    import pyarrow.parquet as pq

    from tests.conftest import make_config

    folder = tmp_path / "bible"
    folder.mkdir()
    shutil.copy(ROOT / "data" / "sample" / "bible" / "kjv.parquet", folder / "a-kjv.parquet")
    # same rows, but the text sits in a column named `body`: the configured `text` is missing
    t = pq.read_table(folder / "a-kjv.parquet").slice(0, 5).rename_columns(["id", "book", "body"])
    pq.write_table(t, folder / "b-renamed.parquet")
    (folder / "c-junk.parquet").write_bytes(b"PAR1 this is not a parquet file")
    src = {"name": "bible", "kind": "parquet", "paths": [str(folder / "*.parquet")], "id_field": "id"}
    if on_bad_file:
        src["on_bad_file"] = on_bad_file
    return make_config(tmp_path / "out", sources=[src], procedural={"enabled": False})


def test_parquet_file_without_text_column_is_quarantined_and_counts_reconcile(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from pipeline.build import run_build

    m = run_build(_mixed_parquet_config(tmp_path))
    assert m.ok, [c for c in m.checks if not c.ok]
    c = m.sources["bible"]
    assert c.quarantined == {"missing_text_column": 5, "unreadable_file": 1}
    assert c.records_read == 66 + 5 + 1 and c.documents == 66
    assert {i.uri.rsplit("/", 1)[-1]: i.records for i in m.inputs} == {
        "a-kjv.parquet": 66,
        "b-renamed.parquet": 5,
        "c-junk.parquet": 1,
    }
    # recount from the audit table itself
    q = pq.read_table(tmp_path / "out" / m.audit["quarantine"][0].path).to_pylist()
    renamed = [r for r in q if r["uri"].endswith("b-renamed.parquet")]
    assert sorted(r["record"] for r in renamed) == [0, 1, 2, 3, 4]
    assert all(
        "no column 'text'" in r["detail"] and "columns: id, book, body" in r["detail"] for r in renamed
    )
    junk = [r for r in q if r["uri"].endswith("c-junk.parquet")]
    assert len(junk) == 1 and junk[0]["raw"].startswith(b"PAR1 this")


def test_parquet_bad_file_fails_the_run_when_asked(tmp_path: Path) -> None:
    from pipeline.build import preflight
    from schemas.config import ConfigError

    with pytest.raises(ConfigError, match=r"b-renamed\.parquet has no column 'text'.*on_bad_file"):
        preflight(_mixed_parquet_config(tmp_path, on_bad_file="fail"))


# ---- 11.12: a damaged procedural batch record is redone ---------------------------------------------


def test_truncated_procedural_record_is_redone(tmp_path: Path) -> None:
    from pipeline.build import run_build
    from pipeline.core.workdir import WorkDir
    from tests.conftest import make_config

    cfg = make_config(tmp_path / "out")
    first = run_build(cfg)
    records = sorted(WorkDir(cfg).procedural_dir.glob("*.json"))
    assert records, "no procedural batch records written"
    whole = records[0].read_bytes()
    records[0].write_bytes(whole[: len(whole) // 2])  # a crash or a full disk cut it short
    again = run_build(cfg)
    assert again.ok

    def without_timings(blob: str) -> Any:
        rec = json.loads(blob)
        for s in rec["stats"]:
            s.pop("seconds")
        return rec

    assert without_timings(records[0].read_text()) == without_timings(whole.decode())
    assert again.extra_configs == first.extra_configs  # the same files, checksums included


# ---- 11.15: rows carry the hash of the sections that produced them; runner-independent manifest -------


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "data").glob("pretrain_*/*.parquet"))
    }


def test_procedural_only_change_keeps_pretraining_shards_byte_identical(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from pipeline.build import run_build
    from tests.conftest import make_config

    out = tmp_path / "out"
    first = run_build(make_config(out))
    before = _shard_bytes(out)
    proc = sample_dict()["procedural"]
    proc["tasks"] = [{**t, "samples": 1} for t in proc["tasks"]]  # only the procedural settings change
    second = run_build(make_config(out, procedural=proc))
    assert second.ok and second.config_hash != first.config_hash
    assert before and _shard_bytes(out) == before
    assert second.row_config_hashes["pretraining"] == first.row_config_hashes["pretraining"]
    assert second.row_config_hashes["procedural"] != first.row_config_hashes["procedural"]
    # the procedural rows did change, and say which procedural settings made them
    chat = second.extra_configs[proc.get("config_name", "procedural")]
    lineage = pq.read_table(out / chat[0].path, columns=["lineage"]).column("lineage").to_pylist()
    assert {x["config_hash"] for x in lineage} == {second.row_config_hashes["procedural"]}


def test_synthesis_work_folders_depend_only_on_their_own_sections(tmp_path: Path) -> None:
    from pipeline.core.workdir import WorkDir
    from tests.conftest import make_config

    out = tmp_path / "out"
    base = WorkDir(make_config(out))
    proc = sample_dict()["procedural"]
    proc["tasks"] = [{**t, "samples": 1} for t in proc["tasks"]]
    procedural_only = WorkDir(make_config(out, procedural=proc))
    # a procedural change redoes the procedural stage and nothing else
    assert procedural_only.procedural_dir != base.procedural_dir
    assert procedural_only.rewriter_dir == base.rewriter_dir
    assert procedural_only.select_dir == base.select_dir


def test_manifest_does_not_depend_on_runner_or_output_folder(tmp_path: Path) -> None:
    from pipeline.build import run_build
    from tests.conftest import make_config

    no_proc = {"enabled": False}
    threads = make_config(tmp_path / "a", procedural=no_proc)
    dask = make_config(
        tmp_path / "elsewhere" / "b",
        procedural=no_proc,
        run={
            **sample_dict()["run"],
            "task_runner": "dask",
            "dask_address": "tcp://10.0.0.5:8786",
            "workers": 7,
        },
    )
    run_build(threads, command="longloom build c.yaml --no-prefect")
    run_build(dask, command="longloom build c.yaml --dask-address tcp://10.0.0.5:8786 --workers 7")
    a = (tmp_path / "a" / "manifest.json").read_bytes()
    b = (tmp_path / "elsewhere" / "b" / "manifest.json").read_bytes()
    assert a == b
    assert b"10.0.0.5" not in b
    # the run report says how it ran
    report = json.loads((tmp_path / "elsewhere" / "b" / "report.json").read_text())
    assert "--dask-address tcp://10.0.0.5:8786" in report["command"]


# ---- 12.2: no output.dir: out/<config name>, and never another config's run replaced -----------------


def test_config_without_output_dir_writes_to_its_own_folder_and_refuses_to_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.build import preflight, run_build
    from schemas.config import ConfigError, load_config

    data = sample_dict()
    for s in data["sources"]:
        s["paths"] = [str(ROOT / "data" / p) for p in s["paths"]]
    data.pop("output")
    data["procedural"] = {"enabled": False}
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "myrun.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    # someone's earlier output of the sample, where the old default wrote
    (tmp_path / "out" / "sample" / "data").mkdir(parents=True)
    (tmp_path / "out" / "sample" / "data" / "keep.parquet").write_bytes(b"theirs")

    cfg = load_config(path)
    assert Path(cfg.output.dir) == Path("out/myrun") and not cfg.output_named
    m = run_build(cfg)
    assert m.ok and (tmp_path / "out" / "myrun" / "manifest.json").exists()
    assert (tmp_path / "out" / "sample" / "data" / "keep.parquet").read_bytes() == b"theirs"

    # the same file edited: its default folder now holds another config's run
    data["packing"]["targets"] = [{"length": 8192}]
    path.write_text(yaml.safe_dump(data))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out" / "myrun").rglob("*"))
    with pytest.raises(ConfigError, match=r"out/myrun holds the output of another config.*--output"):
        run_build(load_config(path))
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out" / "myrun").rglob("*")) == before
    # naming the folder (--output, even the default's path) is consent to replace it
    from flows.cli import _load

    preflight(_load(str(path), "out/myrun"))


# ---- 12.3: a local hf: tokenizer path starts at the config's folder; missing is "file not found" ------


def _tiny_tokenizer_json(path: Path) -> None:
    """A small byte-level BPE tokenizer.json with the default separator as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def test_hf_tokenizer_path_is_relative_to_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.build import preflight
    from pipeline.stages.prepare import tokenizer_for
    from schemas.config import load_config

    _tiny_tokenizer_json(tmp_path / "conf" / "tok" / "tokenizer.json")
    path = _config_file(
        tmp_path / "conf", tokenizer={"name": "hf:tok/tokenizer.json"}, procedural={"enabled": False}
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the config's folder
    cfg = load_config(path)
    tok = tokenizer_for(cfg)
    assert tok.identity.name == "hf:tok/tokenizer.json"  # named as written, no local absolute path
    assert tok.special_token_id("<|end_of_text|>") == 0
    assert len(preflight(cfg)) > 0
    folder = load_config(_config_file(tmp_path / "conf", tokenizer={"name": "hf:tok"}))  # a folder
    assert tokenizer_for(folder).identity.vocab_hash == tok.identity.vocab_hash


def test_missing_local_hf_tokenizer_is_file_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.build import preflight
    from schemas.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    for spec in ("tok/missing.json", "./tok", "models/tok/v1"):
        cfg = load_config(_config_file(tmp_path / "conf", tokenizer={"name": f"hf:{spec}"}))
        with pytest.raises(ConfigError) as err:
            preflight(cfg)
        msg = str(err.value)
        assert "file not found" in msg and str(tmp_path / "conf") in msg, msg
        assert "hub" not in msg.lower(), msg


# ---- 11.13: intermediates of earlier configs are collected; `longloom gc` reports sizes ----------------


def _stage_folders(out: Path) -> set[str]:
    return {d.name for d in (out / ".longloom").iterdir() if d.is_dir() and "-" in d.name}


def test_finished_run_removes_intermediates_of_earlier_configs(tmp_path: Path) -> None:
    from pipeline.build import run_build
    from pipeline.core.workdir import WorkDir
    from tests.conftest import make_config

    out = tmp_path / "out"
    first_cfg = make_config(out, procedural={"enabled": False})
    run_build(first_cfg)
    first = WorkDir(first_cfg)
    assert {first.prepare_dir.name, first.select_dir.name} <= _stage_folders(out)
    filters = {**sample_dict()["filters"], "min_tokens": 32}  # a new prepare key: tokens are redone
    second_cfg = make_config(out, filters=filters, procedural={"enabled": False})
    assert run_build(second_cfg).ok
    second = WorkDir(second_cfg)
    assert second.prepare_key != first.prepare_key
    assert _stage_folders(out) == {second.prepare_dir.name, second.select_dir.name}


def test_gc_command_reports_sizes_and_deletes_only_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main
    from pipeline.build import run_build
    from tests.conftest import make_config

    out = tmp_path / "out"
    assert main(["gc", str(out)]) == 2  # nothing recorded yet: no guessing what is in use
    cfg = make_config(out, procedural={"enabled": False})
    run_build(cfg)
    in_use = _stage_folders(out)
    old = out / ".longloom" / "prepare-0123456789abcdef"  # as an earlier config's run left it
    (old / "tokens").mkdir(parents=True)
    (old / "tokens" / "x.int32").write_bytes(b"\0" * 3_000_000)
    cache = out / ".longloom" / "rewriter-cache"  # meant to outlive config changes
    cache.mkdir()
    capsys.readouterr()
    assert main(["gc", str(out)]) == 0
    text = capsys.readouterr().out
    assert "would delete" in text and "prepare-0123456789abcdef" in text and "0.003 GiB" in text
    assert "dry run" in text and old.exists()
    assert main(["gc", str(out), "--delete"]) == 0
    assert "deleted" in capsys.readouterr().out
    assert not old.exists() and cache.exists() and _stage_folders(out) == in_use | {"rewriter-cache"}
    from pipeline.core.workdir import WorkDir

    tokens = {p: p.stat().st_mtime_ns for p in WorkDir(cfg).prepare_dir.rglob("*.int32")}
    again = run_build(cfg)  # what is in use was kept: the tokenized documents are reused, not redone
    assert again.ok and tokens and {p: p.stat().st_mtime_ns for p in tokens} == tokens


# ---- 11.14: a full disk is one line: the path, the bytes needed, the free space, and that a rerun resumes


def test_full_disk_is_one_line_and_a_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno
    import os

    import pyarrow.parquet as pq

    from flows.cli import main
    from pipeline.core.workdir import WorkDir
    from schemas.config import load_config

    path = _config_file(tmp_path, procedural={"enabled": False})
    original = pq.ParquetWriter.write_table

    def full_on_output_shards(self: Any, table: Any, *a: Any, **k: Any) -> None:
        if "/data/pretrain_" in str(self.where):  # the disk fills at the first output shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(self, table, *a, **k)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_on_output_shards)
    capsys.readouterr()
    assert main(["build", str(path), "--no-prefect"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: disk full while writing ")
    assert "/data/pretrain_" in line and ".parquet" in line
    assert "bytes needed" in line and "bytes free there" in line and "resumes" in line

    monkeypatch.setattr(pq.ParquetWriter, "write_table", original)
    tokens = {p: p.stat().st_mtime_ns for p in WorkDir(load_config(path)).prepare_dir.rglob("*.int32")}
    assert tokens
    assert main(["build", str(path), "--no-prefect"]) == 0
    assert {p: p.stat().st_mtime_ns for p in tokens} == tokens  # the rerun resumed: no re-tokenizing
    assert not list((tmp_path / "out").rglob(".tmp-*"))


def test_token_file_writer_reports_the_failed_write(tmp_path: Path) -> None:
    import errno

    import numpy as np

    from pipeline.core.parquet_io import DiskFullError, TokenFileSink

    class FullFile:
        def write(self, buf: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    sink = TokenFileSink(tmp_path / "t" / "a.int32")
    sink._f = FullFile()  # type: ignore[assignment]
    with pytest.raises(DiskFullError) as err:
        sink.write(np.arange(1000, dtype=np.int32))
    sink.abort()
    assert err.value.path == str(tmp_path / "t" / "a.int32") and err.value.needed == 4000
    assert err.value.free is not None and err.value.free > 0
    assert not list((tmp_path / "t").iterdir())  # nothing half-written stays visible
