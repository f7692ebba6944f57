"""Several QA turns per long context: what the rewriter keeps, how contexts are cut, and what it costs.

Packs the bundled sample once, then runs the rewriter stage against the local OpenAI-compatible test
server (`tests/openai_server.py`, deterministic answers, no latency) with `turns_per_context` QA turns
per context in the `documents` context format, and prints: verified turns per sample, where contexts
start and how they end (`params.context_cut`), the supervised-token share (loss-mask ones over all
tokens, recounted from the written Parquet) and the stage's wall time (prompts, HTTP, validation,
token-exact assembly at full length, Parquet). The figures measure Longloom's own work around a model.

    PYTHONPATH=. python bench/bench_rewriter_turns.py [--samples 8] [--length 32768] [--turns 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from bench.bench_rewriter import packed_sample
from pipeline.core.workdir import WorkDir
from pipeline.stages.rewriter import run_rewriter
from tests.conftest import make_config
from tests.openai_server import FakeOpenAIServer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=32768, help="sample_length (contexts: the 64K rows)")
    ap.add_argument("--turns", type=int, default=6, help="turns_per_context")
    ap.add_argument("--min-turns", type=int, default=4)
    ap.add_argument("--format", choices=["documents", "plain"], default="documents")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-rewriter-turns-"))
    try:
        src, selected = packed_sample(root)
        out = root / "run"
        shutil.copytree(src / "data", out / "data")
        with FakeOpenAIServer() as srv:
            cfg = make_config(
                out,
                rewriter={
                    "enabled": True,
                    "base_url": srv.base_url,
                    "model": "fake-model",
                    "api_key_env": None,
                    "progress": False,
                    "context_target": 65536,
                    "sample_length": args.length,
                    "context_format": args.format,
                    "chunk_tokens": 256,
                    "strategies": [
                        {
                            "kind": "chunk_qa",
                            "samples": args.samples,
                            "turns_per_context": args.turns,
                            "min_turns": min(args.min_turns, args.turns),
                        }
                    ],
                },
            )
            t0 = time.perf_counter()
            res = run_rewriter(cfg, WorkDir(cfg), selected)
            seconds = time.perf_counter() - t0
        st = res.stats
        rows = [
            r
            for f in sorted((out / "data" / "rewriter").glob("*.parquet"))
            for r in pq.read_table(f).to_pylist()
        ]
        cuts: Counter[str] = Counter()
        ends: Counter[str] = Counter()
        turns = []
        sup = tot = 0
        for r in rows:
            cut = json.loads(r["params"]).get("context_cut") or {"start": "plain", "end": "word"}
            start = cut["start"] + (" inside a line" if cut.get("mid_line") else "")
            cuts[f"{start}->{cut['end']}"] += 1
            ends[cut.get("end_at", cut["end"])] += 1
            turns.append(len(r["questions"]))
            sup += int(np.sum(r["loss_mask"]))
            tot += len(r["input_ids"])
        qa = st.get("qa_turns", {})
        print(
            f"{args.samples} samples x {args.length} tokens, {args.turns} turns asked ({args.format}): "
            f"accepted {st['accepted']}/{st['requested']}, turns verified {qa.get('accepted')}/{qa.get('requested')}, "
            f"turns per kept sample min {min(turns, default=0)} mean {np.mean(turns) if turns else 0:.1f}, "
            f"turns rejected {qa.get('rejected')}"
        )
        print(
            f"context cuts (start->end): {dict(sorted(cuts.items()))}; ends at: {dict(sorted(ends.items()))}"
        )
        print(
            f"supervised tokens {sup} of {tot} ({100 * sup / max(1, tot):.2f}%), "
            f"{sup / max(1, len(rows)):.0f} per sample; stage {seconds:.1f} s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
