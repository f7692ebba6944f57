"""Time and peak memory of `longloom export` on a finished output folder.

    python bench/bench_export.py out/sample --repeats 3
    python bench/bench_export.py out/sample --with-boundaries
    python bench/bench_export.py out/sample --replicate 20   # the shards copied 20 times over

Each measurement runs in its own child process: first one that only imports megatron-core, torch and
the export module (the fixed cost every export pays), then the export itself into a temporary folder. Printed per run:
wall seconds, tokens per second, and the child's peak RSS (the kernel's high-water mark), beside the
Parquet bytes of the output and the decoded size of its largest row group: the export holds one row
group at a time, so its memory above the import baseline should follow the latter, not the former.
`--replicate N` exports a copy of the folder whose every config lists each shard N times (hard-linked
files under new names, the manifest rewritten to match): N times the data, the same row groups.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

_IMPORT_ONLY = """
import json, resource, time, warnings
t = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import megatron.core.datasets.indexed_dataset  # noqa: F401
import pipeline.output.export  # noqa: F401
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

_EXPORT = """
import json, resource, sys, time, warnings
from pathlib import Path
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import megatron.core.datasets.indexed_dataset  # noqa: F401
from pipeline.output.export import export
t = time.perf_counter()
res = export(Path(sys.argv[1]), Path(sys.argv[2]), "megatron", with_boundaries=sys.argv[3] == "1")
print(json.dumps({"seconds": time.perf_counter() - t,
                  "tokens": sum(c.tokens for c in res.configs),
                  "rows": sum(c.rows for c in res.configs),
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def child(code: str, *args: str) -> dict[str, float]:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=root, capture_output=True, text=True, check=True
    )
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def replicate(src: Path, dest: Path, n: int) -> Path:
    """A copy of the output folder `src` in which every config lists each of its shards `n` times."""
    manifest = json.loads((src / "manifest.json").read_text(encoding="utf-8"))

    def copies(entries: list[dict[str, object]]) -> list[dict[str, object]]:
        out = []
        for k in range(n):
            for e in entries:
                rel = Path(str(e["path"]))
                new = rel.with_name(f"r{k:04d}-{rel.name}")
                (dest / new).parent.mkdir(parents=True, exist_ok=True)
                os.link(src / rel, dest / new)
                out.append({**e, "path": str(new)})
        return out

    for t in manifest["targets"]:
        t["shards"] = copies(t["shards"])
    manifest["extra_configs"] = {k: copies(v) for k, v in manifest["extra_configs"].items()}
    (dest / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output_dir", type=Path)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--with-boundaries", action="store_true")
    ap.add_argument("--replicate", type=int, default=1, help="list every shard this many times")
    args = ap.parse_args()
    if args.replicate > 1:
        scratch = tempfile.TemporaryDirectory()
        args.output_dir = replicate(args.output_dir, Path(scratch.name), args.replicate)
    files = sorted((args.output_dir / "data").rglob("*.parquet"))
    parquet_bytes = sum(p.stat().st_size for p in files)
    largest = 0
    for p in files:
        pf = pq.ParquetFile(p)
        for i in range(pf.num_row_groups):
            largest = max(largest, pf.read_row_group(i).nbytes)
    print(
        f"{args.output_dir}: {len(files)} Parquet files, {parquet_bytes / 1e6:.1f} MB; "
        f"largest row group decoded {largest / 1e6:.1f} MB; boundaries={args.with_boundaries}"
    )
    base = child(_IMPORT_ONLY)
    print(f"imports only: {base['seconds']:.1f} s, peak RSS {base['peak_rss_kb'] / 1024:.0f} MB")
    for k in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            r = child(
                _EXPORT, str(args.output_dir), str(Path(tmp) / "x"), "1" if args.with_boundaries else "0"
            )
        print(
            f"run {k + 1}: export {r['rows']:.0f} rows, {r['tokens'] / 1e6:.2f} M tokens in {r['seconds']:.2f} s "
            f"({r['tokens'] / r['seconds'] / 1e6:.1f} M tok/s); peak RSS {r['peak_rss_kb'] / 1024:.0f} MB "
            f"({(r['peak_rss_kb'] - base['peak_rss_kb']) / 1024:+.0f} MB over the import)"
        )


if __name__ == "__main__":
    main()
