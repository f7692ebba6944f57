"""Packing fill and cut quality on real and synthetic document lengths (prints figures, asserts nothing).

    python bench/bench_packing.py [--lengths 16384 65536] [--min-piece 64]

Document lengths (footprints: tokens + 1 separator) come from
- stdlib: every *.py file of the running interpreter's standard library, tokenized with the bundled
  Llama-3 vocabulary (`quicktok:llama3`), one file per document (real code lengths);
- web-like: 200,000 lognormal lengths (median ~245 tokens, long tail), seed 7.
For each packer it prints rows, the padding fraction of all row tokens, documents cut, documents
that fit in a row but were cut more than once, pieces under the minimum (of cut documents whose
footprint is at least the minimum) and the packing time. Run against an older checkout (its
packers take no `min_piece`) to get "before" figures.
"""

from __future__ import annotations

import argparse
import inspect
import sysconfig
import time
from pathlib import Path

import numpy as np

from pipeline.core.packing import Layout, pack_best_fit, pack_greedy


def stdlib_footprints() -> np.ndarray:
    from pipeline.core.tokenizer import load_tokenizer

    tok = load_tokenizer("quicktok:llama3")
    texts = []
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = p.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text:
            texts.append(text)
    return np.asarray(tok.count_batch(texts), np.int64) + 1


def web_footprints() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.lognormal(5.5, 1.2, 200_000).astype(np.int64) + 2


def report(name: str, lay: Layout, fp: np.ndarray, L: int, m: int, seconds: float) -> None:
    counts = np.bincount(lay.item, minlength=len(fp))
    fits = fp <= L
    size = lay.end - lay.start
    small = int(((size < m) & (counts[lay.item] > 1) & (fp[lay.item] >= m)).sum())
    pad = int(lay.n_pad.sum())
    print(
        f"  {name:9s} rows {lay.n_rows:6d}  padding {pad / max(1, lay.n_rows * L):8.4%}"
        f" ({pad} tokens, {pad - int(lay.n_pad[-1])} outside the last row)"
        f"  cut {len(lay.split_items()):6d}  fit-but-cut>1 {int((fits & (counts > 2)).sum()):5d}"
        f"  pieces<{m} {small:5d}  {seconds:6.2f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--min-piece", type=int, default=64)
    args = ap.parse_args()
    takes_min = "min_piece" in inspect.signature(pack_best_fit).parameters
    kw = {"min_piece": args.min_piece} if takes_min else {}
    print(f"packers: {'with' if takes_min else 'without'} min_piece")
    for corpus, fp in (("stdlib", stdlib_footprints()), ("web-like", web_footprints())):
        print(f"{corpus}: {len(fp)} documents, {int(fp.sum())} footprint tokens, median {int(np.median(fp))}")
        for L in args.lengths:
            print(f" rows of {L}")
            for name, fn in (("greedy", pack_greedy), ("best_fit", pack_best_fit)):
                t = time.perf_counter()
                lay = fn(fp, L, "pad", **kw)
                report(name, lay, fp, L, args.min_piece, time.perf_counter() - t)


if __name__ == "__main__":
    main()
