"""Where a `longloom build`'s seconds go, in figures that survive a loaded machine: a timeline and CPU.

    python bench/timeline.py CONFIG.yaml --output /tmp/out [--mode keep|temporary|no-prefect] [--repeats 2]

Runs the real command (`python -m flows.cli build ...`) through a small bootstrap that timestamps,
in the build's own process: the start of the interpreter, imports of `pipeline`/`flows.cli` done,
`import prefect` begun and `flows.build` imported, each stage unit's start and end (any executor:
the in-process loop, early threads, task runs), and from Prefect's log lines the flow run's start and
end; the parent adds the process's exit and its CPU seconds (user + system of the process tree, from
`getrusage(RUSAGE_CHILDREN)`; a kept server is not in the tree, its CPU is read from /proc before and after). Also counts the
flow run's task runs and log lines through the API. Phase durations are printed per repeat, and the
minimum over repeats; wall time under load stretches every phase, the CPU seconds much less.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent

BOOT = r"""
import json, os, sys, threading, time
T = {"boot": time.time()}
MARKS = []
_lock = threading.Lock()
def mark(name):
    with _lock:
        MARKS.append((name, time.time(), threading.current_thread().name))
import importlib.abc, importlib.machinery
class Watch(importlib.abc.MetaPathFinder):
    names = {"prefect", "flows.build"}
    def find_spec(self, name, path, target=None):
        if name not in self.names:
            return None
        self.names.discard(name)
        mark("import " + name + " begins")
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            mark("import " + name + " done")
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, Watch())
import flows.cli
from pipeline.stages.base import Stage
mark("cli imported")
def wrap_bind(cls):
    bind = cls.bind
    def bound(self, ctx, inputs):
        job = bind(self, ctx, inputs)
        run = job.run_unit
        def run_unit(unit, progress=None):
            mark(f"unit start {self.name} {job.label(unit)}")
            try:
                return run(unit, progress)
            finally:
                mark(f"unit end {self.name} {job.label(unit)}")
        job.run_unit = run_unit
        return job
    cls.bind = bound
from pipeline.stages.plan import STAGES
for s in STAGES:
    if "bind" in type(s).__dict__:
        wrap_bind(type(s))
code = 1
try:
    code = flows.cli.main()  # as the `longloom` command calls it (argv from sys.argv)
finally:
    mark("main returned")
    with open(os.environ["LONGLOOM_TIMELINE"], "w") as fh:
        json.dump({"boot": T["boot"], "marks": MARKS}, fh)
sys.exit(code)
"""

LOG_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) \| \w+ +\| (.*)$")


def _log_marks(stderr: str, day: datetime) -> tuple[list[tuple[str, float]], str | None]:
    """Prefect's log lines of the flow run: its start and end, wall clock; and the flow run's id."""
    marks, run_id = [], None
    for line in stderr.splitlines():
        m = LOG_TIME.match(line)
        if m:
            h, mi, s, msg = int(m[1]), int(m[2]), float(m[3]), m[4]
            t = day.replace(hour=h, minute=mi, second=0, microsecond=0).timestamp() + s
            if "Beginning flow run" in msg:
                marks.append(("flow run begins (log)", t))
            elif msg.startswith("Flow run") and "Finished in state" in msg:
                marks.append(("flow run finished (log)", t))
        found = re.search(r"/runs/flow-run/([0-9a-f-]{36})", line)
        if found:
            run_id = found[1]
    return marks, run_id


def _api(url: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def _server_cpu(home: Path) -> tuple[float, str | None]:
    try:
        record = json.loads((home / "longloom-server.json").read_text())
        p = psutil.Process(int(record["pid"]))
        procs = [p, *p.children(recursive=True)]
        return sum(sum(q.cpu_times()[:2]) for q in procs), str(record["url"])
    except (OSError, ValueError, KeyError, psutil.Error):
        return 0.0, None


def one_run(config: Path, output: Path, mode: str, env: dict[str, str], work: Path) -> dict[str, Any]:
    import shutil

    shutil.rmtree(output, ignore_errors=True)
    timeline = work / "timeline.json"
    # the marks are taken in the command's own process: a keep-mode build must not be handed to a
    # child of the warm build process (flows.warm; bench/bench_modes.py times that mode)
    env = {**env, "LONGLOOM_TIMELINE": str(timeline), "LONGLOOM_WARM_BUILD": "0"}
    args = ["build", str(config), "--output", str(output)]
    args += ["--no-prefect"] if mode == "no-prefect" else ["--prefect-server", mode]
    server_cpu0, _ = _server_cpu(Path(env["PREFECT_HOME"]))
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", BOOT, *args], env=env, cwd=env["PYTHONPATH"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    _out, err = proc.communicate()
    t_exit = time.time()
    server_cpu1, url = _server_cpu(Path(env["PREFECT_HOME"]))
    if proc.returncode != 0:
        raise RuntimeError(f"build failed ({proc.returncode}): {err[-2000:]}")
    data = json.loads(timeline.read_text())
    marks = [("process start (parent)", t0), ("interpreter up (bootstrap)", data["boot"])]
    marks += [(n, t) for n, t, _ in data["marks"]]
    log_marks, run_id = _log_marks(err, datetime.fromtimestamp(t0))
    marks += log_marks
    marks.append(("process exit (parent)", t_exit))
    marks.sort(key=lambda m: m[1])
    units = [(n, t) for n, t, _ in data["marks"] if n.startswith("unit ")]
    early = [
        th for n, _, th in data["marks"] if n.startswith("unit start") and th.startswith("longloom-early")
    ]
    res: dict[str, Any] = {
        "wall": t_exit - t0,
        "server_cpu": server_cpu1 - server_cpu0,
        "marks": [(n, t - t0) for n, t in marks],
        "first_unit_start": min(t for n, t in units if n.startswith("unit start")) - t0 if units else None,
        "last_unit_end": max(t for n, t in units if n.startswith("unit end")) - t0 if units else None,
        "units_started_early": len(early),
    }
    if run_id and url:
        flt = {"flow_runs": {"id": {"any_": [run_id]}}}
        res["task_runs"] = _api(url, "/task_runs/count", flt)
        res["flow_run_logs"] = len(_api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}}))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--mode", action="append", choices=["keep", "temporary", "no-prefect"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--home", type=Path, default=Path("/tmp/longloom-timeline-home"))
    ap.add_argument("--baseline", type=Path, help="another checkout: run its code too (interleaved)")
    args = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_API_URL")}
    env.update(PREFECT_HOME=str(args.home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    work = args.output.parent / ".timeline"
    work.mkdir(parents=True, exist_ok=True)
    codes = {"current": str(ROOT)} | ({"baseline": str(args.baseline.resolve())} if args.baseline else {})
    modes = args.mode or ["keep", "no-prefect"]
    if "keep" in modes:  # the kept server must be running before a warm run is timed
        one_run(args.config, args.output, "keep", {**env, "PYTHONPATH": str(ROOT)}, work)
    import resource

    for rep in range(args.repeats):
        for code_name, path in codes.items():
            for mode in modes:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                r = one_run(args.config, args.output, mode, {**env, "PYTHONPATH": path}, work)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                print(f"\n#{rep + 1} {code_name} {mode}: wall {r['wall']:.2f} s, CPU {cpu:.2f} s (process tree)"
                      f" + kept server {r['server_cpu']:.2f} s; load {os.getloadavg()[0]:.1f}")  # fmt: skip
                for name, t in r["marks"]:
                    print(f"  {t:7.2f}  {name}")
                first, last = r["first_unit_start"], r["last_unit_end"]
                print(f"  first unit started {first:.2f} s, last unit ended {last:.2f} s, "
                      f"{r['wall'] - last:.2f} s after it; {r['units_started_early']} units started early")  # fmt: skip
                if "task_runs" in r:
                    print(f"  task runs {r['task_runs']}, flow-run log lines {r['flow_run_logs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
