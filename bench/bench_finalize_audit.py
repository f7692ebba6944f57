"""Finalize's audit merge at scale: the one-process merge against one unit per audit file (prints figures).

    python bench/bench_finalize_audit.py --rows 2000000 8000000

Finalize merges the per-shard `filtered` tables into `audit/filtered/` files of AUDIT_ROWS_PER_FILE
(1M) rows and recounts their (source, reason) rows for the reconciliation checks. Before issue 14 one
process did all of it (`merge_audit` + `audit_counts` over every file); now each audit file is a unit
(`plan_audit` from the footers, then `write_audit_part` + `audit_counts` of its own file, on any worker)
and the merge only adds the units' small results.

The per-shard tables are synthesized once per size under --work (FILTERED_SCHEMA rows: doc ids, 64-hex
content hashes, reasons from four filters, shards of --shard-rows rows). Each variant runs as a child
process (`--child`) whose peak RSS is sampled every 20 ms (psutil); the units run one after the other,
each in its own child, so the figure per unit is what a worker taking that unit needs. Printed per size:
the one-process merge (wall time, peak RSS), the plan (footers only), and the units (count, wall time
of the slowest, sum, peak RSS of the largest). The two ways are also checked to write the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 2**20
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
REASONS = ["too_short", "exact_duplicate", "budget", "language"]


def _hex64(rng: np.random.Generator, n: int) -> pa.Array:
    raw = rng.integers(0, 16, size=(n, 64), dtype=np.uint8)
    chars = _HEX[raw].reshape(-1)
    offsets = np.arange(0, 64 * n + 1, 64, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes()))


def make_shards(folder: Path, rows: int, shard_rows: int) -> list[str]:
    """Per-shard filtered tables of `rows` rows in all (relative paths), made once per size."""
    from schemas.records import FILTERED_SCHEMA

    done = folder / "done.json"
    if done.exists():
        return list(json.loads(done.read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    rels: list[str] = []
    for i, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        ids = np.arange(start, start + n)
        reason = pa.array(np.array(REASONS)[rng.integers(0, len(REASONS), n)])
        t = pa.table(
            {
                "source": pa.array(np.where(ids % 3 == 0, "code", "web")),
                "uri": pa.array([f"s3://corpus/shard-{i:05d}.jsonl.gz"] * n),
                "record": pa.array(ids - start),
                "doc_id": pa.array(np.char.add("doc-", ids.astype(str))),
                "content_hash": _hex64(rng, n),
                "n_tokens": pa.array(rng.integers(1, 5000, n)),
                "step": pa.array(np.char.add(np.array(reason.to_pylist(), dtype=str), "@1")),
                "reason": reason,
                "detail": pa.array(np.char.add("dropped by rule ", (ids % 97).astype(str))),
                "duplicate_of": pa.nulls(n, pa.string()),
            },
            schema=FILTERED_SCHEMA,
        )
        rel = f"shards/filtered-{i:05d}.parquet"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, folder / rel, compression="zstd", row_group_size=65_536)
        rels.append(rel)
    done.write_text(json.dumps(rels))
    return rels


def child(args: argparse.Namespace) -> None:
    """One measured variant, in this (child) process; prints one JSON line."""
    from pipeline.output.audit import audit_counts, merge_audit, plan_audit, write_audit_part
    from schemas.records import FILTERED_SCHEMA

    folder = Path(args.folder)
    out = Path(args.out)
    rels = json.loads((folder / "done.json").read_text())
    t0 = time.perf_counter()
    if args.child == "one-process":
        entries = merge_audit(out, "filtered", FILTERED_SCHEMA, [folder / r for r in rels], 1)
        counts = audit_counts(out, entries)
        result: Any = {"files": [e.sha256 for e in entries], "rows": sum(counts.values())}
    elif args.child == "plan":
        parts = plan_audit(out, "filtered", [folder / r for r in rels])
        result = {"parts": len(parts)}
    else:  # one unit: audit file --part
        part = plan_audit(out, "filtered", [folder / r for r in rels])[args.part]
        entry = write_audit_part(out, part, FILTERED_SCHEMA, 1)
        result = {"sha256": entry.sha256, "rows": sum(audit_counts(out, [entry]).values())}
    print(json.dumps({"seconds": time.perf_counter() - t0, **result}))


def run_child(args: list[str]) -> dict[str, Any]:
    """Run a variant as a child process; its result plus its peak RSS (sampled every 20 ms)."""
    p = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    proc = psutil.Process(p.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, _ = p.communicate()
    stop.set()
    th.join()
    if p.returncode:
        raise SystemExit(f"child {args} failed ({p.returncode})")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_mib": peak / MIB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 8_000_000])
    ap.add_argument("--shard-rows", type=int, default=100_000, help="rows per per-shard table")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "longloom-bench-finalize")
    ap.add_argument("--child", choices=["one-process", "plan", "unit"])
    ap.add_argument("--part", type=int, default=0)
    ap.add_argument("--folder")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for rows in args.rows:
        folder = args.work / f"rows-{rows}"
        make_shards(folder, rows, args.shard_rows)
        common = ["--folder", str(folder)]
        one_out = args.work / "one"
        shutil.rmtree(one_out, ignore_errors=True)
        one = run_child(["--child", "one-process", *common, "--out", str(one_out)])
        plan = run_child(["--child", "plan", *common, "--out", str(one_out)])
        unit_out = args.work / "units"
        shutil.rmtree(unit_out, ignore_errors=True)
        units = [
            run_child(["--child", "unit", "--part", str(k), *common, "--out", str(unit_out)])
            for k in range(plan["parts"])
        ]
        same = [u["sha256"] for u in units] == one["files"]
        print(
            f"{rows:>11,} rows ({-(-rows // args.shard_rows)} shards): one process {one['seconds']:.1f} s, "
            f"peak {one['peak_mib']:.0f} MiB | plan {plan['seconds']:.2f} s | {len(units)} units: slowest "
            f"{max(u['seconds'] for u in units):.1f} s, sum {sum(u['seconds'] for u in units):.1f} s, "
            f"peak {max(u['peak_mib'] for u in units):.0f} MiB | same bytes: {same}"
        )
        shutil.rmtree(one_out, ignore_errors=True)
        shutil.rmtree(unit_out, ignore_errors=True)


if __name__ == "__main__":
    main()
