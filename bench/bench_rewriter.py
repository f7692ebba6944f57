"""Rewriter throughput against the local OpenAI-compatible test server, at several concurrencies.

Packs the bundled sample once, then runs the rewriter stage (prompts, HTTP through the real `openai`
client, validation, token-exact assembly, Parquet) with an empty response cache at each concurrency,
and prints samples/s. The server adds a fixed latency per request to stand in for a remote model
(an endpoint's own generation time dominates real runs; this measures what Longloom adds around it).

    PYTHONPATH=. python bench/bench_rewriter.py [--samples 96] [--latency 0.1] [--length 4096]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.build import run_build
from pipeline.core.workdir import WorkDir
from pipeline.stages.plan import select as select_and_layout
from pipeline.stages.rewriter import run_rewriter
from pipeline.stages.select import SelectResult
from schemas.config import BuildConfig
from tests.conftest import make_config
from tests.openai_server import FakeOpenAIServer


def packed_sample(root: Path) -> tuple[Path, SelectResult]:
    out = root / "packed"
    cfg = make_config(out)
    run_build(cfg)
    from pipeline.readers import list_input_shards
    from pipeline.stages.prepare import prepare_shard

    work = WorkDir(cfg)
    prepared = [prepare_shard(cfg, s, work) for s in list_input_shards(cfg)]  # verified, not redone
    return out, select_and_layout(cfg, work, prepared)


def config(out: Path, url: str, samples: int, concurrency: int, length: int) -> BuildConfig:
    return make_config(
        out,
        rewriter={
            "enabled": True,
            "base_url": url,
            "model": "fake-model",
            "api_key_env": None,  # the test server takes any key
            "sample_length": length,
            "reserve_tokens": 512,
            "concurrency": concurrency,
            "contexts_per_task": 64,
            "progress": False,
            "strategies": [
                {"kind": "chunk_qa", "samples": samples * 3 // 4},
                {"kind": "multi_hop", "samples": samples - samples * 3 // 4},
            ],
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--latency", type=float, default=0.1, help="seconds the server waits per request")
    ap.add_argument("--length", type=int, default=4096, help="tokens per chat sample")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-rewriter-") as tmp:
        root = Path(tmp)
        src, selected = packed_sample(root)
        # warm-up: per-process tables (tokenizer byte tables, chat boundary tables) are built once
        warm = root / "warm-up"
        shutil.copytree(src / "data", warm / "data")
        with FakeOpenAIServer() as srv:
            cfg = config(warm, srv.base_url, 4, 4, args.length)
            run_rewriter(cfg, WorkDir(cfg), selected)
        print(
            f"rewriter, {args.samples} samples of {args.length} tokens, server latency {args.latency * 1000:.0f} ms"
        )
        print(f"{'concurrency':>11} {'samples/s':>10} {'requests/s':>11} {'accepted':>9} {'seconds':>8}")
        for c in args.concurrency:
            out = root / f"run-c{c}"
            shutil.copytree(src / "data", out / "data")
            with FakeOpenAIServer(latency=args.latency) as srv:
                cfg = config(out, srv.base_url, args.samples, c, args.length)
                t0 = time.perf_counter()
                res = run_rewriter(cfg, WorkDir(cfg), selected)
                dt = time.perf_counter() - t0
                calls = len(srv.calls)
            st = res.stats
            print(f"{c:>11} {st['requested'] / dt:>10.2f} {calls / dt:>11.2f} {st['accepted']:>9} {dt:>8.2f}")


if __name__ == "__main__":
    main()
