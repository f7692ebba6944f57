"""The select stage at corpus scale: wall time and peak RSS at 1M, 5M, 20M documents (prints figures).

    python bench/bench_select_scale.py --docs 1000000 5000000 20000000
    python bench/bench_select_scale.py --docs 1000000 --partitions 1 8 --strategy greedy

Selection reads only small per-document columns, so its cost can be measured without text or tokens:
the prepare stage's outputs are synthesized (per shard a documents Parquet file with the columns
`load_doc_index` and the drop table read, and a `PrepareResult` record), then the select stage runs
alone in a child process. The synthetic corpus: two sources (`web`, `code`), shards of 500k documents,
lognormal lengths (median ~245 tokens, long tail, as bench/bench_packing.py's web-like lengths),
5% of documents exact copies of an earlier document's text (same sha256), and a token budget on
`web` at 80% of its tokens so the budget step drops documents too. Diversity is off.

Each variant runs as `python bench/bench_select_scale.py --child ...`; its peak RSS is sampled every
20 ms (psutil, the child's own process: selection starts no helpers). `partitions 1` is today's
single-process `select_and_layout`; `partitions P > 1` runs the partitioned path
(`pipeline.corpus.partition`): one scatter unit per shard, then P dedup units, one after the other,
each in its own child measured for its own peak RSS (the memory a worker taking that unit needs),
and the final layout pass (the merge). The corpus is
generated once per size under --work and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 2**20
SHARD_DOCS = 500_000
DUP_RATE = 0.05
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def config_dict(out: Path, strategy: str, partitions: int, web_budget: int | None) -> dict[str, Any]:
    return {
        # select_partitions only when asked: the "before" code has no such setting
        "run": {
            "name": "bench-select",
            "seed": 0,
            **({"select_partitions": partitions} if partitions > 1 else {}),
        },
        "sources": [
            {"name": "web", "kind": "jsonl", "paths": ["web-*.jsonl"], "token_budget": web_budget},
            {"name": "code", "kind": "jsonl", "paths": ["code-*.jsonl"]},
        ],
        "packing": {"strategy": strategy, "targets": [{"length": 65536}], "last_row": "pad"},
        "output": {"dir": str(out), "store_text": False},
    }


def hex_rows(raw: np.ndarray) -> list[str]:
    """64-character lowercase hex of each 32-byte row, vectorized (bytes.hex per row is slow at 20M)."""
    nib = np.empty((len(raw), 64), np.uint8)
    nib[:, 0::2] = _HEX[raw >> 4]
    nib[:, 1::2] = _HEX[raw & 15]
    return nib.view("S64").ravel().astype(str).tolist()


def synthesize(folder: Path, n_docs: int) -> dict[str, Any]:
    """Documents files and PrepareResult records of a synthetic prepared corpus; returns its facts."""
    import pyarrow as pa

    from pipeline.core.parquet_io import ParquetSink
    from pipeline.stages.prepare import PrepareResult
    from schemas.records import DOC_SCHEMA

    facts_file = folder / "facts.json"
    if facts_file.is_file():
        return dict(json.loads(facts_file.read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "documents").mkdir(parents=True)
    rng = np.random.default_rng(1234)
    n_shards = -(-n_docs // SHARD_DOCS)
    # a pool of earlier texts copies are drawn from (bounded: the generator stays small at 20M)
    pool = np.zeros((0, 32), np.uint8)
    records, web_tokens, dups = [], 0, 0
    for si in range(n_shards):
        n = min(SHARD_DOCS, n_docs - si * SHARD_DOCS)
        source = "code" if si % 4 == 3 else "web"
        raw = rng.integers(0, 256, (n, 32), dtype=np.uint8)
        copy = rng.random(n) < DUP_RATE
        if len(pool):
            raw[copy] = pool[rng.integers(0, len(pool), int(copy.sum()))]
            dups += int(copy.sum())
        else:  # first shard: copies of its own earlier rows
            src_rows = (rng.random(n) * np.arange(n)).astype(np.int64)
            raw[copy] = raw[src_rows[copy]]
        pool = np.concatenate([pool, raw[rng.random(n) < 0.02]])[-200_000:]
        n_tokens = rng.lognormal(5.5, 1.2, n).astype(np.int64) + 1
        if source == "web":
            web_tokens += int(n_tokens.sum())
        shard_id = f"{source}-{si:05d}"
        rows = np.arange(n)
        table = pa.table(
            {
                "source": pa.array([source] * n, pa.string()),
                "uri": pa.array([f"{source}-{si:05d}.jsonl"] * n, pa.string()),
                "record": pa.array(rows + 1),
                "doc_id": pa.array([f"{source}/{si}/{r}" for r in range(n)], pa.string()),
                "content_hash": pa.array(hex_rows(raw), pa.string()),
                "n_chars": pa.array(n_tokens * 4),
                "n_bytes": pa.array(n_tokens * 4),
                "n_tokens": pa.array(n_tokens),
                "token_start": pa.array(np.cumsum(n_tokens) - n_tokens),
            },
            schema=DOC_SCHEMA,
        )
        rel = f"documents/{shard_id}.parquet"
        with ParquetSink(folder / rel, DOC_SCHEMA) as sink:
            sink.write(table)
        res = PrepareResult(
            shard_id=shard_id, source=source, uri=f"{shard_id}.jsonl", revision=None, input_bytes=0,
            records_read=n, quarantined={}, documents=n, tokens_read=int(n_tokens.sum()), filtered={},
            filtered_tokens={}, kept=n, kept_tokens=int(n_tokens.sum()), files={"documents": rel},
            sha256={"documents": sink.sha256 or ""},
        )  # fmt: skip
        records.append(res.to_json())
        print(f"  synthesized shard {si + 1}/{n_shards}", end="\r", flush=True)
    facts = {"docs": n_docs, "shards": n_shards, "copies": dups, "web_tokens": web_tokens}
    (folder / "prepared.json").write_text(json.dumps(records))
    facts_file.write_text(json.dumps(facts))
    print()
    return facts


def child(payload: dict[str, Any]) -> None:
    """Run the select stage (mode `single`), one partition unit (`unit`) or the merge (`merge`) on a
    synthesized corpus; print one JSON line of what it did."""
    from pipeline.core.workdir import WorkDir
    from pipeline.corpus.partition import (
        PartitionResult,
        ScatterResult,
        dedup_partition,
        part_dir,
        scatter_dir,
        scatter_shard,
        select_partitioned,
    )
    from pipeline.stages.plan import select
    from pipeline.stages.prepare import PrepareResult
    from pipeline.stages.select import inputs_key
    from schemas.config import parse_config

    corpus = Path(payload["corpus"])
    out = Path(payload["out"])
    cfg = parse_config(
        config_dict(out, payload["strategy"], payload["partitions"], payload["web_budget"]),
        base_dir=corpus,
        origin="bench",
        default_output=str(out),
    )
    work = WorkDir(cfg)
    # the prepare stage's folder is keyed by config sections: link the synthetic one in
    work.prepare_dir.parent.mkdir(parents=True, exist_ok=True)
    if not work.prepare_dir.exists():
        work.prepare_dir.symlink_to(corpus.resolve(), target_is_directory=True)
    prepared = [PrepareResult.from_json(r) for r in json.loads((corpus / "prepared.json").read_text())]
    t0 = time.perf_counter()
    began = time.time()  # wall clock, comparable across the units run at one time
    if payload["mode"] == "scatter":
        s = scatter_shard(cfg, work, prepared, payload["unit"])
        print(
            json.dumps(
                {"seconds": time.perf_counter() - t0, "documents": s.documents, "span": [began, time.time()]}
            )
        )
        return
    if payload["mode"] == "unit":
        P = cfg.run.select_partitions
        recs = sorted(scatter_dir(work, P).glob("s*.json"))
        scattered = [ScatterResult(**json.loads(f.read_text())) for f in recs]
        u = dedup_partition(cfg, work, prepared, payload["unit"], inputs_key(prepared), scattered)
        print(
            json.dumps(
                {"seconds": time.perf_counter() - t0, "documents": u.documents, "span": [began, time.time()]}
            )
        )
        return
    if payload["mode"] == "merge":
        folder = part_dir(work, cfg.run.select_partitions)
        units = [PartitionResult(**json.loads(f.read_text())) for f in sorted(folder.glob("part-*.json"))]
        res = select_partitioned(cfg, work, prepared, units)
    else:
        res = select(cfg, work, prepared)
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rows": sum(t.n_rows for t in res.targets),
                "layouts": [t.layout_sha256 for t in res.targets],
                "filtered": res.filtered_sha256,
                "dropped": {s: sum(r.values()) for s, r in res.filtered.items()},
            }
        )
    )


def measure(cmd: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                peak = max(peak, p.memory_info().rss)
            done.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    code = proc.wait()
    done.set()
    thread.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}")
    r = dict(json.loads(out.strip().splitlines()[-1]))
    r["peak"] = peak
    r["wall"] = time.perf_counter() - started  # seen from outside: the child's start-up included
    return r


def span(results: list[dict[str, Any]]) -> float:
    """Seconds from the first unit's start to the last unit's end (0 for none)."""
    if not results:
        return 0.0
    return max(r["span"][1] for r in results) - min(r["span"][0] for r in results)


def measure_all(cmds: list[list[str]], workers: int) -> tuple[list[dict[str, Any]], float]:
    """Run the units' commands `workers` at a time (as that many Dask workers would); their results in
    order, and the phase's wall time from the first start to the last end."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(measure, cmds))
    return results, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000])
    ap.add_argument(
        "--partitions",
        type=int,
        nargs="+",
        default=[1, 0],
        help="1: today's single process; P > 1: P partition units and the merge; 0: P = docs / --per-partition",
    )
    ap.add_argument("--per-partition", type=int, default=1_000_000, help="documents per partition for 0")
    ap.add_argument("--strategy", default="best_fit", choices=["best_fit", "greedy"])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "longloom-bench-select")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="units run this many at a time (as on that many workers); peak RSS stays per unit",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    rows = []
    for n in args.docs:
        corpus = args.work / f"corpus-{n}"
        t0 = time.perf_counter()
        facts = synthesize(corpus, n)
        print(f"{n:,} documents in {facts['shards']} shards ({time.perf_counter() - t0:.0f} s to synthesize)")
        for p in args.partitions:
            p = p or max(2, -(-n // args.per_partition))
            out = args.work / f"out-{n}-{p}"
            shutil.rmtree(out, ignore_errors=True)
            payload = {
                "corpus": str(corpus), "out": str(out), "strategy": args.strategy, "partitions": p,
                "web_budget": int(facts["web_tokens"] * 0.8), "mode": "single" if p == 1 else "merge",
            }  # fmt: skip
            load = os.getloadavg()[0]
            scatters, scatter_wall = measure_all(
                [
                    [*me, json.dumps({**payload, "mode": "scatter", "unit": s})]
                    for s in range(facts["shards"] if p > 1 else 0)
                ],
                args.workers,
            )
            units, units_wall = measure_all(
                [[*me, json.dumps({**payload, "mode": "unit", "unit": u})] for u in range(p if p > 1 else 0)],
                args.workers,
            )
            r = measure([*me, json.dumps(payload)])
            r["units"], r["scatters"] = units, scatters
            r["elapsed"] = scatter_wall + units_wall + r["wall"]
            # the same without the children's start-ups (long-lived workers have none): from the first
            # unit's start to the last one's end in each phase, then the merge
            r["work_elapsed"] = span(scatters) + span(units) + r["seconds"]
            r["load_after"] = os.getloadavg()[0]
            unit_s = sum(u["seconds"] for u in units)
            unit_peak = max((u["peak"] for u in units), default=0)
            if scatters:
                print(
                    f"  partitions {p}: scatter {sum(u['seconds'] for u in scatters):.1f} s in all "
                    f"({max(u['seconds'] for u in scatters):.1f} s longest, largest peak "
                    f"{max(u['peak'] for u in scatters) / MIB:,.0f} MiB)",
                    flush=True,
                )
            print(
                f"  partitions {p}: units {unit_s:.1f} s in all, {max((u['seconds'] for u in units), default=0):.1f} s "
                f"longest (largest peak {unit_peak / MIB:,.0f} MiB), "
                f"{'merge' if p > 1 else 'select'} {r['seconds']:.1f} s (peak {r['peak'] / MIB:,.0f} MiB), "
                f"{r['rows']} rows, dropped {r['dropped']}, layout {r['layouts'][0][:12]}, "
                f"filtered {r['filtered'][:12]}; load {load:.1f}",
                flush=True,
            )
            rows.append((n, p, r, load))
            shutil.rmtree(out, ignore_errors=True)
    print(f"\nselect stage, {args.strategy}, exact dedup + source budget, diversity off:\n")
    print(
        "| documents | partitions | scatter: wall s (sum) | scatter: peak RSS (largest) "
        "| units: wall s (sum) | units: peak RSS (largest) "
        "| merge/select: wall s | merge/select: peak RSS | total wall s "
        f"| elapsed s, {args.workers} at a time (without / with process start-ups) | load (start, end) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cells(us: list[dict[str, Any]]) -> tuple[str, str]:
        if not us:
            return "—", "—"
        return f"{sum(u['seconds'] for u in us):.1f}", f"{max(u['peak'] for u in us) / MIB:,.0f} MiB"

    for n, p, r, load in rows:
        sc_s, sc_peak = cells(r["scatters"])
        unit_s, unit_peak = cells(r["units"])
        total = sum(u["seconds"] for u in r["units"] + r["scatters"]) + r["seconds"]
        print(
            f"| {n:,} | {p if p > 1 else '1 (single process)'} | {sc_s} | {sc_peak} | {unit_s} | {unit_peak} "
            f"| {r['seconds']:.1f} | {r['peak'] / MIB:,.0f} MiB | {total:.1f} "
            f"| {r['work_elapsed']:.1f} / {r['elapsed']:.1f} "
            f"| {load:.1f}, {r['load_after']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
