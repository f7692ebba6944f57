"""Benchmark of the diversity stage: prints figures, asserts nothing.

    python bench/bench_diversity.py                       # everything below (~15 min on 2 cores)
    python bench/bench_diversity.py --only embedders
    python bench/bench_diversity.py --only real --sizes 10000,100000
    python bench/bench_diversity.py --only synthetic --sizes 10000,100000,1000000

1. embedders: documents/s and chunks/s of each embedder on real text (Wikipedia leads and 192/512-token
   chunks of the bundled books), in this process.
2. real: the library run (prepare -> embed -> SemDeDup -> pack -> write) with the fast static embedder
   on a corpus of N real documents (blocks of Python files from this interpreter's standard library
   and site-packages, plus the Wikipedia sample; 5% planted lightly edited copies), a fresh embedding
   cache, one child process per size: stage seconds and the child's peak RSS.
3. synthetic: SemDeDup alone (k-means, assignment, per-cluster search, greedy pruning) and the
   similarity order on N synthetic 256-d float16 embeddings read through a memmap (topic clusters with
   5% planted near-duplicates), one child process per size: seconds and peak RSS. The 1M figure is
   synthetic embeddings, not embedded text.
Timings on a shared machine are noisy; run on a quiet one for figures to quote.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited from the parent over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- 1. embedders -----------------------------------------------------------------------------------------


def bench_embedders(minilm_chunks: int, static_chunks: int) -> None:
    from pipeline.embed import load_embedder
    from pipeline.embed_distill import sample_texts
    from pipeline.tokenizer import load_tokenizer

    texts = list(sample_texts())
    wiki = [t for t in texts if len(t) < 4000][:static_chunks]
    tok = load_tokenizer("quicktok:llama3")
    books = [t for t in texts if len(t) > 50_000]
    print("embedders (real text; chunk = pipeline tokens decoded back to text)")
    for spec, n, chunk in (("minilm", minilm_chunks, 192), ("static-minilm", static_chunks, 512)):
        emb = load_embedder(spec)
        emb.encode(wiki[:8])  # warm up
        chunks: list[str] = []
        for b in books:
            ids = tok.encode(b)
            chunks += [tok.decode(ids[a : a + chunk]) for a in range(0, len(ids) - chunk, chunk)]
            if len(chunks) >= n:
                break
        chunks = chunks[:n]
        docs = wiki[:n]
        t0 = time.perf_counter()
        emb.encode(docs)
        docs_s = len(docs) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        emb.encode(chunks)
        chunk_s = len(chunks) / (time.perf_counter() - t0)
        print(
            f"  {spec:14s} dim {emb.dim}: {docs_s:8.1f} Wikipedia leads/s ({len(docs)}), "
            f"{chunk_s:8.1f} {chunk}-token chunks/s ({len(chunks)}), {chunk_s * chunk / 1e3:7.1f}K tokens/s"
        )


# --- 2. real corpus, library run ------------------------------------------------------------------------


def code_blocks(limit: int, lines: int = 30) -> list[str]:
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    out: list[str] = []
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            rows = text.splitlines()
            for a in range(0, len(rows), lines):
                block = "\n".join(rows[a : a + lines])
                if len(block) > 200:
                    out.append(f"# {p.name}\n{block}")
                if len(out) >= limit:
                    return out
    return out


def make_corpus(n: int, path: Path) -> None:
    wiki = []
    for p in sorted((ROOT / "data/sample/wiki").glob("*.jsonl.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            wiki += [json.loads(line)["text"] for line in f]
    n_dup = n // 20
    base = wiki[: n - n_dup] + code_blocks(max(0, n - n_dup - len(wiki)))
    rng = random.Random(0)
    dups = []
    for i in rng.sample(range(len(base)), n_dup):
        words = base[i].split(" ")
        for _ in range(max(1, len(words) // 15)):
            j = rng.randrange(max(1, len(words) - 1))
            words[j : j + 2] = words[j : j + 2][::-1]
        dups.append(" ".join(words))
    docs = base + dups
    rng.shuffle(docs)
    with open(path, "w", encoding="utf-8") as f:
        for k, t in enumerate(docs):
            f.write(json.dumps({"id": f"d{k:07d}", "text": t}) + "\n")


def child_real(n: int, workdir: Path) -> dict:
    from pipeline.build import run_build
    from schemas.config import parse_config

    corpus = workdir / f"corpus-{n}.jsonl"
    if not corpus.exists():
        make_corpus(n, corpus)
    cfg = parse_config(
        {
            "sources": [{"name": "mix", "kind": "jsonl", "paths": [corpus.name], "id_field": "id"}],
            "filters": {"min_tokens": 16},
            "diversity": {
                "embedder": "static-minilm",
                "cache_dir": str(workdir / f"cache-{n}-{time.time_ns()}"),
                "progress": False,
            },
            "packing": {"strategy": "greedy", "targets": [{"length": 65536}]},
            "output": {"dir": str(workdir / f"out-{n}")},
        },
        base_dir=workdir,
    )
    t0 = time.perf_counter()
    m = run_build(cfg)
    d = m.extra["diversity"]
    return {
        "documents": m.sources["mix"].documents,
        "ok": m.ok,
        "stages": {k: v.seconds for k, v in m.stages.items()},
        "threshold": d["semdedup"]["threshold"],
        "semdedup_seconds": d["semdedup"]["seconds"],
        "clusters": d["semdedup"]["clusters"],
        "pruned": d["semdedup"]["pruned"],
        "planted": n // 20,
        "embed_docs_per_s": round(d["embedding"]["documents"] / max(d["embedding"]["seconds"], 1e-9), 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(peak_rss_mb()),
    }


# --- 3. synthetic embeddings ------------------------------------------------------------------------------


def synthetic(n: int, path: Path, dim: int = 256, seed: int = 0) -> None:
    """Topic clusters on the sphere, 5% planted near-duplicates (cosine ~0.97-0.99), float16 on disk."""
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(max(10, n // 200), dim)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    n_dup = n // 20
    block = 100_000
    for a in range(0, n, block):
        b = min(n, a + block)
        t = topics[rng.integers(0, len(topics), b - a)]
        x = t + 1.2 * rng.normal(size=(b - a, dim)).astype(np.float32)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n - n_dup, n_dup, replace=False)
    for a in range(0, n_dup, block):
        s = np.sort(src[a : a + block])
        x = out[s].astype(np.float32) + 0.012 * rng.normal(size=(len(s), dim)).astype(np.float32)
        out[n - n_dup + a : n - n_dup + a + len(s)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()


def child_synthetic(n: int, workdir: Path, order: bool) -> dict:
    from pipeline.diversity.order import interleave_runs, nn_path
    from pipeline.diversity.prune import semdedup_arrays
    from pipeline.embed import default_threshold
    from schemas.diversity import DiversityConfig

    path = workdir / f"synthetic-{n}.npy"
    x = np.load(path, mmap_mode="r")  # generated by another child: its memory is not counted here
    ntok = np.random.default_rng(1).integers(50, 5000, n)
    cfg = DiversityConfig(embedder="static-minilm")
    t0 = time.perf_counter()
    r = semdedup_arrays(x, ntok, default_threshold("static-minilm"), cfg.semdedup, cfg.index, 0)
    dedup = time.perf_counter() - t0
    planted = np.arange(n - n // 20, n)
    caught = np.isin(planted, r.dropped).sum() + np.isin(planted, r.nearest).sum()
    res = {
        "documents": n,
        "semdedup_seconds": round(dedup, 1),
        "clusters": r.clusters,
        "largest_cluster": r.largest_cluster,
        "search": r.search,
        "pruned": len(r.dropped),
        "planted": len(planted),
        "planted_pairs_resolved": int(min(caught, len(planted))),
        "peak_rss_mb_after_dedup": round(peak_rss_mb()),
    }
    if order:
        from pipeline.diversity.cluster import assign, group_bounds, kmeans

        t0 = time.perf_counter()
        c = kmeans(x, cfg.grouping.kmeans, 2)
        labels, csim = assign(x, c)
        by = np.lexsort((np.arange(n), labels))
        paths, feet = [], []
        for a, b in group_bounds(labels[by]):
            m = by[a:b]
            xm = np.asarray(x[np.sort(m)])[np.argsort(np.argsort(m))]
            paths.append(m[nn_path(xm, csim[m], cfg.grouping.neighbors, cfg.index, 0)])
            feet.append(ntok[paths[-1]] + 1)
        interleave_runs(paths, feet, 65536)
        res["similarity_order_seconds"] = round(time.perf_counter() - t0, 1)
        res["peak_rss_mb"] = round(peak_rss_mb())
    return res


# --- driver -----------------------------------------------------------------------------------------------


def run_child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False, cwd=ROOT
    )
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["embedders", "real", "synthetic"])
    p.add_argument("--sizes", default=None, help="comma-separated document counts")
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-order", action="store_true", help="synthetic: skip the similarity order")
    p.add_argument("--child", choices=["real", "synthetic", "generate"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    workdir = Path(a.workdir or Path(tempfile.gettempdir()) / "longloom-bench-diversity")
    workdir.mkdir(parents=True, exist_ok=True)
    if a.child == "real":
        print(json.dumps(child_real(a.n, workdir)))
        return
    if a.child == "generate":
        path = workdir / f"synthetic-{a.n}.npy"
        if not path.exists():
            synthetic(a.n, path)
        print(json.dumps({"path": str(path)}))
        return
    if a.child == "synthetic":
        print(json.dumps(child_synthetic(a.n, workdir, not a.no_order)))
        return
    print(
        f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} (figures are noisy under load)"
    )
    if a.only in (None, "embedders"):
        bench_embedders(minilm_chunks=128, static_chunks=4000)
    if a.only in (None, "real"):
        sizes = [int(s) for s in (a.sizes or "10000,100000").split(",")]
        print("real text, library run with static-minilm (fresh cache), one child process per size")
        for n in sizes:
            print(
                f"  {n:>9,d} documents: {json.dumps(run_child(['--child', 'real', '--n', str(n), '--workdir', str(workdir)]))}"
            )
    if a.only in (None, "synthetic"):
        sizes = [int(s) for s in (a.sizes or "10000,100000,1000000").split(",")]
        print("synthetic 256-d float16 embeddings (memmap), SemDeDup + similarity order, one child per size")
        extra = ["--no-order"] if a.no_order else []
        for n in sizes:
            run_child(["--child", "generate", "--n", str(n), "--workdir", str(workdir)])
            res = run_child(["--child", "synthetic", "--n", str(n), "--workdir", str(workdir), *extra])
            print(f"  {n:>9,d} documents: {json.dumps(res)}")


if __name__ == "__main__":
    main()
