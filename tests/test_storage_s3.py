"""Object storage (issue 14.1): sources and output.dir on `s3://`, against a real S3-compatible server.

moto's standalone server runs in its own process on 127.0.0.1; every build is `longloom build
--no-prefect` in a process of its own with its own HOME and TMPDIR (its scratch mirror lives there), and
credentials only in the environment. The reference is the same config with a local output folder:
output.dir is execution-only, so both runs have one config hash, and the published files must be
byte-identical (`output_digest`: every shard and audit table by sha256, the card and the manifest
without the command line).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.opskit import base_env, free_port, output_digest, run_cli
from tests.s3kit import (
    ACCESS_KEY,
    SECRET_KEY,
    download,
    env_set,
    moto_server,
    s3_config,
    s3_env,
    s3fs_for,
    upload_sources,
)
from tests.secretscan import find_secrets


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """(endpoint, filesystem) of a moto server holding the sample's sources in s3://src-bucket/src."""
    folder = tmp_path_factory.mktemp("moto")
    with moto_server(folder / "moto.log") as endpoint:
        fs = s3fs_for(endpoint)
        upload_sources(fs, "src-bucket")
        yield endpoint, fs


def process_env(tmp: Path, endpoint: str, name: str, **extra: str) -> dict[str, str]:
    """A process of its own: HOME and TMPDIR (where its mirror and input cache live) under tmp/name."""
    home, scratch = tmp / name / "home", tmp / name / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    return base_env(**s3_env(endpoint), HOME=str(home), TMPDIR=str(scratch), **extra)


@pytest.fixture(scope="module")
def reference(store: tuple[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same config (sources on s3) built into a local folder, in-process."""
    endpoint, _ = store
    tmp = tmp_path_factory.mktemp("reference")
    cfg = s3_config(tmp, "src-bucket", out=str(tmp / "out"))
    r = run_cli(["build", str(cfg), "--no-prefect"], env=process_env(tmp, endpoint, "client"))
    assert r.returncode == 0, r.stderr[-3000:]
    return {"digest": output_digest(tmp / "out"), "folder": tmp / "out"}


def local_files(out: Path) -> set[str]:
    """What a run stores: every file of a local run's folder but the per-process ones."""
    private = (".longloom/lock", ".longloom/helpers/")
    rel = {"/" + p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    return {r for r in rel if not r[1:].startswith(private) and "/.tmp-" not in r}


def stored_keys(fs: Any, root: str) -> set[str]:
    fs.invalidate_cache()
    return {k[len(root) :] for k in fs.find(root)} if fs.exists(root) else set()


def test_output_on_s3_matches_a_local_run(
    store: tuple[str, Any], reference: dict[str, Any], tmp_path: Path
) -> None:
    endpoint, fs = store
    fs.mkdir("out-plain")
    cfg = s3_config(tmp_path, "src-bucket", out="s3://out-plain/run")
    env = process_env(tmp_path, endpoint, "client")
    r = run_cli(["build", str(cfg), "--no-prefect"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = download(fs, "s3://out-plain/run", tmp_path / "downloaded")
    assert output_digest(got) == reference["digest"]
    keys = stored_keys(fs, "out-plain/run")
    assert keys == local_files(reference["folder"])  # the work folder too: what a resume reads
    # nothing process-private reached the store, and nothing was written next to the config or cwd
    assert not [k for k in keys if "/.tmp-" in k or k.endswith("/lock") or "/helpers/" in k]
    assert not (tmp_path / "s3:").exists() and not (Path.cwd() / "s3:").exists()
    # the process's scratch mirror went away with it
    assert not list((tmp_path / "client" / "tmp").glob("longloom-*/mirrors/*"))
    # lineage keeps the source URLs, and no credential is anywhere in what was published or logged
    manifest = json.loads((got / "manifest.json").read_text())
    assert "s3://src-bucket/src/wiki/part-000.jsonl.gz" in json.dumps(manifest)
    assert find_secrets([got], [SECRET_KEY, ACCESS_KEY], {"stdout": r.stdout, "stderr": r.stderr}) == []


def test_killed_client_resumes_from_the_store(
    store: tuple[str, Any], reference: dict[str, Any], tmp_path: Path
) -> None:
    """SIGKILL the client after it stored a unit's data but not its record (the 6th commit: a write
    shard), then resume in a process with a fresh scratch folder: only the store can tell it what is
    done. The killed unit is redone, the finished ones are reused, and the store ends with exactly the
    files of an uninterrupted run (nothing duplicated)."""
    endpoint, fs = store
    fs.mkdir("out-kill")
    cfg = s3_config(tmp_path, "src-bucket", out="s3://out-kill/run")
    killed = run_cli(
        ["build", str(cfg), "--no-prefect"],
        env=process_env(tmp_path, endpoint, "first"),
        fault="push_records:6",
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    keys = stored_keys(fs, "out-kill/run")
    assert "/manifest.json" not in keys
    # a unit's data is stored without its record: the killed commit, which must not count as done
    shards = {k.rpartition("/")[2].removesuffix(".parquet") for k in keys if k.startswith("/data/")}
    records = {
        k.rpartition("/")[2].removesuffix(".json") for k in keys if "/written/" in k and k.endswith(".json")
    }
    assert len(shards) == len(records) + 1, (shards, records)

    resumed = run_cli(["build", str(cfg), "--no-prefect"], env=process_env(tmp_path, endpoint, "second"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = download(fs, "s3://out-kill/run", tmp_path / "downloaded")
    assert output_digest(got) == reference["digest"]
    report = json.loads((got / "report.json").read_text())
    reused = {s["stage"]: s["reused"] for s in report["stages"]}
    assert reused["prepare"] == 4 and reused["write"] == len(records), reused
    # the same objects as an uninterrupted run: a rerun replaces keys, it never adds copies
    assert stored_keys(fs, "out-kill/run") == local_files(reference["folder"])


def test_unreachable_store_fails_before_any_work(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = s3_config(tmp_path, "src-bucket")
    r = run_cli(["build", str(cfg), "--no-prefect"], env=process_env(tmp_path, closed, "client"))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    assert "s3://src-bucket/src/wiki/" in lines[0] and "cannot connect" in lines[0]
    assert not list((tmp_path / "client" / "tmp").glob("longloom-*/mirrors/*"))  # no work started


def test_missing_credentials_fail_before_any_work(store: tuple[str, Any], tmp_path: Path) -> None:
    endpoint, fs = store
    env = process_env(
        tmp_path,
        endpoint,
        "client",
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
    )
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(k, None)
    fs.mkdir("out-nocreds")
    cfg = s3_config(tmp_path, "src-bucket", out="s3://out-nocreds/run")
    r = run_cli(["build", str(cfg), "--no-prefect"], env=env)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no credentials" in lines[0] and "s3://src-bucket/" in lines[0], r.stderr
    assert stored_keys(fs, "out-nocreds") == set()


def test_embedding_cache_on_s3_is_shared_across_machines(
    store: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`diversity.cache_dir: s3://...` (issue 14: caches on URLs): a build fills the cache in the store;
    a second build from a fresh scratch folder and HOME (another machine) embeds nothing, and writes the
    same shards. In-process builds, with the store's credentials in this process's environment only."""
    from pipeline.build import run_build
    from tests.test_diversity import Corpus

    endpoint, fs = store
    fs.mkdir("emb-cache")
    (tmp_path / "corpus").mkdir()
    corpus = Corpus(tmp_path / "corpus")
    runs = []
    with env_set(s3_env(endpoint)):
        for name in ("first", "second"):
            monkeypatch.setenv("LONGLOOM_SCRATCH", str(tmp_path / name / "scratch"))
            monkeypatch.setenv("HOME", str(tmp_path / name / "home"))
            out = tmp_path / name / "out"
            m = run_build(corpus.config(out, "s3://emb-cache/vectors"))  # type: ignore[arg-type]
            assert m.ok, [c for c in m.checks if not c.ok]
            report = json.loads((out / "report.json").read_text())["diversity"]
            runs.append((out, report))
    (out1, first), (out2, second) = runs
    assert first["cache_dir"] == "s3://emb-cache/vectors"
    assert first["embedding"]["cache_misses"] == corpus.n and first["embedding"]["model_calls"] > 0
    assert second["embedding"]["cache_misses"] == 0 and second["embedding"]["model_calls"] == 0
    assert second["embedding"]["cache_hits"] == corpus.n
    stored = stored_keys(fs, "emb-cache/vectors")
    assert any(k.endswith(".keys.npy") for k in stored) and not [k for k in stored if ".tmp-" in k]
    # the second machine read the vectors from the store (its local copy), not from a default cache
    assert list((tmp_path / "second" / "scratch").glob("caches/*/*/*.keys.npy"))
    assert not list(tmp_path.glob("*/home/.cache/longloom/embeddings/*/*.npy"))
    assert output_digest(out2) == output_digest(out1)
    assert find_secrets([out1, out2, tmp_path / "second" / "scratch"], [SECRET_KEY, ACCESS_KEY], {}) == []


HOLD = """
import sys, time
from pipeline.core.workdir import WorkDir
from schemas.config import load_config

with WorkDir(load_config(sys.argv[1])).lock(lambda m: print("log:", m, flush=True)):
    print("locked", time.time(), flush=True)
    time.sleep(float(sys.argv[2]))
    print("releasing", time.time(), flush=True)
"""


def test_two_clients_on_one_url_are_kept_apart(store: tuple[str, Any], tmp_path: Path) -> None:
    """Two clients of one `s3://` output folder, each with a scratch folder of its own (as on two
    machines: the flock of one is not the other's) hold the run lock one after the other: the lock is
    an object created with a conditional PUT in the store (issue 14, item 4)."""
    endpoint, fs = store
    fs.mkdir("out-locked")
    cfg = s3_config(tmp_path, "src-bucket", out="s3://out-locked/run")
    procs = []
    for name in ("a", "b"):
        env = process_env(tmp_path, endpoint, name, LONGLOOM_STORE_LOCK_TTL="4")
        cmd = [sys.executable, "-c", HOLD, str(cfg), "6" if name == "a" else "0"]
        p = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        procs.append(p)
        if name == "a":
            assert p.stdout is not None
            first = p.stdout.readline()
            assert first.startswith("locked"), first + p.stderr.read()  # type: ignore[union-attr]
    a_out, a_err = procs[0].communicate(timeout=120)
    b_out, b_err = procs[1].communicate(timeout=120)
    assert procs[0].returncode == 0 and procs[1].returncode == 0, a_err + b_err
    a_released = float(next(ln for ln in a_out.splitlines() if ln.startswith("releasing")).split()[1])
    b_locked = float(next(ln for ln in b_out.splitlines() if ln.startswith("locked")).split()[1])
    # b waited for a's whole hold (6 s, more than the lock's 4 s ttl: a's heartbeat kept it) ...
    assert b_locked >= a_released, (a_out, b_out)
    assert "another run holds this output folder" in b_out and "taking over" not in b_out
    # ... and neither left a lock behind
    assert not fs.exists("out-locked/run/.longloom/run-lock")


def test_a_stale_lock_is_taken_over(store: tuple[str, Any]) -> None:
    """The lock of a client on another machine that stopped beating is taken over after `ttl` seconds
    without change; the lock of a process of this machine that is gone, at once."""
    from pipeline.core.storage import LOCK_OBJECT, StoreLock

    endpoint, fs = store
    fs.mkdir("out-stale")
    url = "s3://out-stale/run"
    with env_set(s3_env(endpoint)):
        gone = StoreLock(url, ttl=2, heartbeat=0.5, poll=0.1, host="machine-a")
        gone.acquire()
        alive_for = time.monotonic()
        with pytest.raises(TimeoutError):  # beating: held past its ttl
            StoreLock(url, ttl=2, poll=0.1, host="machine-b").acquire(timeout=3)
        assert time.monotonic() - alive_for > 3
        gone._stop.set()  # machine-a dies: no more beats, no release
        assert gone._thread is not None
        gone._thread.join()
        said: list[str] = []
        taker = StoreLock(url, ttl=2, poll=0.1, host="machine-b")
        started = time.monotonic()
        taker.acquire(said.append)
        assert time.monotonic() - started >= 2 and any("taking over" in s for s in said)
        assert json.loads(fs.cat_file(f"out-stale/run/{LOCK_OBJECT}"))["host"] == "machine-b"
        taker._stop.set()  # this one dies too, on this machine, with a pid that is gone
        assert taker._thread is not None
        taker._thread.join()
        fs.pipe_file(
            f"out-stale/run/{LOCK_OBJECT}",
            json.dumps({"host": taker.host, "pid": 2**22 + 7, "token": "x", "beat": 0}).encode(),
        )
        started = time.monotonic()
        with StoreLock(url, ttl=60, poll=0.1, host="machine-b").held(said.append):
            assert time.monotonic() - started < 10  # not the 60 s ttl
        assert not fs.exists(f"out-stale/run/{LOCK_OBJECT}")  # released
