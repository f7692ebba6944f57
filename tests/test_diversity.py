"""Embedding-diversity stage: embedders, cache, SemDeDup / D4 pruning with audit, similarity packing.

Real text (the bundled Wikipedia sample) and the real bundled all-MiniLM-L6-v2; the static model is
distilled from it once per machine (~30 s, cached under ~/.cache/longloom/models).
"""

from __future__ import annotations

import gzip
import itertools
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.build import run_build
from pipeline.core.workdir import WorkDir
from pipeline.corpus.semantic.cluster import knn, near_pairs
from pipeline.corpus.semantic.order import interleave_runs, nn_path
from pipeline.corpus.semantic.prune import greedy_drop, nearest_kept
from pipeline.embedders.cache import EmbeddingCache
from pipeline.embedders.registry import load_embedder
from pipeline.stages.embed import chunk_spans, embed_dir
from schemas.config import BuildConfig, ConfigError
from schemas.diversity import IndexConfig
from schemas.manifest import Manifest
from schemas.records import PRUNED_SCHEMA
from tests.conftest import DATA, make_config, sample_dict

# --- a corpus with planted near-duplicates ----------------------------------------------------------

SYNONYMS = {
    "large": "big",
    "city": "town",
    "known": "recognized",
    "also": "additionally",
    "film": "movie",
    "began": "started",
    "people": "persons",
    "largest": "biggest",
    "important": "significant",
    "several": "various",
    "used": "employed",
    "country": "nation",
    "many": "numerous",
    "often": "frequently",
    "major": "principal",
}

# Our own rewordings of three records of the bundled sample (CC BY-SA 4.0, see data/README.md).
HAND_PARAPHRASES = {
    "enwiki-00041": (
        "Architects and others use architectural drawings, the technical drawings of buildings or building "
        "projects, for many reasons: turning a design idea into a coherent proposal, communicating concepts, "
        "showing clients why a design has merit, helping a contractor build according to the design "
        "intent, recording a planned development, or documenting a building that is already standing."
    ),
    "enwiki-00044": (
        "Mesopotamian architecture is the ancient building tradition of the Tigris-Euphrates river region. "
        "It spans several distinct cultures, the Sumerians and the Akkadians among them, from the 10th "
        "millennium BC until the 6th century BC. Its achievements include urban planning, the courtyard "
        "house and the ziggurat; scribes acted as architects, drafting and managing construction for the "
        "government, the nobility and royalty."
    ),
    "enwiki-00055": (
        "A group of people who take part in a show, or who encounter a work of art, literature, theatre, "
        "music, video games or academics in any medium, is called an audience. Its members take part in "
        "different ways depending on the kind of art: some events openly invite participation, while "
        "others allow no more than modest applause and criticism."
    ),
}


def light_edit(text: str, seed: int) -> str:
    """Swap a few neighbouring words, drop commas, change two articles: a lightly edited copy."""
    words = text.split(" ")
    rng = random.Random(seed)
    for _ in range(len(words) // 12):
        j = rng.randrange(len(words) - 1)
        words[j], words[j + 1] = words[j + 1], words[j]
    return " ".join(words).replace(",", "").replace(" the ", " a ", 2)


def paraphrase(text: str) -> str:
    """Move the first sentence to the end and swap in synonyms."""
    sentences = re.split(r"(?<=[.!?])\s+", text)
    if len(sentences) > 2:
        sentences = sentences[1:] + sentences[:1]
    out = " ".join(sentences)
    for a, b in SYNONYMS.items():
        out = re.sub(rf"\b{a}\b", b, out)
    return out


class Corpus:
    def __init__(self, root: Path) -> None:
        with gzip.open(DATA / "sample/wiki/part-000.jsonl.gz", "rt", encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
        # short enough that MiniLM embeds them in seconds on a busy 2-core machine
        docs = [d for d in docs if not d["id"].endswith("-dup") and 300 < len(d["text"]) < 1500][:100]
        self.distinct = [d["id"] for d in docs]
        self.pairs: list[tuple[str, str]] = []  # (original, planted copy)
        planted = []
        for i, d in enumerate(docs[10:16]):
            planted.append({"id": f"{d['id']}-edited", "text": light_edit(d["text"], i)})
        for d in docs[20:26]:
            planted.append({"id": f"{d['id']}-para", "text": paraphrase(d["text"])})
        by_id = {d["id"]: d for d in docs}
        for doc_id, text in HAND_PARAPHRASES.items():
            assert doc_id in by_id, doc_id
            planted.append({"id": f"{doc_id}-hand", "text": text})
        for p in planted:
            self.pairs.append((p["id"].rsplit("-", 1)[0], p["id"]))
        rng = random.Random(7)
        rows = docs + planted
        rng.shuffle(rows)
        self.path = root / "wiki.jsonl"
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        self.root = root
        self.n = len(rows)

    def config(self, out: Path, cache: Path, **diversity: Any) -> BuildConfig:
        packing = diversity.pop("packing", {"strategy": "greedy", "targets": [{"length": 2048}]})
        div = {"embedder": "minilm", "cache_dir": str(cache), "progress": False} | diversity
        return make_config(
            out,
            base_dir=self.root,
            sources=[{"name": "wiki", "kind": "jsonl", "paths": ["wiki.jsonl"], "id_field": "id"}],
            packing=packing,
            diversity=div,
        )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedding-cache")


@pytest.fixture(scope="module")
def pruned_run(
    corpus: Corpus, cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("pruned") / "out"
    return out, run_build(corpus.config(out, cache))


def read_table(out: Path, name: str) -> list[dict]:
    files = sorted((out / "audit" / name).glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def doc_vectors(out: Path, cfg: BuildConfig) -> dict[str, np.ndarray]:
    """doc_id -> stored embedding, from the embedding stage's files."""
    work = WorkDir(cfg)
    vecs: dict[str, np.ndarray] = {}
    for f in sorted(embed_dir(cfg, work).glob("*.npy")):
        ids = pq.read_table(work.prepare_dir / "documents" / f"{f.stem}.parquet", columns=["doc_id"])
        for doc_id, v in zip(ids.column("doc_id").to_pylist(), np.load(f).astype(np.float32), strict=True):
            vecs[doc_id] = v
    return vecs


# --- pruning on real text ---------------------------------------------------------------------------


def test_planted_near_duplicates_are_pruned_and_distinct_documents_kept(
    corpus: Corpus, pruned_run: tuple[Path, Manifest]
) -> None:
    out, m = pruned_run
    assert m.ok, [c for c in m.checks if not c.ok]
    pruned = {r["doc_id"]: r for r in read_table(out, "pruned")}
    for original, copy in corpus.pairs:
        # exactly one of each planted pair goes, and it names the other as its nearest kept document
        assert (original in pruned) != (copy in pruned), (original, copy)
        gone, other = (original, copy) if original in pruned else (copy, original)
        assert pruned[gone]["nearest_kept"] == other
    members = {d for pair in corpus.pairs for d in pair}
    assert set(pruned) <= members, f"distinct documents pruned: {set(pruned) - members}"
    assert len(pruned) == len(corpus.pairs)
    kept_docs = {
        s["doc_id"]
        for f in (out / "data").glob("pretrain_*/*.parquet")
        for row in pq.read_table(f, columns=["segments"]).column("segments").to_pylist()
        for s in row
    }
    assert len(kept_docs) == corpus.n - len(pruned)
    assert not kept_docs & set(pruned)


def test_audit_table_explains_every_drop(corpus: Corpus, pruned_run: tuple[Path, Manifest]) -> None:
    out, m = pruned_run
    cfg = corpus.config(out, Path(run_report(out)["diversity"]["cache_dir"]))
    pruned = read_table(out, "pruned")
    filtered = [r for r in read_table(out, "filtered") if r["step"] == "semdedup@1"]
    assert {r["doc_id"] for r in filtered} == {r["doc_id"] for r in pruned}
    assert all(r["reason"] == "semantic_duplicate" and r["duplicate_of"] for r in filtered)
    assert m.sources["wiki"].filtered["semantic_duplicate"] == len(pruned)
    assert m.audit["pruned"] and m.extra["diversity"]["pruned_matches_filtered"]
    stats = m.extra["diversity"]
    assert stats["semdedup"]["pruned"] == len(pruned) and stats["pruned_by_rule"] == {
        "semdedup@1": len(pruned)
    }
    assert stats["embedding"]["embedder"].startswith("minilm@")
    # recompute each decision from the stored embeddings
    vecs = doc_vectors(out, cfg)
    schema_names = set(PRUNED_SCHEMA.names)
    for r in pruned:
        assert set(r) == schema_names
        cos = float(vecs[r["doc_id"]] @ vecs[r["nearest_kept"]])
        assert cos == pytest.approx(r["similarity"], abs=2e-3)
        assert r["similarity"] > r["threshold"] == pytest.approx(0.85)
        assert r["keep_rule"] == "longest" and r["nearest_kept"] in r["detail"]
        assert r["cluster_size"] >= 2 and r["uri"].endswith("wiki.jsonl") and r["record"] >= 1


def run_report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def test_embedding_cache_is_hit_on_rerun(
    corpus: Corpus, pruned_run: tuple[Path, Manifest], tmp_path: Path
) -> None:
    out, first = pruned_run
    cache = Path(run_report(out)["diversity"]["cache_dir"])
    emb = run_report(out)["diversity"]["embedding"]
    assert emb["cache_misses"] > 0 and emb["model_calls"] > 0
    model = load_embedder("minilm")
    calls = model.calls
    # a second pass over the same texts from a fresh output folder: every vector comes from the cache
    again = run_build(corpus.config(tmp_path / "second", cache))
    e2 = run_report(tmp_path / "second")["diversity"]["embedding"]
    assert model.calls == calls
    assert e2["model_calls"] == 0 and e2["cache_misses"] == 0
    assert e2["cache_hits"] == emb["cache_hits"] + emb["cache_misses"]
    assert again.extra["diversity"]["pruned_by_rule"] == first.extra["diversity"]["pruned_by_rule"]
    # a rerun in place reuses the verified per-shard files
    run_build(corpus.config(tmp_path / "second", cache))
    assert run_report(tmp_path / "second")["diversity"]["embedding"]["shards_reused"] == 1
    assert model.calls == calls


def test_d4_keeps_the_fraction_farthest_from_centroids(corpus: Corpus, cache: Path, tmp_path: Path) -> None:
    m = run_build(
        corpus.config(tmp_path / "out", cache, d4={"keep_fraction": 0.75}, semdedup={"enabled": False})
    )
    assert m.ok
    rows = read_table(tmp_path / "out", "pruned")
    assert rows and all(r["step"] == "d4@1" and r["reason"] == "prototypical" for r in rows)
    # per cluster, what is dropped is at least as central as the cutoff (the most central kept document)
    for r in rows:
        assert r["centroid_similarity"] >= r["threshold"] - 1e-6
    kept = m.sources["wiki"].kept
    assert kept == pytest.approx(0.75 * corpus.n, abs=m.extra["diversity"]["d4"]["clusters"] + 1)


# --- similarity packing --------------------------------------------------------------------------------


def row_neighbor_similarity(out: Path, vecs: dict[str, np.ndarray]) -> float:
    """Mean cosine between consecutive documents inside a row, over all rows."""
    sims = []
    for f in sorted((out / "data").glob("pretrain_*/*.parquet")):
        for segs in pq.read_table(f, columns=["segments"]).column("segments").to_pylist():
            ids = [s["doc_id"] for s in segs]
            sims += [float(vecs[a] @ vecs[b]) for a, b in itertools.pairwise(ids) if a != b]
    return float(np.mean(sims))


def test_similarity_packing_puts_related_documents_side_by_side(
    corpus: Corpus, cache: Path, tmp_path: Path
) -> None:
    packing = {"strategy": "similarity", "targets": [{"length": 2048}]}
    sim_cfg = corpus.config(tmp_path / "sim", cache, packing=packing, grouping={"kmeans": {"clusters": 4}})
    sim = run_build(sim_cfg)
    greedy_cfg = corpus.config(tmp_path / "greedy", cache)
    greedy = run_build(greedy_cfg)
    assert sim.ok and greedy.ok and sim.targets[0].strategy == "similarity@2"
    vecs = doc_vectors(tmp_path / "sim", sim_cfg)
    s, g = row_neighbor_similarity(tmp_path / "sim", vecs), row_neighbor_similarity(tmp_path / "greedy", vecs)
    assert s > g + 0.1, (s, g)
    # lineage: every segment says who placed it and its cosine to the previous document in the order
    segs = [
        seg
        for f in sorted((tmp_path / "sim" / "data").glob("pretrain_*/*.parquet"))
        for row in pq.read_table(f, columns=["segments"]).column("segments").to_pylist()
        for seg in row
    ]
    assert {x["placed_by"] for x in segs} == {"similarity@2"}
    recorded = [x["neighbor_similarity"] for x in segs]
    assert recorded[0] is None and all(v is not None for v in recorded[1:])
    prev = [segs[i - 1]["doc_id"] for i in range(1, len(segs))]
    for x, p in zip(segs[1:], prev, strict=True):
        if x["doc_id"] != p and x["part"] == 0:
            assert x["neighbor_similarity"] == pytest.approx(float(vecs[x["doc_id"]] @ vecs[p]), abs=2e-3)
    order = sim.extra["diversity"]["order"]["2048"]
    assert order["clusters"] == 4 and order["mean_neighbor_similarity"] > 0.3


def test_interleaving_covers_clusters_in_proportion() -> None:
    paths = [np.arange(0, 60), np.arange(60, 80), np.arange(80, 90)]
    feet = [np.full(len(p), 10) for p in paths]
    order = interleave_runs(paths, feet, run_tokens=100)
    assert sorted(order.tolist()) == list(range(90))
    cluster = np.searchsorted([60, 80], order, side="right")
    # each run stays whole (10 documents of one cluster), and in every half of the sequence each cluster
    # has about its share
    for half in (cluster[:45], cluster[45:]):
        share = np.bincount(half, minlength=3) / len(half)
        assert np.allclose(share, [60 / 90, 20 / 90, 10 / 90], atol=0.12)
    for p in paths:  # within a cluster the path order is kept
        pos = [int(np.flatnonzero(order == d)[0]) for d in p]
        assert pos == sorted(pos)


def test_nn_path_visits_each_once_and_beats_random_order() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 32))
    x = np.repeat(centers, 30, axis=0) + 0.3 * rng.normal(size=(600, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    perm = rng.permutation(600)
    x = x[perm]
    for flat_max in (16384, 100):  # exact, then HNSW for "large" clusters
        path = nn_path(x, np.zeros(600), 8, IndexConfig(flat_max=flat_max), 0)
        assert sorted(path.tolist()) == list(range(600))
        along = (x[path[1:]] * x[path[:-1]]).sum(1).mean()
        rand = (x[perm[1:]] * x[perm[:-1]]).sum(1).mean()
        assert along > rand + 0.4


# --- units ---------------------------------------------------------------------------------------------


def test_chunk_spans_tile_or_spread_and_never_truncate_silently() -> None:
    assert chunk_spans(100, 192, 8) == [(0, 100)]
    tiles = chunk_spans(1000, 192, 8)
    assert tiles[0][0] == 0 and tiles[-1][1] == 1000 and len(tiles) == 6
    assert all(b - a <= 192 for a, b in tiles) and all(x[1] == y[0] for x, y in itertools.pairwise(tiles))
    spread = chunk_spans(100_000, 192, 8)
    assert len(spread) == 8 and spread[0] == (0, 192) and spread[-1] == (100_000 - 192, 100_000)
    gaps = np.diff([a for a, _ in spread])
    assert gaps.max() - gaps.min() <= 1


def test_greedy_drop_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = 12
        adj = np.triu(rng.random((n, n)) < 0.2, 1)
        i, j = np.nonzero(adj)
        got = greedy_drop(n, i, j)
        kept: list[int] = []
        want = np.zeros(n, bool)
        for v in range(n):
            if any(adj[k, v] for k in kept):
                want[v] = True
            else:
                kept.append(v)
        assert (got == want).all()
        who, near, _ = nearest_kept(i, j, np.ones(len(i), np.float32), got)
        assert set(who.tolist()) == set(np.flatnonzero(got).tolist()) and not got[near].any()


def test_flat_and_approximate_search_find_the_same_near_duplicates() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 64)).astype(np.float32)
    x[2000:2100] = x[:100] + 0.05 * rng.normal(size=(100, 64))  # planted near-duplicates
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i, j, _s, method = near_pairs(x, 0.95, IndexConfig())
    assert method == "flat" and set(zip(i.tolist(), j.tolist(), strict=True)) == {
        (k, 2000 + k) for k in range(100)
    }
    for kind in ("hnsw", "ivf"):
        ia, ja, _, m2 = near_pairs(x, 0.95, IndexConfig(flat_max=100, kind=kind, nprobe=16))
        assert m2 == kind
        found = set(zip(ia.tolist(), ja.tolist(), strict=True))
        assert len(found & {(k, 2000 + k) for k in range(100)}) >= 95
    nbr, sim = knn(x[:50], 3, IndexConfig())
    assert (
        nbr.shape == (50, 3)
        and (nbr != np.arange(50)[:, None]).all()
        and (np.diff(sim, axis=1) <= 1e-6).all()
    )


def test_embedding_cache_round_trip(tmp_path: Path) -> None:
    c = EmbeddingCache(tmp_path, "k", 4, "float16")
    keys = np.array([b"%064d" % i for i in range(10)], dtype="S64")
    vecs = np.arange(40, dtype=np.float32).reshape(10, 4) / 40
    c.add(keys[:6], vecs[:6])
    c.add(keys[4:], vecs[4:])  # overlapping segments are fine
    found, got = c.lookup(keys[::-1])
    assert found.all() and np.allclose(got, vecs[::-1], atol=1e-3)
    found, got = c.lookup(np.array([b"x" * 64, keys[3]], dtype="S64"))
    assert found.tolist() == [False, True] and np.allclose(got[0], vecs[3], atol=1e-3)


def test_static_model_is_fast_and_agrees_with_minilm_and_loads_as_model2vec(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the mat.",
        "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
        "The strong force binds quarks together inside protons.",
    ]
    static, minilm = load_embedder("static-minilm"), load_embedder("minilm")
    assert static.dim == 256 and minilm.dim == 384 and static.max_seq_tokens is None
    s, m = static.encode(texts), minilm.encode(texts)
    assert (s @ s.T)[0, 1] > (s @ s.T)[0, 2] and (s @ s.T)[2, 3] > (s @ s.T)[1, 3]
    assert np.allclose(np.linalg.norm(s, axis=1), 1, atol=1e-5) and (m @ m.T)[0, 1] > 0.8
    # the same weights in model2vec's folder layout load through `model2vec:<folder>`
    module = static.model[0]  # type: ignore[attr-defined]
    folder = tmp_path / "m2v"
    folder.mkdir()
    module.tokenizer.save(str(folder / "tokenizer.json"))
    save_file({"embeddings": module.embedding.weight.detach().numpy()}, str(folder / "model.safetensors"))
    m2v = load_embedder(f"model2vec:{folder}")
    assert np.allclose(m2v.encode(texts), s, atol=1e-5)


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"diversity\.embedder"):
        make_config(tmp_path, diversity={"embedder": "word2vec"})
    with pytest.raises(ConfigError, match=r"diversity.semdedup.threshold"):
        make_config(tmp_path, diversity={"embedder": "minilm", "semdedup": {"threshold": 1.5}})
    with pytest.raises(ConfigError, match=r"diversity.d4.keep_fraction"):
        make_config(tmp_path, diversity={"embedder": "minilm", "d4": {"keep_fraction": 0}})
    with pytest.raises(ConfigError, match=r"diversity.semdedup.keep"):
        make_config(tmp_path, diversity={"embedder": "minilm", "semdedup": {"keep": "best"}})
    with pytest.raises(ConfigError, match=r"needs diversity\.embedder"):
        make_config(tmp_path, packing=sample_dict()["packing"] | {"strategy": "similarity"})
    from pipeline.build import preflight

    cfg = make_config(tmp_path / "out", diversity={"embedder": "st:./no/such/model"})
    with pytest.raises(ConfigError, match="not found"):
        preflight(cfg)


# --- the flow -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_flow_with_diversity_reconciles(tmp_path: Path, prefect_harness: None) -> None:
    from flows.build import run

    packing = sample_dict()["packing"] | {"strategy": "similarity"}
    diversity = {
        "embedder": "static-minilm",
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        "d4": {"keep_fraction": 0.9},
    }
    cfg = make_config(tmp_path / "out", diversity=diversity, packing=packing)
    result = run(cfg)
    assert result["checks_ok"]
    m = Manifest.model_validate_json((tmp_path / "out" / "manifest.json").read_text())
    assert m.ok and "embed" in m.stages and m.audit["pruned"]
    d = m.extra["diversity"]
    assert d["pruned_matches_filtered"] and d["embedding"]["shards"] == len(m.inputs)
    assert d["embedding"]["partial_documents"] > 0  # the books are embedded from spread-out chunks
    n_pruned = sum(f.rows for f in m.audit["pruned"])
    assert n_pruned == sum(d["pruned_by_rule"].values()) > 0
    assert {t.strategy for t in m.targets} == {"similarity@2"}
    # 18.3: a rerun in place reuses every embedding shard, and the report of the Prefect run says so
    assert run(cfg)["checks_ok"]
    embed = next(s for s in run_report(tmp_path / "out")["stages"] if s["stage"] == "embed")
    assert embed["reused"] == embed["units"] == len(m.inputs)


# --- issue 18 ---------------------------------------------------------------------------------------------


def reference_coverage(cfg: BuildConfig, chunk: int, max_chunks: int) -> tuple[int, float]:
    """(partial documents, smallest coverage) recounted from the prepared documents with chunk_spans."""
    partial, lowest = 0, 1.0
    for f in sorted((WorkDir(cfg).prepare_dir / "documents").glob("*.parquet")):
        for n in pq.read_table(f, columns=["n_tokens"]).column("n_tokens").to_pylist():
            covered = sum(b - a for a, b in chunk_spans(n, chunk, max_chunks))
            if covered < n:
                partial, lowest = partial + 1, min(lowest, covered / n)
    return partial, lowest


def test_partial_embedding_count_is_the_same_with_a_warm_cache(corpus: Corpus, tmp_path: Path) -> None:
    """18.1: coverage is a property of the documents and the chunking, not of where the vector came from."""
    small = {"embedder": "static-minilm", "chunk_tokens": 32, "max_chunks": 2}
    cold_cfg = corpus.config(tmp_path / "cold", tmp_path / "cache", **small)
    cold = run_build(cold_cfg).extra["diversity"]["embedding"]
    warm = run_build(corpus.config(tmp_path / "warm", tmp_path / "cache", **small)).extra["diversity"][
        "embedding"
    ]
    partial, lowest = reference_coverage(cold_cfg, 32, 2)
    assert partial > 0
    for e in (cold, warm):
        assert e["partial_documents"] == partial
        assert e["min_coverage"] == pytest.approx(lowest)


def test_manifest_holds_no_timings_and_the_report_does(corpus: Corpus, tmp_path: Path) -> None:
    """18.2: two runs of one config (cold cache, then warm, then in place) give byte-identical manifests;
    18.3: the report counts the embedding shards a rerun in place reused."""
    div = {"embedder": "static-minilm", "packing": {"strategy": "similarity", "targets": [{"length": 2048}]}}
    cfg = corpus.config(tmp_path / "out", tmp_path / "cache", **div)
    run_build(cfg)
    first = (tmp_path / "out" / "manifest.json").read_bytes()
    shutil.rmtree(tmp_path / "out")
    run_build(cfg)  # warm cache: different hit counts and seconds, same output
    assert (tmp_path / "out" / "manifest.json").read_bytes() == first
    run_build(cfg)  # in place: every shard reused
    assert (tmp_path / "out" / "manifest.json").read_bytes() == first
    m = Manifest.model_validate_json(first)
    assert "seconds" not in json.dumps(m.extra["diversity"])
    report = run_report(tmp_path / "out")
    d = report["diversity"]
    assert d["embedding"]["seconds"] >= 0 and d["semdedup"]["seconds"] > 0
    assert d["order"]["2048"]["seconds"] > 0
    embed = next(s for s in report["stages"] if s["stage"] == "embed")
    assert embed["units"] == m.extra["diversity"]["embedding"]["shards"] == len(m.inputs)
    assert embed["reused"] == embed["units"] == d["embedding"]["shards_reused"]


def save_as_model2vec(folder: Path) -> None:
    """The static-minilm weights in model2vec's folder layout (tokenizer.json + model.safetensors)."""
    from safetensors.numpy import save_file

    module = load_embedder("static-minilm").model[0]  # type: ignore[attr-defined]
    folder.mkdir(parents=True)
    module.tokenizer.save(str(folder / "tokenizer.json"))
    save_file({"embeddings": module.embedding.weight.detach().numpy()}, str(folder / "model.safetensors"))


def test_model_paths_resolve_against_the_config_folder(
    corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """18.4: `model2vec:models/m2v` is the folder beside the config (as sources are), whatever the cwd,
    and a path that exists is never taken for a hub id although it is shaped like `org/name`."""
    from pipeline.build import preflight

    save_as_model2vec(corpus.root / "models" / "m2v")
    monkeypatch.chdir(tmp_path)  # the config's folder is corpus.root, not the working directory
    cfg = corpus.config(tmp_path / "out", tmp_path / "cache", embedder="model2vec:models/m2v")
    preflight(cfg)
    m = run_build(cfg)
    assert m.ok and m.extra["diversity"]["embedding"]["embedder"].startswith("model2vec:m2v@")


def one_line_config_error(cfg: BuildConfig) -> str:
    from pipeline.build import preflight

    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_missing_model_paths_and_unreachable_hub_ids_fail_in_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """18.4: a missing local model path is "not found"; a hub id the hub cannot serve fails once, in
    preflight (what `longloom validate` and `longloom build` run before any work), with one line."""
    import http.server
    import threading

    from huggingface_hub import constants

    for spec in ("st:/no/such/model", "model2vec:./models/missing", "st:~/no/such/model"):
        msg = one_line_config_error(make_config(tmp_path / "out", diversity={"embedder": spec}))
        assert "not found" in msg and ("no/such/model" in msg or "models/missing" in msg)
    # shaped like a hub id and not on disk: not in the local hub cache, and the machine is offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = make_config(tmp_path / "out", diversity={"embedder": "st:acme/no-such-model"})
    assert "HF_HUB_OFFLINE" in one_line_config_error(offline)
    # online, but the hub answers 503: asked exactly once (no retries), one line
    requests: list[str] = []

    class Down(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Down)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        msg = one_line_config_error(offline)
    finally:
        server.shutdown()
    assert "acme/no-such-model" in msg and "cannot serve" in msg
    # the client may ask other endpoints of its own (agent-harnesses); the model is asked for once
    assert [r for r in requests if "no-such-model" in r] == ["/api/models/acme/no-such-model"], requests


def test_a_model_that_fails_to_load_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """18.4: the loader remembers a failure (every shard asks), and the Prefect task does not retry it."""
    from prefect.states import Failed

    import pipeline.embedders.registry as embed
    from flows.build import retry_unless_embedder_error

    calls: list[str] = []

    def broken(spec: str, device: str, tokenizer: object) -> embed.Embedder:
        calls.append(spec)
        raise embed.EmbedderError(f"diversity.embedder {spec!r}: cannot load")

    monkeypatch.setattr(embed, "_build", broken)
    for _ in range(3):
        with pytest.raises(embed.EmbedderError, match="cannot load"):
            embed.load_embedder("st:acme/unloadable")
    assert calls == ["st:acme/unloadable"]
    assert not retry_unless_embedder_error(None, None, Failed(data=embed.EmbedderError("x")))
    assert retry_unless_embedder_error(None, None, Failed(data=OSError("disk hiccup")))


def test_a_fully_cached_rerun_loads_no_model(
    corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """18.7: the model is loaded only when a cache miss needs it; static-tokens skips the cache, which is
    slower to read than embedding from token ids."""
    import pipeline.embedders.registry as embed

    first = corpus.config(tmp_path / "first", tmp_path / "cache", embedder="static-minilm")
    run_build(first)
    vecs = doc_vectors(tmp_path / "first", first)
    loads: list[str] = []
    real_build = embed._build

    def counting(spec: str, device: str, tokenizer: Any) -> embed.Embedder:
        loads.append(spec)
        return real_build(spec, device, tokenizer)

    monkeypatch.setattr(embed, "_build", counting)
    monkeypatch.setattr(embed, "_LOADED", {})  # a fresh process: nothing loaded yet
    again = corpus.config(tmp_path / "again", tmp_path / "cache", embedder="static-minilm")
    run_build(again)
    assert loads == []
    assert run_report(tmp_path / "again")["diversity"]["embedding"]["cache_hits"] == corpus.n
    warm = doc_vectors(tmp_path / "again", again)
    assert all(np.array_equal(vecs[k], warm[k]) for k in vecs)
    # a new text is a miss: now the model is loaded, once
    extra = corpus.root / "more.jsonl"
    extra.write_text(json.dumps({"id": "new-1", "text": "A document no run has embedded yet. " * 40}) + "\n")
    more = corpus.config(tmp_path / "more", tmp_path / "cache", embedder="static-minilm")
    more = more.model_copy(
        update={
            "sources": [
                *more.sources,
                more.sources[0].model_copy(update={"name": "more", "paths": ["more.jsonl"]}),
            ]
        }
    )
    run_build(more)
    assert loads == ["static-minilm"]
    # static-tokens neither reads nor fills the cache
    tokens = corpus.config(tmp_path / "tokens", tmp_path / "tokens-cache", embedder="static-tokens")
    run_build(tokens)
    assert not list((tmp_path / "tokens-cache").rglob("*.npy"))
    e = run_report(tmp_path / "tokens")["diversity"]["embedding"]
    assert e["cache_hits"] == 0 and e["cache_misses"] == corpus.n


def test_near_duplicates_split_across_clusters_are_found() -> None:
    """18.5: pairs that k-means puts in two clusters meet as boundary guests; the drops equal those of
    one exact cluster (the reference: every pair compared), and each names a kept partner."""
    from pipeline.corpus.semantic.prune import semdedup_arrays
    from schemas.diversity import SemDedupConfig

    rng = np.random.default_rng(5)
    d = 32
    centers = rng.normal(size=(8, d))
    x = np.repeat(centers, 150, axis=0) + 0.9 * rng.normal(size=(1200, d))
    # 40 planted pairs halfway between two topics: each copy leans a little to one side
    a, b = centers[rng.integers(0, 8, 40)], centers[rng.integers(0, 8, 40)]
    mid = (a + b) / 2 + 0.3 * rng.normal(size=(40, d))
    lean = 0.03 * (a - b)
    x = np.r_[x, mid + lean, mid - lean + 0.02 * rng.normal(size=(40, d))]
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    n_tokens = rng.integers(100, 1000, len(x))

    def run(clusters: int, margin: str | float | None) -> Any:
        sd = SemDedupConfig(kmeans={"clusters": clusters}, boundary_margin=margin)
        return semdedup_arrays(x, n_tokens, 0.97, sd, IndexConfig(), 0)

    exact = run(1, None)
    planted = {(1200 + k, 1240 + k) for k in range(40)}
    found = {tuple(sorted((int(p), int(q)))) for p, q in zip(exact.dropped, exact.nearest, strict=True)}
    assert found >= planted
    inside = run(8, None)
    assert not inside.across.any() and len(inside.dropped) < len(exact.dropped)  # the defect: pairs split
    guests = run(8, "auto")  # the default
    assert set(guests.dropped.tolist()) == set(exact.dropped.tolist())
    assert guests.across.any() and 0 < guests.guests < len(x) // 4  # bounded: few documents compared twice
    kept = np.ones(len(x), bool)
    kept[guests.dropped] = False
    assert kept[guests.nearest].all()
    cos = (x[guests.dropped] * x[guests.nearest]).sum(1)
    assert np.allclose(cos, guests.similarity, atol=1e-5) and (cos > 0.97).all()


def test_confirmed_greedy_equals_checking_every_pair_first() -> None:
    """18.6: the lexical check is asked lazily, with the result of filtering every pair first."""
    from pipeline.corpus.semantic.prune import confirmed_greedy

    rng = np.random.default_rng(4)
    for _ in range(40):
        n = 30
        adj = np.triu(rng.random((n, n)) < 0.25, 1)
        lo, hi = np.nonzero(adj)
        sim = rng.random(len(lo)).astype(np.float32)
        passes = rng.random((n, n)) < 0.6
        asked: list[tuple[int, int]] = []

        def check(a: int, b: int, passes: np.ndarray = passes, asked: list = asked) -> float:
            asked.append((a, b))
            return 1.0 if passes[min(a, b), max(a, b)] else 0.0

        dropped, who, near, cos, lex, _ = confirmed_greedy(n, lo, hi, sim, check, 0.5)
        ok = passes[lo, hi]
        want = greedy_drop(n, lo[ok], hi[ok])
        w_who, w_near, w_sim = nearest_kept(lo[ok], hi[ok], sim[ok], want)
        assert (dropped == want).all()
        o = np.argsort(who)
        assert (who[o] == w_who).all() and (near[o] == w_near).all() and np.allclose(cos[o], w_sim)
        assert (lex == 1.0).all() and len(asked) <= len(lo)


def test_boundary_guests_memory_does_not_grow_with_the_dimension() -> None:
    """18 (1M regression): the 'auto' margin needs each row's distance between its two centroids. It was
    computed by gathering both centroids per row (three n x d float64 arrays: 6 GB at 1M documents of
    256 dimensions); it must take O(n + k^2) memory and give the distances a direct per-row norm gives."""
    import tracemalloc

    from pipeline.corpus.semantic.cluster import assign_top2
    from pipeline.corpus.semantic.prune import boundary_guests

    rng = np.random.default_rng(11)
    n, d, k = 20_000, 256, 40
    c = rng.normal(size=(k, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    # each row leans to one centroid and, by a random weight, to another: some rows sit on a boundary
    p, q, w = rng.integers(0, k, n), rng.integers(0, k, n), rng.random((n, 1)).astype(np.float32)
    x = c[p] + w * c[q] + 0.05 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels, csim, labels2, csim2 = assign_top2(x, c)
    # the reference: the bound of the docstring with each row's centroid distance computed on its own
    cc = c.astype(np.float64)
    dist = np.array([np.linalg.norm(cc[p] - cc[q]) for p, q in zip(labels, labels2, strict=True)])
    bound = 0.5 * np.sqrt(2.0 - 2.0 * 0.9) * dist
    want = (labels2 >= 0) & (csim - csim2 <= bound + 1e-6)
    tracemalloc.start()
    got = boundary_guests(c, labels, csim, labels2, csim2, 0.9, "auto")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 0 < want.sum() < n and (got == want).all()
    assert peak < 64 * n, f"boundary_guests allocated {peak / 1e6:.1f} MB for {n} rows ({peak / n:.0f} B/row)"
