"""pipeline/core/storage.py on its own: the mirror's commit order, deletions, private files, what a
pull fetches, and what a URL looks like wherever it is recorded. fsspec's in-memory filesystem
(`memory://`) stands in for a store: a remote URL to the code, no server needed. The end-to-end runs
against a real S3 server are tests/test_storage_s3.py and tests/test_cluster_s3.py."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest

from pipeline.core import storage
from pipeline.core.results import shard_path
from pipeline.core.workdir import WorkDir
from pipeline.readers.base import input_uri
from schemas.config import ConfigError
from tests.conftest import make_config


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    """A fresh `memory://` prefix and this test's scratch root."""
    monkeypatch.setenv("LONGLOOM_SCRATCH", str(tmp_path / "scratch"))
    return f"memory://t-{uuid.uuid4().hex[:12]}/out", fsspec.filesystem("memory")


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_push_stores_data_then_records_then_the_manifest(
    store: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = store
    m = storage.Mirror(url)
    write(m.local / "manifest.json", b"{}")
    write(m.local / ".longloom" / "select-1" / "written" / "a-00000.json", b"{}")
    write(m.local / "data" / "a" / "train-00000-of-00001.parquet", b"rows")
    write(m.local / ".longloom" / "prepare-1" / "tokens" / "x.int32", b"ids")
    write(m.local / ".longloom" / "lock", b"")  # per-process: never stored
    write(m.local / ".longloom" / "helpers" / "1.json", b"{}")
    write(m.local / "data" / "a" / ".tmp-train-00001.parquet", b"half")  # a sink still writing
    order: list[str] = []
    put = m.fs.put_file

    def recording_put(src: str, dst: str, **kw: Any) -> None:
        order.append(dst)
        put(src, dst, **kw)

    monkeypatch.setattr(m.fs, "put_file", recording_put)
    assert m.push() == 4
    rel = [p.split("/out/", 1)[1] for p in order]
    assert rel[-1] == "manifest.json"
    kinds = ["record" if r.endswith(".json") else "data" for r in rel]
    assert kinds == sorted(kinds, key=lambda k: k == "record")  # every data file before any record
    assert set(rel) == {
        "manifest.json",
        ".longloom/select-1/written/a-00000.json",
        "data/a/train-00000-of-00001.parquet",
        ".longloom/prepare-1/tokens/x.int32",
    }
    assert m.push() == 0  # nothing changed since


def test_a_rewrite_and_a_deletion_reach_the_store(store: tuple[str, Any]) -> None:
    url, fs = store
    m = storage.Mirror(url)
    write(m.local / "data" / "old.parquet", b"stale")
    write(m.local / "data" / "keep.parquet", b"v1")
    m.push()
    (m.local / "data" / "old.parquet").unlink()  # e.g. finalize removing a stale shard
    write(m.local / "data" / "keep.parquet", b"v2-longer")
    assert m.push() == 2
    root = url.removeprefix("memory://")
    assert not fs.exists(f"{root}/data/old.parquet")
    assert fs.cat_file(f"{root}/data/keep.parquet") == b"v2-longer"


def test_a_pull_fetches_what_others_stored_and_only_that(
    store: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = store
    writer = storage.Mirror(url)
    monkeypatch.setenv("LONGLOOM_SCRATCH", str(tmp_path / "other-machine"))
    reader = storage.Mirror(url)
    assert not reader.local.is_relative_to(writer.local.parent)
    write(writer.local / "a.bin", b"one")
    write(writer.local / "done" / "a.json", b"{}")
    writer.push()
    assert reader.pull() == 2
    # a process that only runs units fetches what a unit names, when it names it
    assert not (reader.local / "a.bin").exists() and reader.fetched == []
    assert reader.fetch([reader.local / "done"]) == 1 and reader.fetched == ["done/a.json"]
    assert not (reader.local / "a.bin").exists()
    # the process that merges (it holds the run's lock) mirrors everything from then on
    assert reader.fetch_all() == 1
    assert (reader.local / "a.bin").read_bytes() == b"one"
    assert reader.pull() == 0  # unchanged in the store and locally: nothing fetched again
    write(writer.local / "a.bin", b"two!")
    writer.push()
    assert reader.pull() == 1 and (reader.local / "a.bin").read_bytes() == b"two!"
    (writer.local / "a.bin").unlink()  # another process deletes a file (a stale shard)
    writer.push()
    assert reader.pull() == 1 and not (reader.local / "a.bin").exists()
    # the reader stores nothing it merely fetched
    assert reader.push() == 0


def test_local_copy_is_keyed_by_the_objects_identity(store: tuple[str, Any]) -> None:
    url, fs = store
    root = url.removeprefix("memory://")
    fs.pipe(f"{root}/src/a.jsonl", b'{"text": "x"}\n')
    first = storage.local_copy(f"{url}/src/a.jsonl")
    assert first.read_bytes() == b'{"text": "x"}\n'
    assert storage.local_copy(f"{url}/src/a.jsonl") == first  # cached
    fs.pipe(f"{root}/src/a.jsonl", b'{"text": "changed"}\n')
    second = storage.local_copy(f"{url}/src/a.jsonl")
    assert second != first and second.read_bytes() == b'{"text": "changed"}\n'
    assert storage.glob(f"{url}/src/*.jsonl") == [f"{url}/src/a.jsonl"]


def test_plain_paths_and_file_urls_stay_local(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "out")
    assert WorkDir(cfg).out == Path(cfg.output.dir)  # the code path of a plain path is unchanged
    assert not storage.is_remote(str(tmp_path)) and not storage.is_remote(f"file://{tmp_path}")
    assert storage.local_path(f"file://{tmp_path}/x") == tmp_path / "x"
    assert storage.is_remote("s3://b/k") and storage.is_remote("hf://datasets/org/name")
    assert cfg.resolve(f"file://{tmp_path}/x") == tmp_path / "x"


def test_recorded_urls_carry_no_credentials(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "out")
    url = "s3://AKIAUSER:hunter2secret@bucket/data/a.jsonl?X-Amz-Signature=abc123sig"
    recorded = input_uri(cfg, url)
    assert "hunter2secret" not in recorded and "abc123sig" not in recorded and "AKIAUSER" not in recorded
    assert recorded.startswith("s3://bucket/data/a.jsonl")


def test_an_unknown_store_fails_in_preflight_and_a_url_cache_is_checked(tmp_path: Path) -> None:
    from pipeline.build import check_stores

    with pytest.raises(storage.StorageError, match=r"^output\.dir: nosuchfs://b/out: no filesystem"):
        storage.check_store("nosuchfs://b/out", "output.dir", must_exist=False)
    cfg = make_config(tmp_path / "out")
    used = cfg.diversity.model_copy(update={"cache_dir": "nosuchfs://b/c", "embedder": "minilm"})
    with pytest.raises(ConfigError, match=r"^diversity\.cache_dir: nosuchfs://b/c: no filesystem"):
        check_stores(cfg.model_copy(update={"diversity": used}))
    # a cache on a store that answers is accepted (issue 14: caches may be URLs)
    fs = fsspec.filesystem("memory")
    fs.mkdir(bucket := f"c-{uuid.uuid4().hex[:8]}")
    ok = cfg.diversity.model_copy(update={"cache_dir": f"memory://{bucket}/emb", "embedder": "minilm"})
    check_stores(cfg.model_copy(update={"diversity": ok}))


def fresh_machine(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """What follows runs as on another machine: a scratch folder (local copies) of its own."""
    monkeypatch.setenv("LONGLOOM_SCRATCH", str(folder))


def test_keyed_caches_on_a_url_read_through_and_write_through(
    store: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rewriter responses and long-dependency scores on a URL: an entry is stored whole with one PUT
    (no temporary object), and another machine's hit fetches that one entry, once."""
    from pipeline.longdep.cache import ScoreCache
    from pipeline.synth.rewriter.cache import ResponseCache

    url, fs = store
    root = url.removeprefix("memory://")
    responses, scores = ResponseCache(f"{url}/rw"), ScoreCache(f"{url}/ld")
    for i in range(5):
        responses.put(f"{i:02d}" + "ab" * 31, {"text": f"answer {i}"})
        scores.put({"doc": i}, {"score": i / 10})
    assert responses.files is not None
    stored = fs.find(root)
    assert len(stored) == 10 and not [k for k in stored if ".tmp" in k]
    assert responses.files.puts == 5 and scores.files.puts == 5

    fresh_machine(monkeypatch, tmp_path / "machine-2")
    r2, s2 = ResponseCache(f"{url}/rw"), ScoreCache(f"{url}/ld")
    assert r2.files is not None
    assert not r2.files.local.is_relative_to(responses.files.local.parent)
    assert r2.get("03" + "ab" * 31) == {"text": "answer 3", "key": "03" + "ab" * 31}
    assert s2.get({"doc": 2}) == {"score": 0.2}
    assert r2.files.gets == 1 and s2.files.gets == 1  # one entry each, not the cache
    assert r2.get("03" + "ab" * 31) is not None and r2.files.gets == 1  # then from the local copy
    assert r2.get("ff" * 32) is None and s2.get({"doc": 99}) is None and s2.misses == 1
    # a torn entry in the store (not written by us) is a miss, not a crash
    fs.pipe(f"{root}/ld/{ScoreCache.digest({'doc': 7})[:2]}/{ScoreCache.digest({'doc': 7})}.json", b"{")
    assert s2.get({"doc": 7}) is None


def test_embedding_cache_on_a_url_fetches_keys_and_only_the_segments_hit(
    store: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from pipeline.embedders.cache import EmbeddingCache

    url, _ = store
    c = EmbeddingCache(f"{url}/emb", "k", 4, "float16")
    keys = np.array([b"%064d" % i for i in range(12)], dtype="S64")
    vecs = np.arange(48, dtype=np.float32).reshape(12, 4) / 48
    for a in range(0, 12, 4):  # three segments
        c.add(keys[a : a + 4], vecs[a : a + 4])
    fresh_machine(monkeypatch, tmp_path / "machine-2")
    c2 = EmbeddingCache(f"{url}/emb", "k", 4, "float16")
    found, got = c2.lookup(np.array([keys[5], b"x" * 64, keys[6]], dtype="S64"))
    assert found.tolist() == [True, False, True] and np.allclose(got, vecs[[5, 6]], atol=1e-3)
    assert c2.files.gets == 3 + 1  # the three key files, the vectors of the one segment hit
    assert c2.size() == 12 and c2.files.gets == 4


def test_a_killed_processs_scratch_is_removed_by_the_next(store: tuple[str, Any]) -> None:
    url, _ = store
    base = storage.scratch_root() / "mirrors"
    dead = base / f"0123456789abcdef-{2**22 + 12345}"  # no such pid (above the default pid_max)
    dead.mkdir(parents=True)
    storage.Mirror(url)
    assert not dead.exists()
    assert any(d.name.endswith(f"-{os.getpid()}") for d in base.iterdir())


def test_a_unit_on_another_machine_fetches_only_what_it_names(
    store: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14 (scale): a process that only runs units (a Dask worker) fetches a write unit's layout,
    the prepared shards its rows draw from and its own file and record, not the whole output prefix;
    and with only those it writes the same bytes."""
    from pipeline.build import run_stages
    from pipeline.stages.base import RunContext
    from pipeline.stages.write import WriteStage

    url, fs = store
    root = url.removeprefix("memory://")
    fs.mkdir(root.split("/")[0])
    small = {"shard_tokens": 65536, "row_group_tokens": 16384}
    cfg = make_config(tmp_path / "unused")
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": url, **small})})
    inputs = run_stages(cfg)
    selected, prepared = inputs["select"], inputs["prepare"]
    assert len(prepared) >= 4 and sum(p.n_shards for p in selected.targets) >= 4
    stored = fs.find(root)

    # another machine: its own scratch folder, a mirror that knows nothing yet, the run lock elsewhere
    monkeypatch.setattr(storage, "_MIRRORS", {})
    monkeypatch.setenv("LONGLOOM_SCRATCH", str(tmp_path / "worker"))
    ti, k = WriteStage().bind(RunContext(cfg), inputs).units()[-1]  # the last shard of the last target
    rel = shard_path(selected.targets[ti], k)
    original = fs.cat_file(f"{root}/{rel}")
    fs.rm_file(f"{root}/{rel}")  # the unit must write its shard again, from what it fetched
    storage.pull(url)
    job = WriteStage().bind(RunContext(cfg), inputs)
    assert not job.run_unit((ti, k)).reused
    storage.push(url)
    assert fs.cat_file(f"{root}/{rel}") == original  # the same bytes as the full run's
    m = storage.mirror(url)
    local = [p for p in m.local.rglob("*") if p.is_file()]
    assert len(local) <= len(stored) / 3, (len(local), len(stored))  # 7 of 86 files here
    fetched = m.fetched  # the log of GETs
    assert len(local) == len(fetched) + 1  # and the shard it wrote: nothing else reached this machine
    drawn = {f.rsplit("/", 1)[-1].split(".")[0] for f in fetched if "/documents/" in f}
    assert 0 < len(drawn) < len(prepared), drawn  # not every prepared shard
    assert not [f for f in fetched if f.startswith(("data/", "audit/")) or "/filtered/" in f]
