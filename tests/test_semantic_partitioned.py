"""Partitioned SemDeDup/D4 (issue 14 item 2): `run.select_partitions` > 1 with diversity pruning on.

Real text (the bundled Wikipedia sample), planted near-duplicates (lightly edited copies) and exact
copies, in several shards and two sources (one with a token budget), embedded with `static-tokens`.
The P > 1 runs are compared with a P = 1 run of the same config, and both with a reference written
here from the stored vectors and the centroids (numpy only: nearest centroids, pairs, the greedy keep
rule), so the test says exactly which pairs a partitioned run leaves out and checks nothing else moved.
"""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.build import run_build
from pipeline.core.workdir import WorkDir
from pipeline.stages.embed import embed_dir
from schemas.config import BuildConfig, ConfigError
from schemas.manifest import Manifest
from tests.conftest import DATA, make_config, sample_dict
from tests.test_diversity import light_edit

SHARDS = 3


class Corpus:
    """~330 documents in 3 files per source: distinct leads, 40 edited copies, 12 exact copies."""

    def __init__(self, root: Path) -> None:
        with gzip.open(DATA / "sample/wiki/part-000.jsonl.gz", "rt", encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
        docs = [d for d in docs if not d["id"].endswith("-dup") and 300 < len(d["text"]) < 1500][:280]
        rng = random.Random(11)
        rows = list(docs)
        for i, d in enumerate(rng.sample(docs, 40)):
            rows.append({"id": f"{d['id']}-edited", "text": light_edit(d["text"], i)})
        for d in rng.sample(docs, 12):
            rows.append({"id": f"{d['id']}-copy", "text": d["text"]})
        rng.shuffle(rows)
        self.n = len(rows)
        self.root = root
        half = len(rows) // 2
        for name, part in (("wa", rows[:half]), ("wb", rows[half:])):
            for s in range(SHARDS):
                chunk = part[s::SHARDS]
                (root / f"{name}-{s}.jsonl").write_text(
                    "".join(json.dumps(r) + "\n" for r in chunk), encoding="utf-8"
                )

    def config(self, out: Path, partitions: int, budget: int | None = None, **diversity: Any) -> BuildConfig:
        div: dict[str, Any] = {
            "embedder": "static-tokens",
            "progress": False,
            "cache_dir": str(out.parent / "emb-cache"),
            "semdedup": {"lexical": {"enabled": False}, "kmeans": {"clusters": 8}},
        }
        for k, v in diversity.items():
            div[k] = {**div.get(k, {}), **v} if isinstance(v, dict) else v
        return make_config(
            out,
            base_dir=self.root,
            sources=[
                {"name": "wa", "kind": "jsonl", "paths": ["wa-*.jsonl"], "id_field": "id"},
                {
                    "name": "wb",
                    "kind": "jsonl",
                    "paths": ["wb-*.jsonl"],
                    "id_field": "id",
                    "token_budget": budget,
                },
            ],
            packing={"strategy": "best_fit", "targets": [{"length": 2048}]},
            diversity=div,
            procedural={"enabled": False},
            run={**sample_dict().get("run", {}), "select_partitions": partitions},
        )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("semcorpus"))


def build(cfg: BuildConfig) -> Manifest:
    m = run_build(cfg)
    assert m.ok, [c for c in m.checks if not c.ok]
    return m


# ---- an independent recount of the published tables ----------------------------------------------


def input_ids(corpus: Corpus) -> list[str]:
    return [
        json.loads(line)["id"]
        for f in sorted(corpus.root.glob("w*.jsonl"))
        for line in f.read_text(encoding="utf-8").splitlines()
    ]


def audit(out: Path, name: str) -> list[dict]:
    return [r for f in sorted((out / "audit" / name).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def kept_ids(out: Path) -> list[str]:
    return [
        s["doc_id"]
        for f in sorted((out / "data").glob("pretrain_*/*.parquet"))
        for row in pq.read_table(f, columns=["segments"]).column("segments").to_pylist()
        for s in row
    ]


def check_every_document_accounted(corpus: Corpus, out: Path) -> tuple[set[str], dict[str, dict]]:
    """Every input document is kept or has exactly one `filtered` row; every pruned row is a filtered
    row with the matching reason. Returns the kept ids and the filtered rows by doc id."""
    ids = input_ids(corpus)
    assert len(ids) == len(set(ids)) == corpus.n
    filtered = audit(out, "filtered")
    counts = Counter(r["doc_id"] for r in filtered)
    assert max(counts.values()) == 1, [d for d, c in counts.items() if c > 1]
    by_id = {r["doc_id"]: r for r in filtered}
    kept = set(kept_ids(out))
    assert not kept & set(by_id)
    assert kept | set(by_id) == set(ids), set(ids) - kept - set(by_id)
    reason = {"semdedup@1": "semantic_duplicate", "d4@1": "prototypical"}
    pruned = audit(out, "pruned")
    assert len({r["doc_id"] for r in pruned}) == len(pruned)
    for r in pruned:
        assert by_id[r["doc_id"]]["reason"] == reason[r["step"]], r["doc_id"]
        # its partner stayed through this step (a later step, D4 or a budget, may drop it, as in one process)
        partner = by_id.get(r["nearest_kept"])
        assert partner is None or partner["reason"] != reason[r["step"]], (r["doc_id"], r["nearest_kept"])
    assert len(pruned) == sum(1 for r in filtered if r["reason"] in reason.values())
    return kept, by_id


def units_of(out: Path) -> dict[str, int]:
    report = json.loads((out / "report.json").read_text())
    return {s["stage"]: s["units"] for s in report["stages"]}


# ---- the reference: from the stored vectors and centroids, numpy only -----------------------------


class Reference:
    """Documents after exact dedup in canonical order, their vectors, nearest and second-nearest
    centroid (argmax of the products), and the pairs above the threshold."""

    def __init__(self, cfg: BuildConfig, centroids: np.ndarray, threshold: float) -> None:
        work = WorkDir(cfg)
        ids, ntok, vecs, seen = [], [], [], set()
        for f in sorted((work.prepare_dir / "documents").glob("*.parquet")):
            t = pq.read_table(f, columns=["doc_id", "content_hash", "n_tokens"])
            v = np.load(embed_dir(cfg, work) / f"{f.stem}.npy").astype(np.float32)
            for i, (d, h, n) in enumerate(
                zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True)
            ):
                if h not in seen:  # exact dedup: the first copy in canonical order stays
                    seen.add(h)
                    ids.append(d)
                    ntok.append(n)
                    vecs.append(v[i])
        self.ids, self.ntok = ids, np.array(ntok)
        x = np.stack(vecs)
        s = x @ centroids.T
        top = np.argsort(-s, axis=1, kind="stable")
        self.label, self.label2 = top[:, 0], top[:, 1]
        sim = x @ x.T
        ii, jj = np.nonzero(np.triu(sim > threshold, 1))
        self.pairs = list(zip(ii.tolist(), jj.tolist(), strict=True))

    def check_groups(self, group: np.ndarray, P: int) -> None:
        """The run's groups: P of them, each holding about 1/P of the vectors its unit reads (members and
        guests): at most a share plus the largest cluster."""
        k = len(group)
        load = np.bincount(self.label, minlength=k) + np.bincount(self.label2, minlength=k)
        held = np.bincount(group, weights=load, minlength=P)
        assert len(held) == P and held.min() > 0
        assert held.max() <= load.sum() / P + load.max(), held

    def used(self, guests: bool, group: np.ndarray | None) -> list[tuple[int, int]]:
        """Pairs some cluster holds both ends of (as members or guests); with `group`, only pairs met
        in a cluster whose group is also both ends' own clusters' group."""
        out = []
        for a, b in self.pairs:
            clusters_a = {self.label[a]} | ({self.label2[a]} if guests else set())
            clusters_b = {self.label[b]} | ({self.label2[b]} if guests else set())
            met = clusters_a & clusters_b
            if group is not None:
                own = {group[self.label[a]], group[self.label[b]]}
                met = {c for c in met if len(own) == 1 and group[c] in own}
            if met:
                out.append((a, b))
        return out

    def greedy(self, pairs: list[tuple[int, int]]) -> set[str]:
        """Longest first (earlier on ties); a document goes when a kept earlier one is paired with it."""
        order = sorted(range(len(self.ids)), key=lambda i: (-self.ntok[i], i))
        rank = {d: r for r, d in enumerate(order)}
        partners: dict[int, list[int]] = {}
        for a, b in pairs:
            partners.setdefault(a, []).append(b)
            partners.setdefault(b, []).append(a)
        dropped: set[int] = set()
        for d in order:
            if any(rank[p] < rank[d] and p not in dropped for p in partners.get(d, [])):
                dropped.add(d)
        return {self.ids[d] for d in dropped}


def centroids_of(cfg: BuildConfig) -> np.ndarray:
    folder = WorkDir(cfg).select_dir / f"semantic-{cfg.run.select_partitions}"
    return np.load(folder / "centroids.npy").astype(np.float32)


def pruned_ids(out: Path, step: str = "semdedup@1") -> set[str]:
    return {r["doc_id"] for r in audit(out, "pruned") if r["step"] == step}


# ---- tests ----------------------------------------------------------------------------------------


def test_no_pair_spans_groups_output_identical_to_one_partition(corpus: Corpus, tmp_path: Path) -> None:
    """Without boundary guests every pair lies in one cluster, so in one group: P = 3 prunes exactly
    what P = 1 prunes, and (SemDeDup only) publishes the same bytes, budget cut included."""
    budget = 12_000
    one = corpus.config(tmp_path / "p1" / "out", 1, budget, semdedup={"boundary_margin": None})
    three = corpus.config(tmp_path / "p3" / "out", 3, budget, semdedup={"boundary_margin": None})
    m1, m3 = build(one), build(three)
    for out in (one.output.dir, three.output.dir):
        check_every_document_accounted(corpus, Path(out))
    p1, p3 = pruned_ids(Path(one.output.dir)), pruned_ids(Path(three.output.dir))
    assert p1 and p1 == p3
    ref = Reference(three, centroids_of(three), 0.97)
    assert ref.greedy(ref.used(False, None)) == p1  # the reference reproduces the single process
    f1 = pq.read_table(Path(one.output.dir) / "audit/filtered").sort_by("doc_id")
    f3 = pq.read_table(Path(three.output.dir) / "audit/filtered").sort_by("doc_id")
    assert f1.equals(f3)
    assert "source_budget" in {r["reason"] for r in audit(Path(three.output.dir), "filtered")}
    for name in ("data", "audit/pruned"):
        a = sorted((Path(one.output.dir) / name).rglob("*.parquet"))
        b = sorted((Path(three.output.dir) / name).rglob("*.parquet"))
        assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b], name
    units = units_of(Path(three.output.dir))
    assert units["semantic_exact"] == 3 and units["semantic_prune"] == 3
    assert units["semantic_assign"] == 2 * SHARDS
    assert "semantic_prune" not in units_of(Path(one.output.dir))
    assert m1.extra["diversity"]["semdedup"]["pruned"] == m3.extra["diversity"]["semdedup"]["pruned"]


def test_pairs_across_groups_are_the_only_difference(corpus: Corpus, tmp_path: Path) -> None:
    """Every document a guest (margin 2) and a threshold (0.6) that pairs distinct leads: many pairs span clusters. P = 4 leaves
    out exactly the pairs not met inside one group; the reference built from the vectors gives both
    pruned sets, and the difference is not empty."""
    div: dict[str, Any] = {"semdedup": {"boundary_margin": 2.0, "threshold": 0.6, "kmeans": {"clusters": 16}}}
    one = corpus.config(tmp_path / "p1" / "out", 1, None, **div)
    four = corpus.config(tmp_path / "p4" / "out", 4, None, **div)
    build(one)
    build(four)
    for out in (one.output.dir, four.output.dir):
        check_every_document_accounted(corpus, Path(out))
    p1, p4 = pruned_ids(Path(one.output.dir)), pruned_ids(Path(four.output.dir))
    ref = Reference(four, centroids_of(four), 0.6)
    all_pairs = ref.used(True, None)
    group = np.array(json.loads((WorkDir(four).select_dir / "semantic-4" / "groups.json").read_text()))
    ref.check_groups(group, 4)
    grouped = ref.used(True, group)
    assert len(grouped) < len(all_pairs)
    assert ref.greedy(all_pairs) == p1
    assert ref.greedy(grouped) == p4
    assert p1 != p4  # the left-out pairs changed decisions, and the reference explains each one
    stats = json.loads((Path(four.output.dir) / "manifest.json").read_text())["extra"]["diversity"][
        "semdedup"
    ]
    assert stats["boundary_guests_across_groups"] > 0 and stats["groups"] == 4


def test_d4_and_budgets_partitioned_reconcile(corpus: Corpus, tmp_path: Path) -> None:
    """SemDeDup then D4 per group, with a source budget: every document is accounted for once, the
    manifest's checks pass, and D4 keeps its fraction of each group's clusters."""
    cfg = corpus.config(tmp_path / "p3" / "out", 3, 12_000, d4={"keep_fraction": 0.8})
    m = build(cfg)
    out = Path(cfg.output.dir)
    _, by_id = check_every_document_accounted(corpus, out)
    reasons = Counter(r["reason"] for r in by_id.values())
    assert reasons["prototypical"] > 0 and reasons["semantic_duplicate"] > 0 and reasons["source_budget"] > 0
    d4 = m.extra["diversity"]["d4"]
    assert d4["pruned"] == reasons["prototypical"]
    assert m.extra["diversity"]["pruned_matches_filtered"]
    # D4 per group keeps ceil(0.8 x size) of each of its clusters: at most ~20% of what SemDeDup kept
    assert d4["pruned"] <= 0.2 * d4["documents_in"] + d4["clusters"]


def test_similarity_packing_with_partitions_is_refused_before_any_work(
    corpus: Corpus, tmp_path: Path
) -> None:
    cfg = corpus.config(tmp_path / "out", 3)
    cfg = cfg.model_copy(update={"packing": cfg.packing.model_copy(update={"strategy": "similarity"})})
    with pytest.raises(ConfigError, match=r"run.select_partitions=3: packing.strategy: similarity"):
        run_build(cfg)
    assert not list((tmp_path / "out").glob(".longloom/prepare-*/documents/*.parquet"))
