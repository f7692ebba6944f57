"""The `static-tokens` embedder: document vectors straight from pipeline token ids.

Real tokenizer (Llama-3 via quicktok) and the real table, composed from `static-minilm` (distilled once per
machine, ~30-90 s, then cached like the table itself; building the table takes ~10 s).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline.embedders.static_tokens as embed_tokens
from pipeline.build import run_build
from pipeline.core.tokenizer import Tokenizer, load_tokenizer
from pipeline.core.workdir import WorkDir
from pipeline.embedders.registry import default_threshold, load_embedder
from pipeline.embedders.static_minilm import static_minilm
from pipeline.embedders.static_tokens import TokenStaticEmbedder, TokenTable, load_token_embedder
from pipeline.stages.embed import chunk_spans, embed_dir, embed_documents
from pipeline.stages.prepare import tokens_file_of
from schemas.manifest import Manifest
from tests.test_diversity import Corpus, doc_vectors, read_table

DOCS = [
    "Mesopotamian architecture spans the Sumerians and the Akkadians.",
    "def parse(self, text):\n    return self.tokenizer.encode(text)  # unbelievable\n",
    "The cat sat on the mat.",
    "Ünïcödé façade, naïve café — 東京タワー 🚀🚀",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("quicktok:llama3")


@pytest.fixture(scope="module")
def embedder(tok: Tokenizer) -> TokenStaticEmbedder:
    emb = load_embedder("static-tokens", tokenizer=tok)
    assert isinstance(emb, TokenStaticEmbedder)
    return emb


def naive(table: TokenTable, ids: list[int]) -> np.ndarray:
    """The weighted mean of a span's rows, one token at a time (rows carry the weights)."""
    rows = []
    for k, t in enumerate(ids):
        continues = k > 0 and table.glue_left[t] and table.glue_right[ids[k - 1]]
        rows.append(table.rows[table.cont_row[t] if continues else t])
    v = np.mean(rows, axis=0)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def test_embedding_from_ids_equals_the_naive_weighted_mean(
    tok: Tokenizer, embedder: TokenStaticEmbedder
) -> None:
    ids, offsets = tok.encode_batch(DOCS)
    got = embedder.encode_ids(ids, offsets)
    want = np.stack([naive(embedder.table, ids[a:b].tolist()) for a, b in itertools.pairwise(offsets)])
    assert got.shape == (len(DOCS), 256) and np.allclose(got, want, atol=1e-5)
    assert np.allclose(embedder.encode(DOCS), got, atol=1e-6)  # texts are tokenized, then the same path
    # a span with no known token (whitespace only) is a zero vector, an empty span too
    space = tok.encode("   \n\n\t")
    flat = np.r_[space, ids[: offsets[1]]].astype(np.int32)
    out = embedder.encode_ids(flat, np.array([0, len(space), len(space), len(flat)]))
    assert not out[0].any() and not out[1].any() and np.allclose(out[2], got[0], atol=1e-5)


def test_rows_are_static_minilm_pieces(tok: Tokenizer, embedder: TokenStaticEmbedder) -> None:
    static = load_embedder("static-minilm")
    module = static.model[0]  # type: ignore[attr-defined]
    pieces = module.embedding.weight.detach().numpy()
    vocab = module.tokenizer.get_vocab()
    table = embedder.table
    ids = tok.encode("Mesopotamian")
    assert len(ids) > 2  # split inside the word, so the continuation rows are used
    second = int(ids[1])
    text = tok.decode(ids[1:2]).lower()
    assert table.glue_left[second] and table.glue_right[int(ids[0])]
    cont = embed_tokens.continuation_pieces(module.tokenizer, vocab, text)
    assert all(module.tokenizer.id_to_token(p).startswith("##") for p in cont)
    assert np.allclose(table.rows[table.cont_row[second]], pieces[cont].sum(0), atol=1e-5)
    the = int(tok.encode(" architecture")[0])
    assert np.allclose(table.rows[the], pieces[vocab["architecture"]], atol=1e-6)
    # where every pipeline token is a whole word, the two static models give the same vector
    text = "the cat sat on the mat and the dog sat on the rug"
    assert float(embedder.encode([text])[0] @ static.encode([text])[0]) > 0.9999


def test_table_is_built_once_then_loaded(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[int] = []
    real = embed_tokens.build_token_table

    def counting(*args: object) -> TokenTable:
        builds.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(embed_tokens, "build_token_table", counting)
    static = static_minilm()
    first = embed_tokens.token_table_dir(tok, tmp_path, static)
    again = embed_tokens.token_table_dir(tok, tmp_path, static)
    assert first == again and len(builds) == 1
    assert first.name.startswith(f"static-tokens-{tok.identity.vocab_hash}-")
    emb = load_token_embedder(tok, tmp_path)
    assert len(builds) == 1 and emb.identity.startswith(f"static-tokens@{tok.identity.vocab_hash}-")
    # the identity follows the table's bytes: another table is another embedding-cache key
    rows = np.load(first / "rows.npy")
    rows[0, 0] += 1.0
    np.save(first / "rows.npy", rows)
    assert load_token_embedder(tok, tmp_path).identity != emb.identity and len(builds) == 1


# --- through the pipeline -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tokens_run(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    root = tmp_path_factory.mktemp("tokens")
    out = root / "out"
    return out, run_build(corpus.config(out, root / "cache", embedder="static-tokens"))


def test_planted_edited_copies_are_pruned_with_static_tokens(
    corpus: Corpus, tokens_run: tuple[Path, Manifest]
) -> None:
    out, m = tokens_run
    assert m.ok, [c for c in m.checks if not c.ok]
    stats = m.extra["diversity"]
    assert stats["embedding"]["embedder"].startswith("static-tokens@")
    pruned = {r["doc_id"]: r for r in read_table(out, "pruned")}
    assert all(r["threshold"] == pytest.approx(default_threshold("static-tokens")) for r in pruned.values())
    for original, copy in corpus.pairs:
        if copy.endswith("-edited"):  # lightly edited copies score >= 0.98: one of each pair goes
            assert (original in pruned) != (copy in pruned), (original, copy)
            gone, other = (original, copy) if original in pruned else (copy, original)
            assert pruned[gone]["nearest_kept"] == other
        if copy.endswith("-hand"):  # real rewordings score 0.93-0.95: a static model keeps both
            assert original not in pruned and copy not in pruned
    members = {d for pair in corpus.pairs for d in pair}
    assert set(pruned) <= members, f"distinct documents pruned: {set(pruned) - members}"


def test_stage_vectors_are_chunk_means_of_id_spans(
    corpus: Corpus, tokens_run: tuple[Path, Manifest], embedder: TokenStaticEmbedder, tmp_path: Path
) -> None:
    out, _m = tokens_run
    cfg = corpus.config(out, out.parent / "cache", embedder="static-tokens")
    work = WorkDir(cfg)
    stored = doc_vectors(out, cfg)
    docs = sorted((work.prepare_dir / "documents").glob("*.parquet"))[0]
    table = pq.read_table(docs, columns=["doc_id", "token_start", "n_tokens"])
    flat = np.fromfile(tokens_file_of(docs), dtype="<i4")
    ids = [
        flat[a : a + n].tolist()
        for a, n in zip(
            table.column("token_start").to_pylist(), table.column("n_tokens").to_pylist(), strict=True
        )
    ]
    for doc_id, x in zip(table.column("doc_id").to_pylist(), ids, strict=True):  # one chunk per document
        assert np.allclose(stored[doc_id], naive(embedder.table, x), atol=2e-3)
    # small chunks: several per document, some spread out; the stage pools them as the text path does
    small = corpus.config(
        tmp_path / "small",
        tmp_path / "cache",
        embedder="static-tokens",
        chunk_tokens=32,
        max_chunks=3,
        dtype="float32",
    )
    res = embed_documents(small, WorkDir(small), "s", docs)
    got = np.load(embed_dir(small, WorkDir(small)) / res.file)
    assert res.partial_documents > 0 and res.min_coverage < 1.0 and res.chunks > len(ids)
    for row, x in enumerate(ids):
        chunks = [naive(embedder.table, x[a:b]) for a, b in chunk_spans(len(x), 32, 3)]
        want = np.mean(chunks, axis=0)
        assert np.allclose(got[row], want / np.linalg.norm(want), atol=1e-5)


# --- issue 18.6: lexical confirmation before a static-model drop ---------------------------------------


def test_shingle_jaccard_matches_python_sets() -> None:
    from pipeline.corpus.semantic.lexical import jaccard, sketch

    rng = np.random.default_rng(3)

    def grams(x: list[int], k: int) -> set[tuple[int, ...]]:
        return {tuple(x[i : i + k]) for i in range(len(x) - k + 1)} if len(x) >= k else {tuple(x)}

    for n, size in ((60, 512), (3000, 512)):  # exact below the sketch size, an estimate above it
        a = rng.integers(0, 400, n).tolist()
        b = list(a)
        for _ in range(n // 10):
            b[rng.integers(0, n)] = int(rng.integers(0, 400))
        want = len(grams(a, 3) & grams(b, 3)) / len(grams(a, 3) | grams(b, 3))
        got = jaccard(sketch(np.array(a), 3, size), sketch(np.array(b), 3, size), size)
        assert got == pytest.approx(want, abs=1e-9 if n < size else 0.07), (n, got, want)


def test_static_drops_need_shared_text(tmp_path: Path) -> None:
    """A word-shuffled copy has a static model's vector (a mean of word vectors) but no shared 3-grams: the
    lexical check keeps it, while edited copies are still pruned, each drop recording its Jaccard."""
    import gzip
    import json
    import random

    from tests.conftest import DATA, make_config
    from tests.test_diversity import light_edit

    with gzip.open(DATA / "sample/wiki/part-000.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    docs = [d for d in docs if not d["id"].endswith("-dup") and 400 < len(d["text"]) < 1500][:60]
    rows = list(docs)
    for i, d in enumerate(docs[:5]):
        rows.append({"id": f"{d['id']}-edited", "text": light_edit(d["text"], i)})
    for i, d in enumerate(docs[5:10]):
        words = d["text"].split()
        random.Random(i).shuffle(words)
        rows.append({"id": f"{d['id']}-shuffled", "text": " ".join(words)})
    (tmp_path / "w.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(out: str, **semdedup: object) -> dict[str, dict]:
        cfg = make_config(
            tmp_path / out,
            base_dir=tmp_path,
            sources=[{"name": "w", "kind": "jsonl", "paths": ["w.jsonl"], "id_field": "id"}],
            packing={"strategy": "greedy", "targets": [{"length": 2048}]},
            diversity={"embedder": "static-tokens", "progress": False, "semdedup": semdedup},
        )
        m = run_build(cfg)
        assert m.ok
        return {r["doc_id"]: r for r in read_table(tmp_path / out, "pruned")}

    shuffled = {(d["id"], f"{d['id']}-shuffled") for d in docs[5:10]}
    edited = {(d["id"], f"{d['id']}-edited") for d in docs[:5]}
    unchecked = run("off", lexical={"enabled": False})
    assert all((a in unchecked) or (b in unchecked) for a, b in shuffled)  # the defect
    checked = run("on")  # default for static embedders
    assert not any(a in checked or b in checked for a, b in shuffled)
    assert all((a in checked) != (b in checked) for a, b in edited)
    for r in checked.values():
        jac = float(re.search(r"shingle Jaccard ([0-9.]+) >= 0\.3", r["detail"]).group(1))  # type: ignore[union-attr]
        assert jac >= 0.3


def test_sketch_memo_is_bounded_and_exact(tmp_path: Path) -> None:
    """18: the lexical check's sketches are memoised within a byte budget (an unbounded memo held every
    checked document's sketch: 5.6 GB at 1M documents); evicted sketches are recomputed, same Jaccard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.corpus.index import DocIndex
    from pipeline.corpus.semantic.lexical import jaccard, sketch
    from pipeline.corpus.semantic.prune import TokenSketches

    rng = np.random.default_rng(5)
    n, size = 400, 64
    lengths = rng.integers(80, 200, n)
    ids = rng.integers(0, 5000, int(lengths.sum())).astype("<i4")
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    (tmp_path / "documents").mkdir()
    (tmp_path / "tokens").mkdir()
    docs = tmp_path / "documents" / "s0.parquet"
    pq.write_table(pa.table({"token_start": starts}), docs)
    ids.tofile(tmp_path / "tokens" / "s0.int32")
    idx = DocIndex(
        shard=np.zeros(n, np.int32),
        row=np.arange(n, dtype=np.int64),
        source=np.zeros(n, np.int32),
        n_tokens=lengths.astype(np.int64),
        content_hash=np.array([b"%064d" % i for i in range(n)], dtype="S64"),
        doc_id=[f"d{i}" for i in range(n)],
        sources=["s"],
        files=[str(docs)],
    )
    cap = 20 * size * 8  # room for about 20 sketches
    sk = TokenSketches(idx, 3, size, memo_bytes=cap)
    a, b = rng.integers(0, n, 2000), rng.integers(0, n, 2000)
    got = sk.jaccard(a, b)
    assert sk.memo_bytes <= cap
    pieces = np.split(ids, np.cumsum(lengths)[:-1])
    want = [
        jaccard(sketch(pieces[p], 3, size), sketch(pieces[q], 3, size), size)
        for p, q in zip(a, b, strict=True)
    ]
    assert np.allclose(got, want)


def test_sketch_and_jaccard_equal_their_set_definitions() -> None:
    """18 (1M time): the partial-sort sketch is the full set's smallest `size` hashes, and the merged-sort
    Jaccard equals the bottom-k estimator written with Python sets, complete sketches or cut ones."""
    from pipeline.corpus.semantic.lexical import jaccard, shingle_hashes, sketch

    rng = np.random.default_rng(8)
    size = 64
    for trial in range(300):
        n = int(rng.integers(0, 400))
        vocab = int(rng.choice([3, 20, 5000]))  # few distinct shingles (many repeats) to all distinct
        a = rng.integers(0, vocab, n)
        b = a.copy()
        if n:
            b[rng.integers(0, n, max(1, n // 8))] = rng.integers(0, vocab, max(1, n // 8))
        ha, hb = set(shingle_hashes(a, 3).tolist()), set(shingle_hashes(b, 3).tolist())
        sa, sb = sketch(a, 3, size), sketch(b, 3, size)
        assert sa.tolist() == sorted(ha)[:size] and sb.tolist() == sorted(hb)[:size], trial
        if len(ha) < size and len(hb) < size:
            want = len(ha & hb) / len(ha | hb) if ha | hb else 1.0
        else:
            union = sorted(set(sa.tolist()) | set(sb.tolist()))[:size]
            want = sum(u in ha and u in hb for u in union) / len(union)
        assert jaccard(sa, sb, size) == pytest.approx(want, abs=1e-12), trial
