"""The warm build process (flows/warm.py, issue 19): keep-mode builds handed to a child it forks.

Real processes throughout: `python -m flows.cli build` clients with a Prefect home of their own under
the test's temporary folder, one kept Prefect server and one warm process shared by the whole module
(starting a kept server costs 10-30 s). The clients run with `-P` (no working folder on `sys.path`),
as the installed `longloom` script does: the import path, and so the warm process's fingerprint, does
not depend on the folder a build is started from.

What is checked: a build is run by a child of the warm process, whose output equals an in-process
`--no-prefect` build of the same config; the child takes the client's working folder, umask and
environment; Ctrl-C and SIGKILL of the client leave no process behind and the output resumes; a
changed fingerprint replaces the warm process; `longloom server stop` (or the kept server dying) ends
it; two builds at once; and `LONGLOOM_WARM_BUILD=0` still builds in the client itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT
from tests.opskit import kill_group, output_digest, wait_for, write_config
from tests.test_ops_kept_server import env_for, servers_of

pytestmark = pytest.mark.xdist_group("test_warm_build.py")  # one worker: the module's warm process

CLI = [sys.executable, "-P", "-m", "flows.cli"]
GRACE = "3"  # LONGLOOM_WARM_GRACE: seconds a child whose client was killed gets before its SIGKILL


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A Prefect home with a kept server and a warm process, started by a first keep-mode build.

    Its environment is taken once: every client of the module sends the same one, so they share the
    warm process (a variable that differs, such as pytest's PYTEST_CURRENT_TEST, changes the
    fingerprint and would replace it)."""
    folder = tmp_path_factory.mktemp("warm")
    home = folder / "home"
    home.mkdir()
    env = env_for(home, LONGLOOM_PREFECT_SERVER="keep", LONGLOOM_WARM_GRACE=GRACE)
    for key in ("PYTEST_CURRENT_TEST", "LONGLOOM_WARM_BUILD"):
        env.pop(key, None)
    info = {"home": home, "env": env, "folder": folder}
    try:
        first = run(["build", str(write_config(folder / "first", folder / "first" / "out"))], env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert warm_record(home) is not None, "the first keep-mode build started no warm process"
        yield info
    finally:
        cleanup(home, env)


def cleanup(home: Path, env: dict[str, str]) -> None:
    """`longloom server stop`, then kill whatever of this home is left (a leftover fails CI)."""
    with contextlib.suppress(subprocess.SubprocessError):
        subprocess.run([*CLI, "server", "stop"], env=env, cwd=ROOT, capture_output=True, timeout=120)
    for p in warm_procs(home) + servers_of(home):
        with contextlib.suppress(psutil.Error):
            for c in p.children(recursive=True):
                c.kill()
            p.kill()


def warm_procs(home: Path) -> list[psutil.Process]:
    """The warm process of `home` and every child it forked (a forked child keeps its command line)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "warm-process" in cmd and str(home) in cmd:
            found.append(p)
    return found


def warm_record(home: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((home / "longloom-warm.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def warm_pid(home: Path) -> int:
    record = warm_record(home)
    assert record is not None, "no warm process is recorded"
    assert psutil.pid_exists(int(record["pid"])), "the recorded warm process is not running"
    return int(record["pid"])


def children_of(pid: int) -> list[psutil.Process]:
    try:
        return [c for c in psutil.Process(pid).children() if c.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def run(
    args: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: float = 600, prefix: list[str] = CLI
) -> subprocess.CompletedProcess[str]:
    p = start(args, env, cwd, prefix=prefix)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        kill_group(p)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def start(
    args: list[str],
    env: dict[str, str],
    cwd: Path = ROOT,
    prefix: list[str] = CLI,
    umask: int | None = None,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.PIPE,
) -> subprocess.Popen[str]:
    """A client in a session of its own (its signals are the test's to send, only to it)."""

    def setup() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.Popen(
        [*prefix, *args],
        env=env,
        cwd=cwd,
        stdout=stdout,
        stderr=stderr,
        text=True,
        start_new_session=True,
        preexec_fn=setup,
    )


def watched(
    args: list[str],
    env: dict[str, str],
    folder: Path,
    watch: int,
    prefix: list[str] = CLI,
    timeout: float = 600,
) -> tuple[int, str, str, set[int]]:
    """Run a client to its end, its output in files (a full pipe would block it while the test polls),
    noting the children the process `watch` has meanwhile; (status, stdout, stderr, children seen)."""
    seen: set[int] = set()
    with open(folder / "client.out", "w+") as out, open(folder / "client.err", "w+") as err:
        client = start(args, env, prefix=prefix, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + timeout
            while client.poll() is None and time.monotonic() < deadline:
                seen |= {c.pid for c in children_of(watch)}
                time.sleep(0.1)
            rc = client.wait(timeout=1)
        finally:
            kill_group(client)
        out.seek(0)
        err.seek(0)
        return rc, out.read(), err.read(), seen


def imported(stderr: str) -> set[str]:
    """The modules a process imported, from its `-X importtime` lines."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def rows_by_config(out: Path) -> dict[str, int]:
    """Rows per data config, counted from the Parquet files themselves."""
    counts: dict[str, int] = {}
    for f in sorted((out / "data").glob("*/*.parquet")):
        counts[f.parent.name] = counts.get(f.parent.name, 0) + pq.ParquetFile(f).metadata.num_rows
    return counts


def assert_same_output(out: Path, reference: dict[str, Any]) -> None:
    got = output_digest(out)
    assert got["files"] == reference["files"]
    assert got["manifest"] == reference["manifest"]


def first_unit_started(out: Path) -> bool:
    """The prepare stage has written into its work folder (the build is under way)."""
    return any(p.is_file() for p in out.glob(".longloom/prepare-*/*/*"))


def wait_no_children(pid: int, timeout: float) -> None:
    wait_for(lambda: children_of(pid) == [], timeout, f"the children of the warm process {pid} to end", 0.2)


@pytest.mark.slow
def test_build_is_run_by_a_child_of_the_warm_process(
    warm: dict[str, Any], tmp_path: Path, small_shard_reference: dict[str, Any]
) -> None:
    env, home = warm["env"], warm["home"]
    pid = warm_pid(home)
    out = tmp_path / "out"
    args = ["build", str(write_config(tmp_path, out))]
    rc, stdout, stderr, seen = watched(
        args, env, tmp_path, pid, prefix=[*CLI[:2], "-X", "importtime", *CLI[2:]]
    )
    assert rc == 0, stderr[-3000:]
    assert seen, "no child of the warm process ran the build"
    assert warm_pid(home) == pid, "the warm process was replaced"
    mods = imported(stderr)
    assert "flows.warm" in mods, "no -X importtime lines from the client"
    assert not {m for m in mods if m == "prefect" or m.startswith("prefect.")}, "the client imported Prefect"
    # the child's stdout reached the client's: the flow's result, which agrees with the Parquet files
    result = json.loads(stdout[stdout.index("{") :])
    assert result["checks_ok"] is True and Path(result["output_dir"]) == out
    counted = rows_by_config(out)
    assert result["rows"] and result["rows"] == {name: counted.get(name) for name in result["rows"]}
    assert_same_output(out, small_shard_reference)


@pytest.mark.slow
def test_child_takes_the_clients_folder_umask_and_relative_paths(
    warm: dict[str, Any], tmp_path: Path
) -> None:
    env, home = warm["env"], warm["home"]
    pid = warm_pid(home)
    assert "Umask:\t0022" in Path(f"/proc/{pid}/status").read_text(), "the test needs a warm umask of 022"
    elsewhere = tmp_path / "elsewhere"
    write_config(elsewhere, elsewhere / "unused")
    client = start(["build", "c.yaml", "--output", "rel-out"], env, cwd=elsewhere, umask=0o077)
    try:
        stdout, stderr = client.communicate(timeout=600)
    finally:
        kill_group(client)
    assert client.returncode == 0, stderr[-3000:]
    assert warm_pid(home) == pid, "a build from another folder replaced the warm process"
    out = elsewhere / "rel-out"
    assert json.loads(stdout[stdout.index("{") :])["output_dir"] == "rel-out"
    assert rows_by_config(out) and not (ROOT / "rel-out").exists()
    files = [p for p in out.rglob("*") if p.is_file()]
    loose = [str(p) for p in files if p.stat().st_mode & 0o077]
    assert files and not loose, f"files written with the warm process's umask, not the client's: {loose[:5]}"


# A client whose environment differs from the warm process's in a variable the fingerprint leaves out
# (as it does PWD or COLUMNS): LONGLOOM_FAULT makes the build that reads it kill itself, so only a child
# that took the client's environment fails.
VOLATILE_CLIENT = (
    "from flows import warm\n"
    "warm.VOLATILE_ENV = warm.VOLATILE_ENV | {'LONGLOOM_FAULT'}\n"
    "from flows.cli import main\n"
    "raise SystemExit(main())\n"
)


@pytest.mark.slow
def test_child_takes_the_clients_environment(warm: dict[str, Any], tmp_path: Path) -> None:
    env, home = warm["env"], warm["home"]
    pid = warm_pid(home)
    cfg = write_config(tmp_path, tmp_path / "out")
    res = run(
        ["build", str(cfg)], {**env, "LONGLOOM_FAULT": "prepared:1"}, prefix=[*CLI[:2], "-c", VOLATILE_CLIENT]
    )
    assert warm_pid(home) == pid, "the fingerprint was meant to match: the warm process was replaced"
    assert res.returncode == 1, res.stdout[-1000:] + res.stderr[-3000:]
    assert "ended without an exit status" in res.stderr
    wait_no_children(pid, 60)


@pytest.mark.slow
def test_config_error_is_the_same_line_and_status_as_without_the_warm_process(
    warm: dict[str, Any], tmp_path: Path
) -> None:
    env, home = warm["env"], warm["home"]
    pid = warm_pid(home)
    cfg_path = write_config(tmp_path, tmp_path / "out")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["sources"][0]["paths"] = [str(tmp_path / "missing.jsonl")]
    cfg_path.write_text(yaml.safe_dump(cfg))
    handed = run(["build", str(cfg_path)], env)
    here = run(["build", str(cfg_path)], {**env, "LONGLOOM_WARM_BUILD": "0"})
    assert warm_pid(home) == pid
    errors = [line for line in handed.stderr.splitlines() if line.startswith("error:")]
    assert handed.returncode == here.returncode == 2, handed.stderr[-2000:] + here.stderr[-2000:]
    assert len(errors) == 1 and "missing.jsonl" in errors[0], handed.stderr[-2000:]
    assert errors == [line for line in here.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in handed.stderr


def interrupted_build(
    warm: dict[str, Any], tmp_path: Path, sig: int, handed: bool = True
) -> tuple[subprocess.Popen[str], int, Path, list[psutil.Process]]:
    """Start a build, wait until its first unit wrote, send `sig` to the client only."""
    env, home = warm["env"], warm["home"]
    pid = warm_pid(home)
    out = tmp_path / "out"
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = open(tmp_path / "client.err", "w")  # noqa: SIM115 (the client writes it; closed by GC)
    client = start(["build", str(write_config(tmp_path, out))], env, stdout=subprocess.DEVNULL, stderr=log)
    wait_for(lambda: first_unit_started(out) or client.poll() is not None, 300, "the first unit", 0.05)
    assert client.poll() is None, (
        "the build ended before it could be interrupted: " + (tmp_path / "client.err").read_text()[-2000:]
    )
    kids = children_of(pid)
    assert bool(kids) == handed, f"children of the warm process: {kids}"
    os.kill(client.pid, sig)
    return client, pid, out, kids


@pytest.mark.slow
def test_ctrl_c_stops_the_child_and_the_output_resumes(
    warm: dict[str, Any], tmp_path: Path, small_shard_reference: dict[str, Any]
) -> None:
    client, pid, out, kids = interrupted_build(warm, tmp_path, signal.SIGINT)
    try:
        rc = client.wait(timeout=120)
    finally:
        kill_group(client)
    err = (tmp_path / "client.err").read_text()
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    _, alive = psutil.wait_procs(kids, timeout=60)
    assert not alive, "the child outlived its interrupted client"
    wait_no_children(pid, 30)
    assert warm_pid(warm["home"]) == pid, "Ctrl-C reached the warm process"
    again = run(["build", str(tmp_path / "c.yaml")], warm["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_output(out, small_shard_reference)


@pytest.mark.slow
def test_sigkill_of_the_client_ends_the_child(
    warm: dict[str, Any], tmp_path: Path, small_shard_reference: dict[str, Any]
) -> None:
    client, pid, out, kids = interrupted_build(warm, tmp_path, signal.SIGKILL)
    try:
        client.wait(timeout=30)
    finally:
        kill_group(client)
    # the child interrupts itself when its client's socket closes, and is killed GRACE s later
    _, alive = psutil.wait_procs(kids, timeout=60 + float(GRACE))
    assert not alive, "the child of a killed client is still running"
    wait_no_children(pid, 30)
    assert warm_pid(warm["home"]) == pid
    again = run(["build", str(tmp_path / "c.yaml")], warm["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_output(out, small_shard_reference)


@pytest.mark.slow
def test_sigterm_of_the_client_ends_both_as_without_the_warm_process(
    warm: dict[str, Any], tmp_path: Path
) -> None:
    """SIGTERM kills a build process at once (no handler); the client ends the same way, as the client
    that ran the build itself does (its parent sees a death by SIGTERM, not an exit status of 1)."""
    client, pid, _, kids = interrupted_build(warm, tmp_path / "warm", signal.SIGTERM)
    try:
        rc = client.wait(timeout=120)
    finally:
        kill_group(client)
    _, alive = psutil.wait_procs(kids, timeout=60)
    assert not alive, "the child outlived the SIGTERM"
    wait_no_children(pid, 30)
    assert warm_pid(warm["home"]) == pid, "SIGTERM reached the warm process"
    off = {**warm["env"], "LONGLOOM_WARM_BUILD": "0"}
    here, _, _, _ = interrupted_build({**warm, "env": off}, tmp_path / "here", signal.SIGTERM, handed=False)
    try:
        rc_here = here.wait(timeout=120)
    finally:
        kill_group(here)
    assert rc == rc_here == -signal.SIGTERM, (tmp_path / "warm" / "client.err").read_text()[-2000:]


@pytest.mark.slow
def test_a_silent_connection_does_not_hold_up_later_builds(
    warm: dict[str, Any], tmp_path: Path, small_shard_reference: dict[str, Any]
) -> None:
    """A process that connects to the warm process and sends nothing (a client stopped or hung right
    after connecting) held up every later build for as long as it stayed connected."""
    import socket

    env, home = warm["env"], warm["home"]
    pid = warm_pid(home)
    record = warm_record(home)
    assert record is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(record["address"])
        out = tmp_path / "out"
        rc, _, stderr, seen = watched(
            ["build", str(write_config(tmp_path, out))], env, tmp_path, pid, timeout=180
        )
        assert rc == 0, stderr[-3000:]
    assert seen and "running this build in this process" not in stderr, stderr[-3000:]
    assert warm_pid(home) == pid
    assert_same_output(out, small_shard_reference)


@pytest.mark.slow
def test_two_builds_at_once_are_two_children_of_one_warm_process(
    warm: dict[str, Any], tmp_path: Path, small_shard_reference: dict[str, Any]
) -> None:
    env, home = warm["env"], warm["home"]
    pid = warm_pid(home)
    outs = [tmp_path / "a" / "out", tmp_path / "b" / "out"]
    configs = [write_config(o.parent, o) for o in outs]
    logs = [open(o.parent / "client.err", "w+") for o in outs]  # noqa: SIM115 (closed below)
    clients = [
        start(["build", str(cfg)], env, stdout=subprocess.DEVNULL, stderr=log)
        for cfg, log in zip(configs, logs, strict=True)
    ]
    most = 0
    try:
        deadline = time.monotonic() + 600
        while any(c.poll() is None for c in clients) and time.monotonic() < deadline:
            most = max(most, len(children_of(pid)))
            time.sleep(0.1)
        codes = [c.wait(timeout=1) for c in clients]
    finally:
        for c in clients:
            kill_group(c)
        for log in logs:
            log.close()
    for rc, o in zip(codes, outs, strict=True):
        assert rc == 0, (o.parent / "client.err").read_text()[-3000:]
    assert most == 2, f"at most {most} children of the warm process at once"
    assert warm_pid(home) == pid
    for o in outs:
        assert_same_output(o, small_shard_reference)


@pytest.mark.slow
def test_warm_build_off_runs_the_build_in_the_client(
    warm: dict[str, Any], tmp_path: Path, small_shard_reference: dict[str, Any]
) -> None:
    env, home = warm["env"], warm["home"]
    pid = warm_pid(home)
    out = tmp_path / "out"
    args = ["build", str(write_config(tmp_path, out))]
    off = {**env, "LONGLOOM_WARM_BUILD": "0"}
    rc, _, stderr, seen = watched(args, off, tmp_path, pid, prefix=[*CLI[:2], "-X", "importtime", *CLI[2:]])
    assert rc == 0, stderr[-3000:]
    assert not seen, "LONGLOOM_WARM_BUILD=0 still handed the build over"
    assert "prefect.flow_engine" in imported(stderr), "the client did not run the flow itself"
    assert warm_pid(home) == pid
    assert_same_output(out, small_shard_reference)


@pytest.mark.slow
def test_changed_fingerprint_replaces_the_warm_process_started_from_the_clients_folder(
    warm: dict[str, Any], tmp_path: Path
) -> None:
    """Another environment: a new warm process replaces the old one. It is started from a user's
    project with its own `pipeline/` package and still imports Longloom's, as the client does (it used
    to put the client's folder first on its path)."""
    home = warm["home"]
    old = psutil.Process(warm_pid(home))
    project = tmp_path / "project"
    (project / "pipeline").mkdir(parents=True)
    (project / "pipeline" / "__init__.py").write_text(
        "raise RuntimeError('the project folder was imported')\n"
    )
    write_config(project, project / "out")
    # a variable the warm process's imports could read: its value is part of the fingerprint
    changed = {**warm["env"], "LONGLOOM_WARM_TEST_MARK": "shadow"}
    res = run(["build", "c.yaml"], changed, cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "running this build in this process" not in res.stderr, res.stderr[-3000:]
    _, alive = psutil.wait_procs([old], timeout=30)
    assert not alive, "the warm process of the old fingerprint still runs"
    new = warm_record(home)
    assert new is not None and new["pid"] != old.pid and psutil.Process(new["pid"]).cwd() == str(project)
    assert [p.pid for p in warm_procs(home)] == [new["pid"]]


@pytest.mark.slow
def test_server_stop_ends_the_warm_process_and_so_does_the_servers_death(
    warm: dict[str, Any], tmp_path: Path
) -> None:
    env, home = warm["env"], warm["home"]
    old = psutil.Process(warm_pid(home))
    stop = run(["server", "stop"], env)
    # it stops the server first: the warm process may see that and end before it is stopped (no line)
    assert stop.returncode == 0 and "stopped the Prefect server" in stop.stdout, stop.stdout + stop.stderr
    _, alive = psutil.wait_procs([old], timeout=30)
    assert not alive and warm_procs(home) == [] and warm_record(home) is None

    # the kept server's death ends a warm process by itself: a real process recorded as the kept server
    # (a Prefect server's start-up is not what is tested here) and a new warm process beside it
    from flows.warm import find_or_start
    from pipeline.core.helpers import process_identity

    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        record = {**process_identity(psutil.Process(stand_in.pid)), "url": "http://127.0.0.1:9/api"}
        (home / "longloom-server.json").write_text(json.dumps(record))
        fresh = psutil.Process(find_or_start(home).pid)
        time.sleep(3)
        assert fresh.is_running(), "the warm process ended while its kept server ran"
        stand_in.kill()
        _, alive = psutil.wait_procs([fresh], timeout=30)
        assert not alive, "the warm process outlived the kept server"
    finally:
        stand_in.kill()
        stand_in.wait()
        for p in warm_procs(home):
            with contextlib.suppress(psutil.Error):
                p.kill()


def _later(folder: Path) -> None:
    """Move the folder's mtime a second on, as a new entry in it would (not within one clock tick)."""
    st = folder.stat()
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_fingerprint_follows_package_folders_not_other_folders_on_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new file in a source checkout or working folder on `sys.path` (an output folder, pytest's
    cache) used to replace the warm process; a package installed into site-packages must still."""
    from flows import warm as warm_module

    checkout, packages = tmp_path / "checkout", tmp_path / "venv" / "site-packages"
    checkout.mkdir()
    packages.mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(checkout), str(packages), *sys.path])
    env = {"LONGLOOM_X": "1"}
    before = warm_module.fingerprint(env)
    (checkout / "out").mkdir()
    _later(checkout)
    assert warm_module.fingerprint(env) == before
    (packages / "newpkg").mkdir()
    _later(packages)
    assert warm_module.fingerprint(env) != before


def test_fingerprint_ignores_a_terminals_own_variables_not_others() -> None:
    """Another terminal window or SSH session must not replace the warm process; any variable the
    imports might read must."""
    from flows import warm as warm_module

    env = {"HOME": "/home/u", "TERM": "xterm-256color", "WINDOWID": "1", "SSH_CONNECTION": "a 1 b 22"}
    before = warm_module.fingerprint(env)
    assert warm_module.fingerprint({**env, "WINDOWID": "2", "SSH_CONNECTION": "c 2 b 22"}) == before
    assert warm_module.fingerprint({**env, "TERM": "dumb"}) != before
    assert warm_module.fingerprint({**env, "HF_HOME": "/data/hf"}) != before
