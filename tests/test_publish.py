"""Publishing to a local hub-compatible server (tests/hub_server.py) and loading the dataset back.

The command line runs in a subprocess with a clean environment (HF_ENDPOINT pointing at the test
hub, a random HF_TOKEN, HF_HUB_DISABLE_XET=1, HF_HOME inside tmp_path), so every file it writes
and every line it prints can be searched for the token afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.core.parquet_io import sha256_file
from pipeline.output.card import split_front_matter
from schemas.config import BuildConfig
from schemas.manifest import Manifest
from tests.conftest import ROOT, make_config
from tests.hub_server import HubServer, regular

REPO = "longloom-org/sample"


@pytest.fixture(scope="module")
def built(sample_build_without_procedural: tuple[BuildConfig, Manifest]) -> Path:
    """The session's build of the sample with procedural samples off (conftest); read-only, so the
    `out` fixture below copies it."""
    cfg, manifest = sample_build_without_procedural
    assert manifest.ok
    return Path(cfg.output.dir)


@pytest.fixture
def token() -> str:
    return "hf_" + secrets.token_hex(16)


@pytest.fixture
def out(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built output, .longloom/ work folder included (it must never be uploaded)."""
    dst = tmp_path / "out"
    shutil.copytree(built, dst)
    assert any((dst / ".longloom").rglob("*.parquet"))
    return dst


class Cli:
    """Runs `python -m flows.cli ...` against a hub; keeps everything it printed."""

    def __init__(self, hub: HubServer, home: Path, token: str | None) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        self.env.update(
            HF_ENDPOINT=hub.url,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HOME=str(home),
            PYTHONPATH=str(ROOT),
        )
        if token is not None:
            self.env["HF_TOKEN"] = token
        self.printed: list[str] = []

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=self.env, capture_output=True, text=True
        )
        self.printed += [proc.stdout, proc.stderr]
        return proc

    def python(self, code: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=self.env, capture_output=True, text=True
        )
        self.printed += [proc.stdout, proc.stderr]
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout


def expected_files(out: Path) -> dict[str, str]:
    """repo path -> sha256 of what a publish must upload: manifest-listed tables, card, images, manifest."""
    m = Manifest.model_validate_json((out / "manifest.json").read_text())
    paths = [e.path for t in m.targets for e in t.shards]
    paths += [e.path for files in m.audit.values() for e in files]
    paths += ["README.md", "manifest.json"] + [
        str(p.relative_to(out)) for p in (out / "images").glob("*.png")
    ]
    return {p: sha256_file(out / p) for p in paths}


def assert_token_nowhere(token: str, roots: list[Path], printed: list[str]) -> int:
    """The token is in no file under `roots` and in nothing printed; returns how many files were read."""
    needle = token.encode()
    n = 0
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                assert needle not in p.read_bytes(), f"token written to {p}"
                n += 1
    for text in printed:
        assert token not in text
    return n


def rows_digest(rows: list[dict[str, Any]]) -> str:
    blob = json.dumps(rows, sort_keys=True, default=lambda o: o.hex() if isinstance(o, bytes) else str(o))
    return hashlib.sha256(blob.encode()).hexdigest()


LOAD_BACK = """
import hashlib, json, datasets
out = {}
for config in CONFIGS:
    ds = datasets.load_dataset(REPO, config, split="train")
    rows = ds.to_list()
    blob = json.dumps(rows, sort_keys=True, default=lambda o: o.hex() if isinstance(o, bytes) else str(o))
    out[config] = [len(rows), hashlib.sha256(blob.encode()).hexdigest()]
out["(default)"] = datasets.load_dataset(REPO, split="train").num_rows
print(json.dumps(out))
"""


# --- publish, then load back through HF_ENDPOINT ---------------------------------------------------------


@pytest.mark.slow
def test_dry_run_publish_and_load_back_identical_rows(out: Path, tmp_path: Path, token: str) -> None:
    with HubServer(token) as hub:
        cli = Cli(hub, tmp_path / "hf_home", token)
        want = expected_files(out)

        dry = cli.run("publish", str(out), "--repo-id", REPO, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "repo would be created" in dry.stdout and "dry run: nothing uploaded" in dry.stdout
        listed = {line.split()[1] for line in dry.stdout.splitlines() if line.startswith("  add")}
        assert listed == set(want)
        assert not hub.repos and not hub.lfs_uploads()  # a dry run changes nothing

        pub = cli.run("publish", str(out), "--repo-id", REPO)
        assert pub.returncode == 0, pub.stderr
        assert "repo created" in pub.stdout and "committed" in pub.stdout
        tree = hub.files(REPO)
        assert set(tree) == set(want) | {".gitattributes"}
        assert not any(".longloom" in p for p in tree)
        for path, sha in want.items():
            assert hashlib.sha256(hub.content(tree[path])).hexdigest() == sha, path
        lfs = {p for p, b in tree.items() if b.lfs_oid}
        assert lfs == {p for p in want if p.endswith((".parquet", ".png"))}
        assert len(hub.commits()) == 1  # everything in one commit

        meta, _ = split_front_matter((out / "README.md").read_text())
        configs = [c["config_name"] for c in meta["configs"]]
        code = LOAD_BACK.replace("CONFIGS", repr(configs)).replace("REPO", repr(REPO))
        loaded = json.loads(cli.python(code).strip().splitlines()[-1])
        for entry in meta["configs"]:
            files = sorted((out / entry["data_files"][0]["path"]).parent.glob("*.parquet"))
            rows = [r for f in files for r in pq.read_table(f).to_pylist()]
            assert loaded[entry["config_name"]] == [len(rows), rows_digest(rows)], entry["config_name"]
        m = Manifest.model_validate_json((out / "manifest.json").read_text())
        assert loaded["(default)"] == m.targets[0].rows
        downloaded = {
            r.path.split("/resolve/", 1)[1].split("/", 1)[1]
            for r in hub.requests
            if r.method == "GET" and "/resolve/" in r.path and r.status in (200, 206)
        }
        assert {p for p in want if p.endswith(".parquet") and "quarantine" not in p} | {
            "README.md"
        } <= downloaded

    read = assert_token_nowhere(token, [tmp_path], cli.printed)
    assert read > 20  # output folder, HF_HOME cache of the loaded dataset


def test_republish_uploads_only_what_changed(out: Path, tmp_path: Path, token: str) -> None:
    with HubServer(token) as hub:
        cli = Cli(hub, tmp_path / "hf_home", token)
        assert cli.run("publish", str(out), "--repo-id", REPO).returncode == 0
        first_uploads = len(hub.lfs_uploads())
        n_requests = len(hub.requests)

        # nothing changed: no upload, no preupload, no commit
        again = cli.run("publish", str(out), "--repo-id", REPO)
        assert again.returncode == 0 and "nothing changed: no commit" in again.stdout
        later = hub.requests[n_requests:]
        assert not [
            r for r in later if r.method in ("PUT",) or "/preupload/" in r.path or "/commit/" in r.path
        ]
        assert len(hub.commits()) == 1

        # one regular file changed: only it is committed
        with open(out / "README.md", "a") as f:
            f.write("\nA note added by hand.\n")
        one = cli.run("publish", str(out), "--repo-id", REPO)
        assert one.returncode == 0, one.stderr
        assert hub.commits()[-1] == {"files": ["README.md"], "lfs": [], "deleted": []}
        assert len(hub.lfs_uploads()) == first_uploads

        # one LFS file changed (the audit table rewritten, the card regenerated): one upload
        m = Manifest.model_validate_json((out / "manifest.json").read_text())
        entry = m.audit["filtered"][0]
        table = pq.read_table(out / entry.path)
        pq.write_table(table, out / entry.path, compression="gzip")
        entry.sha256, entry.bytes = sha256_file(out / entry.path), (out / entry.path).stat().st_size
        (out / "manifest.json").write_text(m.model_dump_json())
        assert cli.run("card", str(out)).returncode == 0
        lfs_one = cli.run("publish", str(out), "--repo-id", REPO)
        assert lfs_one.returncode == 0, lfs_one.stderr
        last = hub.commits()[-1]
        assert last["lfs"] == [entry.path] and sorted(last["files"]) == ["README.md", "manifest.json"]
        assert hub.lfs_uploads()[first_uploads:] == [entry.sha256]

        # a shard on the hub that this run did not write is deleted (configs glob their folder)
        repo = hub.repos[("dataset", REPO)]
        stale = "data/pretrain_16384/train-00001-of-00002.parquet"
        tree = dict(repo.trees[repo.branches["main"]])
        tree[stale] = regular(b"old shard")
        hub._commit(repo, "main", tree, "left over from an earlier run")
        dry = cli.run("publish", str(out), "--repo-id", REPO, "--dry-run")
        assert f"  delete    {stale}" in dry.stdout
        cleaned = cli.run("publish", str(out), "--repo-id", REPO)
        assert cleaned.returncode == 0
        assert hub.commits()[-1] == {"files": [], "lfs": [], "deleted": [stale]}
        assert ".gitattributes" in hub.files(REPO)  # files outside data/, audit/, images/ are left alone

    assert_token_nowhere(token, [tmp_path], cli.printed)


def test_publish_refuses_what_it_should(out: Path, tmp_path: Path, token: str) -> None:
    with HubServer(token) as hub:
        no_token = Cli(hub, tmp_path / "hf_home", None)
        proc = no_token.run("publish", str(out), "--repo-id", REPO)
        assert proc.returncode == 2 and "set HF_TOKEN" in proc.stderr and not hub.repos

        wrong = Cli(hub, tmp_path / "hf_home", "hf_wrong_" + secrets.token_hex(8))
        proc = wrong.run("publish", str(out), "--repo-id", REPO)
        assert proc.returncode == 2 and "error:" in proc.stderr and not hub.repos
        assert wrong.env["HF_TOKEN"] not in proc.stderr + proc.stdout

        cli = Cli(hub, tmp_path / "hf_home", token)
        assert cli.run("publish", str(out), "--repo-id", "not-a-repo-id").returncode == 2

        shard = next((out / "data/pretrain_65536").glob("*.parquet"))
        original = shard.read_bytes()
        shard.write_bytes(original[:-10] + b"0123456789")
        proc = cli.run("publish", str(out), "--repo-id", REPO)
        assert proc.returncode == 2 and str(shard) in proc.stderr and "rebuild" in proc.stderr
        shard.write_bytes(original)

        readme = (out / "README.md").read_text()
        (out / "README.md").write_text(readme.replace("config_name: pretrain_65536", "config_name: other"))
        proc = cli.run("publish", str(out), "--repo-id", REPO)
        assert proc.returncode == 2 and "longloom card" in proc.stderr
        (out / "README.md").write_text(readme)

        m = Manifest.model_validate_json((out / "manifest.json").read_text())
        m.checks[0].ok = False
        (out / "manifest.json").write_text(m.model_dump_json())
        proc = cli.run("publish", str(out), "--repo-id", REPO)
        assert proc.returncode == 2 and "--allow-failed-checks" in proc.stderr
        assert not hub.lfs_uploads()

    assert_token_nowhere(token, [tmp_path], no_token.printed + wrong.printed + cli.printed)


# --- the publish stage closes the flow -------------------------------------------------------------------


@pytest.mark.slow
def test_flow_publish_stage(
    tmp_path: Path, token: str, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from huggingface_hub import constants
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.build import build, task_runner_for

    with HubServer(token) as hub:
        # conftest switches the hub client offline for every other test; this one talks to 127.0.0.1
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        cfg = make_config(
            tmp_path / "out",
            procedural={"enabled": False},
            publish={"enabled": True, "repo_id": REPO, "private": True},
        )
        state = build.with_options(task_runner=task_runner_for(cfg))(cfg, return_state=True)
        assert state.is_completed(), state
        result = state.result()
        published = result["published"]
        assert published["commit"] == hub.repos[("dataset", REPO)].branches["main"]
        assert set(published["uploaded"]) == set(expected_files(tmp_path / "out"))
        assert hub.repos[("dataset", REPO)].private
        body = split_front_matter((tmp_path / "out/README.md").read_text())[1]
        assert f'load_dataset("{REPO}", "pretrain_16384"' in body  # the card names the repo it goes to

        async def logs() -> list[str]:
            async with get_client() as client:
                got = await client.read_logs(
                    log_filter=LogFilter(
                        flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
                    )
                )
                return [g.message for g in got]

        deadline = time.monotonic() + 30
        messages = asyncio.run(logs())
        while not any("files to upload" in msg for msg in messages):  # logs reach the API in batches
            assert time.monotonic() < deadline, "the publish task's log never reached the Prefect API"
            time.sleep(0.5)
            messages = asyncio.run(logs())
    assert_token_nowhere(token, [tmp_path], messages)


# --- issue 11.8: publish.include_audit, and no documented config field without a reader -----------------


def test_include_audit_false_keeps_the_audit_tables_home(out: Path, tmp_path: Path, token: str) -> None:
    with HubServer(token) as hub:
        cli = Cli(hub, tmp_path / "hf_home", token)
        local_readme = (out / "README.md").read_bytes()
        proc = cli.run("publish", str(out), "--repo-id", REPO, "--no-include-audit")
        assert proc.returncode == 0, proc.stderr
        tree = hub.files(REPO)
        assert not [p for p in tree if p.startswith("audit/")]
        meta, body = split_front_matter(hub.content(tree["README.md"]).decode())
        assert not [c for c in meta["configs"] if c["config_name"].startswith("audit_")]
        assert "not part of this repository" in body
        assert (out / "README.md").read_bytes() == local_readme  # the local card is left alone

        # the config's own setting is honoured too (here written into the run's manifest), and the
        # audit files a previous publish uploaded are deleted from the hub's head
        assert cli.run("publish", str(out), "--repo-id", REPO, "--include-audit").returncode == 0
        assert [p for p in hub.files(REPO) if p.startswith("audit/")]
        m = Manifest.model_validate_json((out / "manifest.json").read_text())
        m.config["publish"] = {**m.config.get("publish", {}), "include_audit": False}
        (out / "manifest.json").write_text(m.model_dump_json())
        proc = cli.run("publish", str(out), "--repo-id", REPO)
        assert proc.returncode == 0, proc.stderr
        assert not [p for p in hub.files(REPO) if p.startswith("audit/")]
        assert "  delete    audit/quarantine/" in proc.stdout  # raw input bytes leave the hub's head
        assert not [
            x for x in proc.stdout.splitlines() if x.startswith(("  add", "  update")) and "audit/" in x
        ]


def test_every_documented_config_field_has_a_reader() -> None:
    """Each field `longloom schema` lists is read somewhere in pipeline/ or flows/ (attribute access,
    a constant key of a dumped section, or getattr with a constant name): a documented field can
    never again be silently ignored, as publish.include_audit was."""
    import ast

    from schemas.config import BuildConfig

    schema = json.loads(
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "schema"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    fields: dict[str, set[str]] = {}
    for model, spec in [("BuildConfig", schema), *schema.get("$defs", {}).items()]:
        for f in spec.get("properties", {}):
            fields.setdefault(f, set()).add(model)
    assert "include_audit" in fields and len(fields) > 100
    assert set(BuildConfig.model_fields) <= set(fields)

    read: set[str] = set()
    for path in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):  # cfg.publish.include_audit
                read.add(node.attr)
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):  # section["field"]
                read.add(str(node.slice.value))
            elif isinstance(node, ast.Call) and node.args:
                func, args = node.func, node.args
                if (
                    isinstance(func, ast.Attribute)
                    and func.attr in ("get", "pop")
                    and isinstance(args[0], ast.Constant)
                ):
                    read.add(str(args[0].value))  # section.get("field")
                elif (
                    isinstance(func, ast.Name)
                    and func.id == "getattr"
                    and len(args) > 1
                    and isinstance(args[1], ast.Constant)
                ):
                    read.add(str(args[1].value))  # getattr(section, "field")
    dead = {f: sorted(models) for f, models in fields.items() if f not in read}
    assert not dead, f"config fields nothing reads: {dead}"


# --- issue 12.27-29: the card's figures, the repo id and the endpoint are checked before anything goes up --


def test_hand_edited_figures_are_refused(out: Path, tmp_path: Path, token: str) -> None:
    with HubServer(token) as hub:
        cli = Cli(hub, tmp_path / "hf_home", token)
        readme = (out / "README.md").read_text()
        m = Manifest.model_validate_json((out / "manifest.json").read_text())
        rows = m.targets[0].rows
        name = m.targets[0].config_name
        line = next(
            x for x in readme.splitlines() if x.startswith(f"| `{name}` | packed pretraining rows | {rows} |")
        )
        edited = readme.replace(line, line.replace(f"| {rows} |", f"| {rows * 100:,} |", 1))
        assert edited != readme
        (out / "README.md").write_text(edited)
        proc = cli.run("publish", str(out), "--repo-id", REPO)
        assert proc.returncode == 2
        err = proc.stderr.strip()
        assert len(err.splitlines()) == 1 and f"{rows * 100:,}" in err and "longloom card" in err, err
        assert not hub.repos and not hub.lfs_uploads()

        # the YAML's row count is a figure too
        meta_edit = readme.replace(f"num_examples: {rows}\n", f"num_examples: {rows * 100}\n", 1)
        assert meta_edit != readme
        (out / "README.md").write_text(meta_edit)
        proc = cli.run("publish", str(out), "--repo-id", REPO)
        assert proc.returncode == 2 and "dataset_info" in proc.stderr and not hub.repos

        # prose added by hand is fine
        (out / "README.md").write_text(readme + "\nA note added by hand.\n")
        assert cli.run("publish", str(out), "--repo-id", REPO, "--dry-run").returncode == 0


BAD_REPO_IDS = ["org/name--x", "org/name..x", "org/name.", "org/name.git", "org/" + "n" * 97]


@pytest.mark.parametrize("repo_id", BAD_REPO_IDS)
def test_repo_ids_the_hub_refuses_are_refused_here(
    out: Path, tmp_path: Path, token: str, repo_id: str
) -> None:
    from schemas.config import ConfigError

    with pytest.raises(ConfigError, match=r"publish\.repo_id"):
        make_config(out, publish={"repo_id": repo_id})
    with HubServer(token) as hub:
        cli = Cli(hub, tmp_path / "hf_home", token)
        for extra in (["--dry-run"], []):
            proc = cli.run("publish", str(out), "--repo-id", repo_id, *extra)
            assert proc.returncode == 2, (extra, proc.stdout)
            assert repo_id in proc.stderr and "reach" not in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1
        assert not hub.requests


def test_unreachable_endpoint_fails_at_once_in_one_line(out: Path, tmp_path: Path, token: str) -> None:
    """Issue 12.29: one attempt, one line; no back-off retries printed for a dead HF_ENDPOINT."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    accepted: list[int] = []

    def serve() -> None:  # accepts and hangs up at once: no HTTP answer ever comes
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    with HubServer(token) as hub:
        cli = Cli(hub, tmp_path / "hf_home", token)
        cli.env["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
        proc = cli.run("publish", str(out), "--repo-id", REPO)
    server.close()
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot reach the hub" in err[0] and "HF_ENDPOINT" in err[0], proc.stderr
    assert "Retrying" not in proc.stderr and len(accepted) == 1

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there now: connection refused
    cli.env["HF_ENDPOINT"] = f"http://127.0.0.1:{dead_port}"
    proc = cli.run("publish", str(out), "--repo-id", REPO)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    dry = cli.run("publish", str(out), "--repo-id", REPO, "--dry-run")
    assert dry.returncode == 0 and "could not be reached" in dry.stdout and "Retrying" not in dry.stderr

    # credentials inside HF_ENDPOINT are used, never shown: the one line names the host without them
    cli.env["HF_ENDPOINT"] = f"http://hubuser:hub-pass-1234@127.0.0.1:{dead_port}/?token=tok-5678"
    proc = cli.run("publish", str(out), "--repo-id", REPO)
    assert proc.returncode == 2 and f"127.0.0.1:{dead_port}" in proc.stderr
    assert "hub-pass-1234" not in proc.stderr + proc.stdout and "tok-5678" not in proc.stderr + proc.stdout
