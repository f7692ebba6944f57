"""`long_dependency@2`: how much a document's far context improves a causal LM's predictions.

For sampled target spans of a document (or a packed row), each span token is scored twice: with the
full available context (up to `max_context` tokens before the span) and with only the last
`short_window` tokens. The gain log p(token | full) - log p(token | short), in nats per token,
averaged over the scored positions, is the document's score. This is the long-versus-short contrast
of LongFilter (Deng et al., ICLR 2026); the sampling of fixed-size target segments, a bounded number
per document, follows ProLong (Chen et al. 2024, "Long Context is Not Long at All"), whose segments
are 128 tokens.

Windows, exactly: a span starts at token s and has `span_tokens` tokens; the context of size c is
ids[s-c : s], so the span's k-th token sees c + k tokens (the span prefix is shared by both
predictions; one forward pass per (span, context) pair instead of one per position).

Distance profile: the same gain measured with contexts of each size in `distances` (and the full
context), so one sees how far back the useful context reaches. A context longer than what precedes
the span is capped at what is available.

Specificity correction ("copy" correction): ProLong calibrates its dependency strength by a
specificity term so that dependencies on generic, repeated text do not count. Here the same goal is
reached with a direct test for the case that inflates long-context gains most, verbatim repetition:
an induction-style copy: the target token lies inside a run of at least `copy_ngram` + 1 tokens that
occurred verbatim earlier in the long context (a repeated licence header, a repeated paragraph,
boilerplate), counted from the run's first token. The gain at such positions is set to zero:
predicting a copy needs only a lookup, not understanding, and the short window would see the same
text if the repeat were nearer. Both scores are recorded:
`raw_score` (no correction) and `score` (with it, the default), plus the fraction of copied positions.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.longdep.backends import LogprobModel
from pipeline.longdep.cache import ScoreCache
from schemas.longdep import LongDepConfig

# @2: the copy test covers a repeat from its first token (see copy_mask); @1 flagged a position only
# when it and the copy_ngram tokens before it had occurred earlier, so the first copy_ngram tokens of
# every repeat escaped the correction
METHOD = "long_dependency@2"


@dataclass(frozen=True)
class LongDepResult:
    """One document's (or row's) score with everything needed to reproduce it (a lineage record)."""

    method: str
    model_id: str
    model_fingerprint: str
    settings: dict[str, Any]
    doc_hash: str
    n_tokens: int
    status: str  # "scored" or "too_short" (fewer tokens than short_window + span_tokens)
    spans: int = 0
    positions: int = 0
    score: float | None = None  # mean gain in nats/token with the copy correction
    raw_score: float | None = None  # mean gain without it
    copy_fraction: float | None = None  # scored positions judged verbatim copies
    profile: dict[str, float] = field(default_factory=dict)  # context tokens -> corrected mean gain
    profile_raw: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> LongDepResult:
        return cls(**rec)

    def value(self, corrected: bool = True) -> float | None:
        return self.score if corrected else self.raw_score


def text_hash(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def ids_hash(ids: Sequence[int]) -> str:
    return "ids-sha256:" + hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def sample_spans(n_tokens: int, cfg: LongDepConfig, doc_hash: str) -> list[int]:
    """Start offsets of the target spans: aligned `span_tokens` segments with at least `short_window`
    tokens before them, `spans_per_document` of them at most, drawn with a seed from the document hash
    (the same document always gets the same spans, whatever else is in the run)."""
    L, W = cfg.span_tokens, cfg.short_window
    first = math.ceil(W / L) * L
    starts = list(range(first, n_tokens - L + 1, L))
    if len(starts) <= cfg.spans_per_document:
        return starts
    rng = random.Random(f"{cfg.seed}:{doc_hash}")
    return sorted(rng.sample(starts, cfg.spans_per_document))


def copy_mask(ids: Sequence[int], lo: int, start: int, end: int, n: int) -> np.ndarray:
    """For positions p in start..end-1: True where p lies inside a run ids[a : a+n+1] (a <= p <= a+n,
    a >= lo) whose tokens also occur, in the same order, entirely inside the context ids[lo : p].

    That is, p belongs to a verbatim repeat of at least n+1 tokens of text seen before p, counted
    from the repeat's first token. Testing only the run that ENDS at p (p and the n tokens before it)
    misses the first n tokens of a repeat: where a repeated block starts again after different text
    (a seam), their n-token context crosses the seam and never occurred before, yet the model, having
    seen the block, predicts them by lookup. Looking ahead to ids[p+1 : a+n+1] only decides whether p
    is part of a repeat; the gain at p is still the model's prediction from the tokens before p."""
    out = np.zeros(end - start, dtype=bool)
    last = min(end, len(ids) - n)  # runs a..a+n must fit in the document
    first: dict[tuple[int, ...], int] = {}  # each (n+1)-gram's earliest start at or after lo
    for a in range(lo, last):
        gram = tuple(ids[a : a + n + 1])
        b = first.setdefault(gram, a)
        if b < a:
            # the earlier copy ids[b : b+n+1] lies inside ids[lo : p] for every p > b + n
            for p in range(max(a, b + n + 1, start), min(a + n + 1, end)):
                out[p - start] = True
    return out


def _context_sizes(s: int, cfg: LongDepConfig) -> list[int]:
    """Short window, the profile distances, and the full context; each capped at the s tokens available."""
    full = min(s, cfg.max_context)
    sizes = {cfg.short_window, full}
    sizes.update(min(d, full) for d in cfg.distances)
    return sorted(sizes)


def score_ids(
    ids: Sequence[int],
    model: LogprobModel,
    cfg: LongDepConfig,
    doc_hash: str | None = None,
) -> LongDepResult:
    """Score one token sequence (the model's own ids)."""
    doc_hash = doc_hash or ids_hash(ids)
    base: dict[str, Any] = {
        "method": METHOD,
        "model_id": model.model_id,
        "model_fingerprint": model.fingerprint,
        "settings": cfg.score_settings(),
        "doc_hash": doc_hash,
        "n_tokens": len(ids),
    }
    spans = sample_spans(len(ids), cfg, doc_hash)
    if not spans:
        return LongDepResult(status="too_short", **base)
    L = cfg.span_tokens
    jobs: list[tuple[int, int]] = [(s, c) for s in spans for c in _context_sizes(s, cfg)]
    # longest first so equal lengths share a batch (the HF backend batches equal lengths)
    jobs.sort(key=lambda j: -j[1])
    lps: dict[tuple[int, int], np.ndarray] = {}
    for i in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[i : i + cfg.batch_size]
        res = model.logprobs([ids[s - c : s + L] for s, c in chunk], last=L)
        for (s, c), lp in zip(chunk, res, strict=True):
            lps[(s, c)] = lp[-L:]  # predictions of the span's tokens
    gains_raw, gains, copies = [], [], []
    prof: dict[int, list[np.ndarray]] = {}
    prof_raw: dict[int, list[np.ndarray]] = {}
    for s in spans:
        full = min(s, cfg.max_context)
        short = lps[(s, cfg.short_window)]
        mask = copy_mask(ids, s - full, s, s + L, cfg.copy_ngram)
        keep = ~mask
        g = lps[(s, full)] - short
        gains_raw.append(g)
        gains.append(g * keep)
        copies.append(mask)
        for d in [*cfg.distances, cfg.max_context]:
            gd = lps[(s, min(d, full))] - short
            prof_raw.setdefault(d, []).append(gd)
            prof.setdefault(d, []).append(gd * keep)
    return LongDepResult(
        status="scored",
        spans=len(spans),
        positions=len(spans) * L,
        score=float(np.concatenate(gains).mean()),
        raw_score=float(np.concatenate(gains_raw).mean()),
        copy_fraction=float(np.concatenate(copies).mean()),
        profile={str(d): float(np.concatenate(v).mean()) for d, v in sorted(prof.items())},
        profile_raw={str(d): float(np.concatenate(v).mean()) for d, v in sorted(prof_raw.items())},
        **base,
    )


def score_text(text: str, model: LogprobModel, cfg: LongDepConfig) -> LongDepResult:
    """Score a document (or a packed row's text) with the model's own tokenizer."""
    return score_ids(model.tokenize(text), model, cfg, text_hash(text))


def cache_key(model: LogprobModel, cfg: LongDepConfig, doc_hash: str) -> dict[str, Any]:
    return {"method": METHOD, "model": model.fingerprint, "doc": doc_hash, "settings": cfg.score_settings()}


def score_documents(
    texts: Iterable[str],
    model: LogprobModel,
    cfg: LongDepConfig,
    cache: ScoreCache | None = None,
    progress: Callable[[int, bool], None] | None = None,
) -> list[LongDepResult]:
    """Score many documents; cached results are reused (a rerun after a crash resumes where it stopped).

    `progress(i, from_cache)` is called after each document."""
    out = []
    for i, text in enumerate(texts):
        h = text_hash(text)
        key = cache_key(model, cfg, h)
        rec = cache.get(key) if cache else None
        hit = rec is not None
        if rec is not None:
            res = LongDepResult.from_record(rec)
        else:
            res = score_text(text, model, cfg)
            if cache:
                cache.put(key, res.to_record())
        out.append(res)
        if progress:
            progress(i, hit)
    return out
