"""Secrets are sent where they belong and written nowhere (issue 11, items 5, 6, 7 and 9).

Three places a user puts a key: the config (`rewriter.api_key`), the environment (`api_key_env`) and
the endpoint URL (`?key=...`). Each test runs real code against the local OpenAI-compatible server,
checks what the server received, and scans everything the run wrote with `tests.secretscan`.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.synth.rewriter.cache import ResponseCache
from pipeline.synth.rewriter.client import RequestBudget, RewriterClient
from pipeline.synth.rewriter.secrets import Redactor
from schemas.config import ConfigError, load_config, with_overrides
from schemas.redact import redact_url, url_secrets
from schemas.synthesis import RewriterConfig
from tests.conftest import DATA, ROOT, make_config, sample_dict
from tests.openai_server import FakeOpenAIServer, FaultRule
from tests.secretscan import assert_no_secrets, find_secrets
from tests.test_rewriter import _requests, rewriter_section

KEY_CFG = "sk-cfg-0a1b2c3d4e5f6a7b"
KEY_ENV = "sk-env-9f8e7d6c5b4a3f2e"
KEY_URL = "urlkey-5e6f7a8b9c0d1e2f"


def write_config(tmp: Path, rewriter: dict[str, Any]) -> Path:
    """The bundled sample (without the procedural stage) with this rewriter section, as a YAML file."""
    data = sample_dict()
    for s in data["sources"]:
        s["paths"] = [str(DATA / p) for p in s["paths"]]
    data["procedural"] = {"enabled": False}
    data["rewriter"] = rewriter
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "LONGLOOM_"))}
    env.update(PYTHONPATH=str(ROOT), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(extra)
    return env


# --- the scanner itself ---------------------------------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_scanner_finds_secrets_that_a_byte_grep_misses(tmp_path: Path) -> None:
    secret = "sk-hidden-31415926535"
    pq.write_table(  # deflate codes literals with Huffman codes: the bytes never show the text
        pa.table({"t": [f"row {i}: {secret}" for i in range(200)]}),
        tmp_path / "a.parquet",
        compression="gzip",
        use_dictionary=False,
        write_statistics=False,
    )
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(secret.encode()))
    png += _png_chunk(b"IEND", b"")
    (tmp_path / "b.png").write_bytes(png)
    (tmp_path / "c.json.gz").write_bytes(gzip.compress(secret.encode()))
    con = sqlite3.connect(tmp_path / "d.db")
    con.execute("create table log (message blob)")
    con.execute("insert into log values (?)", (zlib.compress(b"x") + secret.encode(),))
    con.commit()
    con.close()
    (tmp_path / "clean.txt").write_text("nothing here")
    for name in ("a.parquet", "b.png", "c.json.gz"):
        assert secret.encode() not in (tmp_path / name).read_bytes()  # only decoding finds these
    found = find_secrets([tmp_path], [secret], {"log": f"...{secret}..."})
    where = {f.split(" (")[0].split("/")[-1].split(":")[0] for f in found}
    assert where == {"a.parquet", "b.png", "c.json.gz", "d.db", "log"}, found


# --- item 5: a key in the config is sent ----------------------------------------------------------------


def test_with_overrides_keeps_the_key() -> None:
    cfg = make_config(Path("/tmp/x"), rewriter={"enabled": False, "api_key": KEY_CFG})
    again = with_overrides(with_overrides(cfg, "output", dir="/tmp/y"), "run", workers=3)
    assert again.rewriter.api_key is not None and again.rewriter.api_key.get_secret_value() == KEY_CFG
    assert again.output.dir == "/tmp/y" and again.run.workers == 3


def test_build_sends_the_config_key_and_url_key(tmp_path: Path) -> None:
    """`longloom build --no-prefect --output ...` (overrides applied) with the key in the config and
    one in the URL: the server gets both, and neither is written anywhere or printed."""
    with FakeOpenAIServer(api_key=KEY_CFG, faults=[FaultRule("<passage>", ["echo_key"], claim=1)]) as srv:
        section = rewriter_section(
            f"{srv.base_url}?api-version=2024-06-01&key={KEY_URL}",
            api_key=KEY_CFG,
            api_key_env=None,
            strategies=[{"kind": "chunk_qa", "samples": 4}],
        )
        cfg_path = write_config(tmp_path, section)
        out = tmp_path / "out"
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "build", str(cfg_path), "--no-prefect", "--output", str(out)],
            cwd=ROOT,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        calls = list(srv.calls)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(calls) == 4
    assert {c.authorization for c in calls} == {f"Bearer {KEY_CFG}"}
    for c in calls:
        parts = urlsplit(c.path)
        assert parts.path == "/v1/chat/completions"
        assert parse_qs(parts.query) == {"api-version": ["2024-06-01"], "key": [KEY_URL]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["rewriter"]["accepted"] == 4
    recorded = manifest["config"]["rewriter"]["base_url"]
    assert recorded == f"{srv.base_url}?api-version=2024-06-01&key=***"
    assert "HTTP Request: POST" in proc.stderr  # httpx's line is there, with the key masked
    assert_no_secrets([out], [KEY_CFG, KEY_URL], {"stdout": proc.stdout, "stderr": proc.stderr})


# --- item 6: credentials in the URL ---------------------------------------------------------------------


def test_userinfo_in_the_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as err:
        make_config(
            Path("/tmp/x"),
            rewriter={"enabled": False, "base_url": "http://bob:hunter2-pass@127.0.0.1:9/v1"},
        )
    msg = str(err.value)
    assert (
        "rewriter.base_url" in msg and "credentials in the URL (user:password@host) are not supported" in msg
    )
    assert "hunter2-pass" not in msg and "bob" not in msg


def test_recorded_urls_lose_their_credentials() -> None:
    url = "https://api.example.com/v1/?api-version=2&key=K1&X-Amz-Signature=S2&access_token=T3&sig=a%2Fb"
    assert redact_url(url) == (
        "https://api.example.com/v1/?api-version=2&key=***&X-Amz-Signature=***&access_token=***&sig=***"
    )
    assert redact_url("https://u:p@h:8443/v1") == "https://h:8443/v1"
    assert set(url_secrets(url)) >= {"K1", "S2", "T3", "a/b", "a%2Fb"}
    assert "2" not in url_secrets(url)  # api-version is not a secret
    cfg = make_config(Path("/tmp/x"), rewriter={"enabled": False, "base_url": url})
    assert cfg.rewriter.base_url == url  # the request still gets every parameter
    dumped = json.dumps(cfg.model_dump(mode="json"))
    assert not {"K1", "S2", "T3", "a%2Fb"} & set(
        dumped.replace('"', " ").replace("=", " ").replace("&", " ").split()
    )
    assert "key=***" in dumped


# --- item 7: the response cache -------------------------------------------------------------------------


def test_an_echoed_key_never_reaches_the_cache(tmp_path: Path) -> None:
    reqs = _requests(3)
    url_cfg = {"base_url": ""}
    with FakeOpenAIServer(api_key=KEY_ENV, faults=[FaultRule(None, ["echo_key"])]) as srv:
        url_cfg["base_url"] = f"{srv.base_url}?key={KEY_URL}"
        rw = RewriterConfig(
            base_url=url_cfg["base_url"], model="fake-model", timeout_seconds=5, max_attempts=2
        )

        def complete() -> list[Any]:
            client = RewriterClient(
                rw,
                KEY_ENV,
                ResponseCache(tmp_path / "cache"),
                RequestBudget(None),
                Redactor([KEY_ENV, KEY_URL]),
            )

            async def go() -> list[Any]:
                async with client:
                    return list(await asyncio.gather(*(client.complete(r) for r in reqs)))

            return asyncio.run(go())

        first = complete()
        second = complete()
        calls = list(srv.calls)
    assert len(calls) == 3 and {c.authorization for c in calls} == {
        f"Bearer {KEY_ENV}"
    }  # the real key went out
    assert all(r.ok and "received Bearer ***" in (r.content or "") for r in first)
    assert all(r.cached for r in second) and [r.content for r in second] == [r.content for r in first]
    assert any((tmp_path / "cache").rglob("*.json"))
    assert_no_secrets([tmp_path / "cache"], [KEY_ENV, KEY_URL])


# --- item 9: everything a Prefect run writes ------------------------------------------------------------


@pytest.mark.slow
def test_prefect_run_writes_no_secret_anywhere(tmp_path: Path) -> None:
    """`longloom build` through Prefect (its own PREFECT_HOME, httpx and openai loggers sent to the
    Prefect API) with a key in the config, another in the environment and a third in the URL: the
    output folder with its caches, Parquet values, PNG chunks, PREFECT_HOME (database, logs) and the
    console hold none of them."""
    home = tmp_path / "prefect-home"
    faults = [FaultRule("<passage>", ["echo_key"], claim=2), FaultRule("<passage>", ["500", "ok"], claim=1)]
    with FakeOpenAIServer(api_key=KEY_ENV, faults=faults) as srv:
        section = rewriter_section(
            f"{srv.base_url}?key={KEY_URL}",
            api_key=KEY_CFG,
            contexts_per_task=2,
            strategies=[{"kind": "chunk_qa", "samples": 4}, {"kind": "multi_hop", "samples": 2}],
        )
        cfg_path = write_config(tmp_path, section)
        out = tmp_path / "out"
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "build", str(cfg_path), "--output", str(out)],
            cwd=ROOT,
            env=cli_env(
                PREFECT_HOME=str(home),
                LONGLOOM_REWRITER_API_KEY=KEY_ENV,
                PREFECT_LOGGING_EXTRA_LOGGERS="httpx,httpx2,openai",
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
            ),
            capture_output=True,
            text=True,
            timeout=900,
        )
        calls = list(srv.calls)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {c.authorization for c in calls} == {f"Bearer {KEY_ENV}"}
    assert all(parse_qs(urlsplit(c.path).query) == {"key": [KEY_URL]} for c in calls)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["rewriter"]["accepted"] == 6
    # the scan covers what it claims to cover
    assert (out / ".longloom" / "rewriter-cache").is_dir() and any(out.rglob("*.png"))
    assert (home / "prefect.db").is_file()
    con = sqlite3.connect(home / "prefect.db")
    logged = " ".join(str(r[0]) for r in con.execute("select message from log"))
    parameters = " ".join(str(r[0]) for r in con.execute("select parameters from flow_run"))
    con.close()
    assert "rewriter batch" in logged  # task logs reached the database
    assert "key=***" in parameters  # and so did the config, with its URL masked
    assert load_config(cfg_path).rewriter.api_key is not None  # the key was in the config file
    assert_no_secrets(
        [out, home], [KEY_CFG, KEY_ENV, KEY_URL], {"stdout": proc.stdout, "stderr": proc.stderr}
    )
