"""Distil a static embedding model from a sentence-transformers teacher, offline, in the main environment.

The method follows model2vec (Tulkens and van Dongen, 2024), reimplemented here because installing
`model2vec[distill]` downgrades transformers, tokenizers and huggingface_hub:
1. run every vocabulary token through the teacher as `[CLS] token [SEP]` and mean-pool its output
   (the teacher's own pooling), giving one vector per token;
2. reduce them with PCA (to 256 dimensions by default);
3. weight each token by a/(a + p(token)), the smooth inverse frequency of Arora et al. (2017), with p
   the even mix of two distributions counted on the bundled samples: prose (Wikipedia leads,
   Shakespeare and Milton, the KJV) and Python code. Prose counts alone leave code's common tokens
   (`self`, brackets, `return`) at full weight, and unrelated code blocks then look alike: on 3,000
   standard-library blocks the share whose nearest other block scores above 0.95 fell from 40% to 6%.
A sentence is then the mean of its tokens' vectors: sentence-transformers' `StaticEmbedding`.

The result is saved as a sentence-transformers folder under `~/.cache/longloom/models/` (or
`$LONGLOOM_CACHE_DIR/models`), keyed by the teacher's fingerprint and the parameters, so it is distilled
once per machine (about 20-30 s on 2 cores) and then loads in a second. Run it ahead of time with
`python -m pipeline.embedders.static_minilm`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pipeline.core.progress import waiting

DISTILL_STEP = "static_distill@2"
DEFAULT_DIMS = 256
DEFAULT_SIF = 1e-4
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"


def cache_root() -> Path:
    """$LONGLOOM_CACHE_DIR, or $XDG_CACHE_HOME/longloom, or ~/.cache/longloom."""
    env = os.environ.get("LONGLOOM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "longloom"


def sample_code(folder: Path = SAMPLE_DIR) -> Iterator[str]:
    """The bundled sample Python files."""
    for p in sorted(folder.glob("code/**/*.py")):
        yield p.read_text(encoding="utf-8")


def sample_texts(folder: Path = SAMPLE_DIR) -> Iterator[str]:
    """The bundled sample prose (real, freely licensed), for token frequencies."""
    import pyarrow.parquet as pq
    import zstandard

    for p in sorted(folder.glob("wiki/*.jsonl.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]
    for p in sorted(folder.glob("books/*.jsonl.zst")):
        with open(p, "rb") as raw:
            text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
            for line in text:
                yield json.loads(line)["text"]
    for p in sorted(folder.glob("bible/*.parquet")):
        yield from pq.read_table(p, columns=["text"]).column("text").to_pylist()


def token_vectors(
    teacher: object, batch: int = 4096, step: Callable[[str], None] | None = None
) -> np.ndarray:
    """One vector per vocabulary token: the teacher's mean-pooled output for `[CLS] token [SEP]`."""
    import torch

    transformer = teacher[0]  # type: ignore[index]
    model = transformer.auto_model
    tok = transformer.tokenizer
    vocab = len(tok)
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    out = np.zeros((vocab, model.config.hidden_size), np.float32)
    model.eval()
    with torch.inference_mode():
        for s in range(0, vocab, batch):
            if step is not None:
                step(f"teacher vectors of tokens {s:,}-{min(vocab, s + batch):,} of {vocab:,}")
            ids = torch.arange(s, min(vocab, s + batch))
            cols = [ids]
            if cls_id is not None:
                cols.insert(0, torch.full_like(ids, cls_id))
            if sep_id is not None:
                cols.append(torch.full_like(ids, sep_id))
            x = torch.stack(cols, 1)
            hidden = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
            out[s : s + len(ids)] = hidden.mean(1).float().numpy()
    return out


def id_probabilities(
    encode: Callable[[list[str]], np.ndarray], texts: Iterator[str], vocab: int
) -> np.ndarray:
    """Add-one smoothed unigram probabilities of token ids on `texts`; `encode` gives a block's flat ids."""
    counts = np.zeros(vocab, np.float64)
    block: list[str] = []

    def flush() -> None:
        ids = np.asarray(encode(block), np.int64)
        counts[:] += np.bincount(ids, minlength=vocab)[:vocab]
        block.clear()

    for t in texts:
        block.append(t)
        if len(block) >= 512:
            flush()
    if block:
        flush()
    return (counts + 1.0) / (counts.sum() + vocab)


def teacher_ids(tokenizer: object, block: list[str]) -> np.ndarray:
    """Flat token ids of `block` under a `tokenizers.Tokenizer`, without special tokens."""
    encs = tokenizer.encode_batch(block, add_special_tokens=False)  # type: ignore[attr-defined]
    return np.concatenate([np.asarray(e.ids, np.int64) for e in encs] or [np.zeros(0, np.int64)])


def token_probabilities(tokenizer: object, texts: Iterator[str], vocab: int) -> np.ndarray:
    """Add-one smoothed unigram probabilities of the teacher's tokens on `texts`."""
    return id_probabilities(lambda block: teacher_ids(tokenizer, block), texts, vocab)


def sample_probabilities(encode: Callable[[list[str]], np.ndarray], vocab: int) -> np.ndarray:
    """The even mix of prose and code token probabilities on the bundled samples (uniform without them)."""
    if not SAMPLE_DIR.is_dir():  # installed without the samples: every token weighs the same
        return np.full(vocab, 1.0 / vocab)
    return 0.5 * id_probabilities(encode, sample_texts(), vocab) + 0.5 * id_probabilities(
        encode, sample_code(), vocab
    )


def sif_weights(prob: np.ndarray, sif: float) -> np.ndarray:
    """Smooth inverse frequency a/(a + p) (Arora et al. 2017), float32."""
    return (sif / (sif + prob)).astype(np.float32)


def pca(x: np.ndarray, dims: int) -> np.ndarray:
    """Project onto the top `dims` principal components (centred; sign fixed for determinism)."""
    centred = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    comps = vt[:dims]
    comps *= np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])[:, None]
    return (centred @ comps.T).astype(np.float32)


def distill(
    teacher_path: Path,
    out_dir: Path,
    dims: int = DEFAULT_DIMS,
    sif: float = DEFAULT_SIF,
    device: str = "cpu",
    step: Callable[[str], None] = lambda _: None,
) -> Path:
    """Distil `teacher_path` into a static sentence-transformers model at `out_dir` (atomically).

    `step` is told which part is running (the whole takes minutes on 2 cores).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer

    started = time.perf_counter()
    step("loading the teacher model")
    teacher = SentenceTransformer(str(teacher_path), device=device)
    vectors = token_vectors(teacher, step=step)
    fast = Tokenizer.from_file(str(teacher_path / "tokenizer.json"))
    fast.no_truncation()  # a static model has no window: never cut a chunk short
    fast.no_padding()
    step("token frequencies on the bundled samples")
    prob = sample_probabilities(lambda block: teacher_ids(fast, block), len(vectors))
    step("PCA and SIF weights")
    weights = pca(vectors, min(dims, vectors.shape[1])) * sif_weights(prob, sif)[:, None]
    model = SentenceTransformer(modules=[StaticEmbedding(fast, embedding_weights=weights)], device="cpu")
    step("saving")
    tmp = out_dir.parent / f".tmp-{os.getpid()}-{threading.get_ident()}-{out_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    info = {
        "step": DISTILL_STEP,
        "teacher": str(teacher_path),
        "dims": int(weights.shape[1]),
        "sif": sif,
        "frequency_texts": str(SAMPLE_DIR) if SAMPLE_DIR.is_dir() else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (tmp / "longloom_distill.json").write_text(json.dumps(info, indent=2) + "\n")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


_DISTILL_LOCK = threading.Lock()


def static_minilm(dims: int = DEFAULT_DIMS, sif: float = DEFAULT_SIF) -> Path:
    """The static model distilled from the bundled MiniLM: distilled on first use, then cached."""
    from pipeline.embedders.base import folder_fingerprint, minilm_path

    teacher = minilm_path()
    key = hashlib.sha256(f"{DISTILL_STEP}|{folder_fingerprint(teacher)}|{dims}|{sif}".encode()).hexdigest()[
        :12
    ]
    out = cache_root() / "models" / f"static-minilm-{dims}d-{key}"
    with _DISTILL_LOCK:
        if not (out / "modules.json").exists():
            print(
                f"longloom: distilling a static embedding model from MiniLM into {out} (once)",
                file=sys.stderr,
            )
            with waiting(
                "distilling the static embedder from MiniLM (first use only; minutes on 2 cores)"
            ) as w:
                distill(teacher, out, dims, sif, step=w.step)
    return out


if __name__ == "__main__":
    print(static_minilm())
