"""Helpers for the object-storage tests: a real S3-compatible server (moto's standalone server, as
s3fs's own test suite uses) in its own process on 127.0.0.1, the sample's sources uploaded to it, and
configs whose inputs and output are `s3://` URLs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import DATA, sample_dict
from tests.opskit import SMALL_OUTPUT, free_port, kill_group, save_config

# Dummy credentials: moto accepts any. The secret is distinctive, so the secret scanner can look for it.
ACCESS_KEY = "AKIALONGLOOMTESTKEY1"
SECRET_KEY = "longloom-s3-secret-Zq81vXw2"
# the sample minus its code source (kind code reads local git checkouts, not URLs)
SOURCES = {
    "wiki": "sample/wiki/*.jsonl.gz",
    "books": "sample/books/*.jsonl.zst",
    "bible": "sample/bible/*.parquet",
}


def s3_env(endpoint: str, **extra: str) -> dict[str, str]:
    """What a process needs to reach the server: endpoint and credentials, from the environment only."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        **extra,
    }


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """`python -m moto.server` on a free loopback port, in its own process group; yields its endpoint."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with log.open("w") as f:
        p = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
                break
            except OSError:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start:\n{log.read_text()}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        kill_group(p)
        p.wait(timeout=30)


@contextlib.contextmanager
def env_set(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables in this process for the duration (s3fs reads them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3fs_for(endpoint: str) -> Any:
    """An S3 filesystem of the test's own (not fsspec's cached instance), for uploads and checks."""
    import s3fs

    return s3fs.S3FileSystem(
        key=ACCESS_KEY,
        secret=SECRET_KEY,
        client_kwargs={"endpoint_url": endpoint},
        skip_instance_cache=True,
    )


def upload_sources(fs: Any, bucket: str) -> None:
    """The sample's sources to s3://bucket/src/<source>/..."""
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for name, pattern in SOURCES.items():
        for p in sorted(DATA.glob(pattern)):
            fs.put_file(str(p), f"{bucket}/src/{name}/{p.name}")


def s3_config(folder: Path, bucket: str, out: str | None = None, **overrides: Any) -> Path:
    """The sample config (no code source, one target, small shards) reading s3://bucket/src and writing
    `out` (default s3://bucket/out); saved as folder/c.yaml."""
    cfg = sample_dict()
    cfg["sources"] = [s for s in cfg["sources"] if s["name"] in SOURCES]
    for s in cfg["sources"]:
        s["paths"] = [f"s3://{bucket}/src/{s['name']}/{Path(SOURCES[s['name']]).name}"]
    cfg["packing"]["targets"] = [{"length": 16384, "weight": 1.0}]
    cfg["procedural"]["target_lengths"] = [16384]
    cfg["output"] = {**cfg["output"], **SMALL_OUTPUT, "dir": out or f"s3://{bucket}/out"}
    return save_config(folder, cfg, overrides)


def download(fs: Any, url: str, dest: Path) -> Path:
    """Every object under `url` into `dest` (what a reader of the store sees)."""
    root = url.removeprefix("s3://").rstrip("/")
    fs.invalidate_cache()
    for key in fs.find(root):
        target = dest / key[len(root) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(target))
    return dest
