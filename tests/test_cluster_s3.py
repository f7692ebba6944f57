"""A cluster with no shared filesystem (issue 14.4): Prefect server, Dask scheduler, two Dask workers and
an S3-compatible store, each a process of its own on 127.0.0.1.

Every process has its own cwd, HOME, TMPDIR and PREFECT_HOME; the only thing they share is the store
(moto's standalone server) and the Prefect API. Sources, output.dir and with it the work folder
(`.longloom/` under output.dir) are `s3://` URLs. Checked:

- the published files are byte-identical to an in-process run of the same config into a local folder
  (`output_digest`: shards and audit tables by sha256; the card and manifest minus the command line);
- every unit of every stage ran on a worker: the scheduler's task stream holds one finished unit task
  per unit the run report counts (17: 4 prepare, 1 select, 10 write, 1 procedural, 1 finalize), all on
  the two workers;
- worker w0 SIGKILLs itself in the middle of a write unit (LONGLOOM_FAULT, no nanny to restart it): its
  unit reruns on w1, and the store holds exactly the objects of a reference run (nothing duplicated);
- a client SIGKILLed once a write record is in the store resumes, in a new process with a new scratch
  folder, from the store: prepared shards and written shards are reused;
- the store's credentials (given to every process in its environment) are in no stored file, no
  process's folder and not in the Prefect server's database.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.opskit import free_port, kill_group, output_digest, run_cli
from tests.s3kit import (
    ACCESS_KEY,
    SECRET_KEY,
    download,
    moto_server,
    s3_config,
    s3_env,
    s3fs_for,
    upload_sources,
)
from tests.secretscan import find_secrets

pytestmark = pytest.mark.slow


def own_env(base: dict[str, str], folder: Path, **extra: str) -> dict[str, str]:
    """`base` with HOME, TMPDIR and PREFECT_HOME of the process's own, under `folder` (its cwd)."""
    for sub in ("home", "tmp", "prefect"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return {
        **base,
        "HOME": str(folder / "home"),
        "TMPDIR": str(folder / "tmp"),
        "PREFECT_HOME": str(folder / "prefect"),
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def published(folder: Path) -> set[str]:
    return {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and ".longloom" not in p.parts
    }


def test_build_on_a_dask_cluster_with_only_an_object_store(
    tmp_path: Path, prefect_server: dict[str, str]
) -> None:
    from distributed import Client, get_task_stream

    procs: list[subprocess.Popen[bytes]] = []

    def start(cmd: list[str], folder: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, *cmd],
            env=env,
            cwd=folder,
            stdout=open(folder / "log.txt", "w"),  # noqa: SIM115 (kept open for the process's lifetime)
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(p)
        return p

    with moto_server(tmp_path / "moto.log") as endpoint:
        fs = s3fs_for(endpoint)
        upload_sources(fs, "src-bucket")
        fs.mkdir("cluster")
        base = {**prefect_server, **s3_env(endpoint)}

        # the reference: the same config, in-process, into a local folder
        ref = tmp_path / "reference"
        ref_cfg = s3_config(ref, "src-bucket", out=str(ref / "out"))
        done = run_cli(["build", str(ref_cfg), "--no-prefect"], env=own_env(base, ref))
        assert done.returncode == 0, done.stderr[-3000:]
        reference = output_digest(ref / "out")

        port = free_port()
        address = f"tcp://127.0.0.1:{port}"
        try:
            sched = tmp_path / "scheduler"
            sched.mkdir()
            start(
                [
                    "-m",
                    "distributed.cli.dask_scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--no-dashboard",
                ],
                sched,
                own_env(base, sched),
            )
            workers = {}
            for i in range(2):
                folder = tmp_path / f"w{i}"
                folder.mkdir()
                # w0 dies (SIGKILL) at its 2nd row group of output; without a nanny it stays dead
                fault = {"LONGLOOM_FAULT": "write:2"} if i == 0 else {}
                workers[f"w{i}"] = start(
                    [
                        "-m",
                        "distributed.cli.dask_worker",
                        address,
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--no-nanny",
                        "--name",
                        f"w{i}",
                    ],
                    folder,
                    own_env(base, folder, **fault),
                )
            client_dir = tmp_path / "client"
            client_dir.mkdir()
            cfg = s3_config(client_dir, "src-bucket", out="s3://cluster/run")
            with Client(address, timeout=60) as client:
                client.wait_for_workers(2, timeout=120)
                names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
                with get_task_stream(client) as stream:
                    t0 = time.monotonic()
                    done = run_cli(
                        ["build", str(cfg), "--dask-address", address], env=own_env(base, client_dir)
                    )
                    seconds = time.monotonic() - t0
                assert done.returncode == 0, done.stderr[-4000:]

                # w0 is gone, by its own SIGKILL in the middle of a write unit
                assert workers["w0"].poll() == -9, (tmp_path / "w0" / "log.txt").read_text()[-3000:]
                got = download(fs, "s3://cluster/run", tmp_path / "downloaded")
                assert output_digest(got) == reference
                assert published(got) == published(ref / "out")  # no extra or duplicated object

                # every unit of every stage finished on a worker: one finished task per unit the
                # report counts (prefect-dask names them after the task function, `unit_task-<id>`)
                report = json.loads((got / "report.json").read_text())
                units = {s["stage"]: s["units"] for s in report["stages"]}
                ran = [t for t in stream.data if str(t["key"]).startswith("unit_task-")]
                assert len({t["key"] for t in ran}) == len(ran) == sum(units.values()), (len(ran), units)
                on = [names.get(t["worker"], t["worker"]) for t in ran]
                assert set(on) <= {"w0", "w1"} and "w1" in on, on

                # a client SIGKILLed mid-run resumes from the store (fresh process, fresh scratch)
                cfg2 = s3_config(tmp_path / "client2", "src-bucket", out="s3://cluster/resume")
                env2 = own_env(base, tmp_path / "client2")
                first = subprocess.Popen(
                    [sys.executable, "-m", "flows.cli", "build", str(cfg2), "--dask-address", address],
                    env=env2,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                deadline = time.monotonic() + max(180.0, 3 * seconds)
                while time.monotonic() < deadline and first.poll() is None:
                    fs.invalidate_cache()
                    if fs.exists("cluster/resume") and any(
                        "/written/" in k for k in fs.find("cluster/resume")
                    ):
                        break
                    time.sleep(0.2)
                assert first.poll() is None, "the client finished before it could be killed"
                kill_group(first)
                first.wait()
                fs.invalidate_cache()
                assert not fs.exists("cluster/resume/manifest.json")
                resumed = run_cli(
                    ["build", str(cfg2), "--dask-address", address], env=own_env(base, tmp_path / "client3")
                )
                assert resumed.returncode == 0, resumed.stderr[-4000:]
        finally:
            for p in procs:
                kill_group(p)
                p.wait()

        got2 = download(fs, "s3://cluster/resume", tmp_path / "downloaded2")
        assert output_digest(got2) == reference
        assert published(got2) == published(ref / "out")
        reused = {s["stage"]: s["reused"] for s in json.loads((got2 / "report.json").read_text())["stages"]}
        assert reused["prepare"] == 4 and reused["write"] >= 1, reused

    # the store's credentials are nowhere: not in what was stored, not in any process's folder (logs,
    # HOME, TMPDIR, Prefect home), not in the Prefect server's database (task parameters, logs)
    folders = [tmp_path / d for d in ("downloaded", "downloaded2", "scheduler", "w1", "client", "client3")]
    folders.append(Path(prefect_server["PREFECT_HOME"]))
    # w0 and the first client were SIGKILLed mid-write: their scratch folders (TMPDIR) hold half-written
    # files with no Parquet footer to read; their logs, HOME and Prefect home are scanned
    folders += [tmp_path / "w0" / d for d in ("log.txt", "home", "prefect")]
    folders += [tmp_path / "client2" / d for d in ("home", "prefect")]
    assert find_secrets(folders, [SECRET_KEY, ACCESS_KEY], {"client": done.stdout + done.stderr}) == []
