"""SemDeDup alone on a finished run's stored vectors: seconds and peak RSS, without the lexical check.

    python bench/bench_semdedup_vectors.py OUTPUT_DIR [--threshold 0.97]

Reads every `embed-*/*.npy` under OUTPUT_DIR/.longloom (the embed stage's float16 vectors), runs
`semdedup_arrays` with the default SemDeDup settings (boundary guests on, `keep: longest` with equal
lengths) and prints pruned documents, guests, seconds and the process's peak RSS before and after.
Separates the memory of clustering, the guest search and the candidate pairs from the rest of a build.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def main() -> None:
    from pipeline.corpus.semantic.prune import semdedup_arrays
    from schemas.diversity import DiversityConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("output_dir", type=Path)
    ap.add_argument("--threshold", type=float, default=0.97)
    a = ap.parse_args()
    files = sorted((a.output_dir / ".longloom").glob("embed-*/*.npy"))
    if not files:
        raise SystemExit(f"{a.output_dir}/.longloom/embed-*/*.npy: no stored vectors (run with diversity on)")
    x = np.concatenate([np.load(f, mmap_mode="r") for f in files])
    print(f"{len(x):,} vectors {x.shape[1]}-d {x.dtype}; peak RSS after loading {peak_mb():,} MB", flush=True)
    d = DiversityConfig(embedder="static-tokens")
    t = time.perf_counter()
    r = semdedup_arrays(x, np.ones(len(x), np.int64), a.threshold, d.semdedup, d.index, 0)
    print(
        f"pruned {len(r.dropped):,}, guests {r.guests:,}, largest cluster {r.largest_cluster:,}, "
        f"{time.perf_counter() - t:.1f} s, peak RSS {peak_mb():,} MB"
    )


if __name__ == "__main__":
    main()
