"""The rebuild command a run records (manifest, card, report): runnable elsewhere, no local paths."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import ROOT
from tests.opskit import base_env, run_cli, write_config


def git_commit() -> str | None:
    """The checkout's commit as git itself reports it (the reference for what the card records)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if sha.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "HEAD", "--quiet"], capture_output=True, text=True
    ).returncode
    return sha.stdout.strip() + ("+local changes" if dirty else "")


def check_recorded_command(out: Path, private: Path, config_ref: str) -> None:
    command = json.loads((out / "manifest.json").read_text())["command"]
    lines = command.splitlines()
    assert lines[-1] == f"longloom build {config_ref} --output {out.name}"
    commit = git_commit()
    if commit is not None:
        assert lines[0] == f"# Longloom git commit {commit}"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert command in card  # the card's "Rebuilding it" shows it
    for name in ("manifest.json", "README.md", "report.json"):
        text = (out / name).read_text(encoding="utf-8")
        # neither the command nor the config reference carries this machine's folder
        assert f"build {private}" not in text and f"{private}/" + "c.yaml" not in text, name
        assert "deployment longloom-build-file" not in text, name


def test_cli_build_from_an_absolute_config_records_a_portable_command(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "configs", out)
    done = run_cli(["build", str(cfg), "--output", str(out), "--no-prefect"], env=base_env())
    assert done.returncode == 0, done.stderr[-3000:]
    check_recorded_command(out, tmp_path, "configs/c.yaml")


def test_deployment_run_records_a_portable_command(tmp_path: Path, prefect_harness: None) -> None:
    from flows.deploy import build_from_file, deployment_parameters

    out = tmp_path / "nightly"
    cfg = write_config(tmp_path / "elsewhere" / "cfg", tmp_path / "ignored")
    # what a schedule stores (absolute paths), run as the deployment runs it
    params = deployment_parameters(str(cfg), str(out))
    assert Path(params["config_path"]).is_absolute()
    result = build_from_file(**params)
    assert result["checks_ok"]
    check_recorded_command(out, tmp_path, "elsewhere/cfg/c.yaml")
