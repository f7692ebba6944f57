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


def test_an_unknown_store_and_a_url_cache_fail_in_preflight(tmp_path: Path) -> None:
    from pipeline.build import check_stores

    with pytest.raises(storage.StorageError, match=r"^output\.dir: nosuchfs://b/out: no filesystem"):
        storage.check_store("nosuchfs://b/out", "output.dir", must_exist=False)
    cfg = make_config(tmp_path / "out")
    bad = cfg.model_copy(update={"diversity": cfg.diversity.model_copy(update={"cache_dir": "s3://b/c"})})
    with pytest.raises(ConfigError, match=r"diversity\.cache_dir: s3://b/c: caches on a URL"):
        check_stores(bad)


def test_a_killed_processs_scratch_is_removed_by_the_next(store: tuple[str, Any]) -> None:
    url, _ = store
    base = storage.scratch_root() / "mirrors"
    dead = base / f"0123456789abcdef-{2**22 + 12345}"  # no such pid (above the default pid_max)
    dead.mkdir(parents=True)
    storage.Mirror(url)
    assert not dead.exists()
    assert any(d.name.endswith(f"-{os.getpid()}") for d in base.iterdir())
