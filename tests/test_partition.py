"""Partitioned selection (issue 14.2): P hash-partition units plus a streaming layout pass must decide
exactly what the single-process select stage decides, byte for byte.

Each case synthesizes prepare-stage outputs (documents files and PrepareResult records; no tokens are
needed to select) with exact copies within and across shards and sources, runs today's
`select_and_layout` and the partitioned path (P = 1, 3, 8) on the same inputs, and compares the
SelectResult (all but `seconds`), the layout files and the `filtered` table byte for byte. A plain-
Python recount over the documents files (first copy of each hash in shard/row order; each budgeted
source's documents in seeded order up to its budget) checks which documents survive.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.packing import BestFitPacker, GreedyPacker, pack_best_fit, pack_greedy
from pipeline.core.parquet_io import ParquetSink
from pipeline.core.workdir import WorkDir
from pipeline.corpus.filters import stable_uniform
from pipeline.corpus.partition import (
    ScatterResult,
    dedup_partition,
    hash_bytes,
    scatter_shard,
    select_partitioned,
)
from pipeline.stages.base import Stage
from pipeline.stages.plan import STAGES, select
from pipeline.stages.prepare import PrepareResult
from pipeline.stages.select import inputs_key
from schemas.config import BuildConfig, ConfigError, parse_config
from schemas.records import DOC_SCHEMA

CASES: dict[str, dict[str, Any]] = {
    "best_fit, budget, one target": {
        "strategy": "best_fit",
        "targets": [{"length": 512}],
        "budget": 0.6,
        "last_row": "pad",
    },
    "greedy, budget, two targets with budgets, last row dropped": {
        "strategy": "greedy",
        "targets": [
            {"length": 256, "weight": 1, "token_budget": 30000},
            {"length": 1024, "weight": 2, "token_budget": 40000},
        ],
        "budget": 0.7,
        "last_row": "drop",
    },
    "best_fit, no budget, last row dropped, no dedup": {
        "strategy": "best_fit",
        "targets": [{"length": 300}, {"length": 2048}],
        "budget": None,
        "last_row": "drop",
        "exact_dedup": False,
    },
}


def make_corpus(folder: Path, seed: int) -> tuple[list[PrepareResult], int]:
    """Documents files of 5 shards (2 sources) with copies; returns the records and web's tokens."""
    rng = np.random.default_rng(seed)
    (folder / "documents").mkdir(parents=True)
    texts: list[bytes] = []
    prepared, web_tokens = [], 0
    for si, n in enumerate([700, 0, 450, 900, 333]):
        source = "code" if si == 3 else "web"
        hashes, docs = [], []
        for r in range(n):
            if texts and rng.random() < 0.15:  # a copy of an earlier text, maybe in another shard/source
                text = texts[int(rng.integers(0, len(texts)))]
            else:
                text = rng.bytes(12)
                texts.append(text)
            hashes.append(hashlib.sha256(text).hexdigest())
            docs.append(f"{source}/{si}/{r}")
        n_tokens = (rng.lognormal(4.0, 1.3, n).astype(np.int64) + 1) if n else np.zeros(0, np.int64)
        if source == "web":
            web_tokens += int(n_tokens.sum())
        table = pa.table(
            {
                "source": pa.array([source] * n, pa.string()),
                "uri": pa.array([f"{source}-{si}.jsonl"] * n, pa.string()),
                "record": pa.array(np.arange(n, dtype=np.int64) + 1),
                "doc_id": pa.array(docs, pa.string()),
                "content_hash": pa.array(hashes, pa.string()),
                "n_chars": pa.array(n_tokens * 3),
                "n_bytes": pa.array(n_tokens * 3),
                "n_tokens": pa.array(n_tokens),
                "token_start": pa.array(np.cumsum(n_tokens) - n_tokens),
            },
            schema=DOC_SCHEMA,
        )
        rel = f"documents/s{si}.parquet"
        with ParquetSink(folder / rel, DOC_SCHEMA) as sink:
            sink.write(table)
        prepared.append(
            PrepareResult(
                shard_id=f"s{si}",
                source=source,
                uri=f"s{si}",
                revision=None,
                input_bytes=0,
                records_read=n,
                quarantined={},
                documents=n,
                tokens_read=int(n_tokens.sum()),
                filtered={},
                filtered_tokens={},
                kept=n,
                kept_tokens=int(n_tokens.sum()),
                files={"documents": rel},
                sha256={"documents": sink.sha256 or ""},
            )
        )
    return prepared, web_tokens


def config(out: Path, case: dict[str, Any], web_tokens: int, partitions: int) -> BuildConfig:
    budget = int(web_tokens * case["budget"]) if case["budget"] else None
    return parse_config(
        {
            "run": {"seed": 3, "select_partitions": partitions},
            "sources": [
                {"name": "web", "kind": "jsonl", "paths": ["x"], "token_budget": budget},
                {"name": "code", "kind": "jsonl", "paths": ["y"]},
            ],
            "filters": {"exact_dedup": case.get("exact_dedup", True)},
            "packing": {
                "strategy": case["strategy"],
                "targets": case["targets"],
                "last_row": case["last_row"],
                "open_bins": 7,  # few open rows and short windows: the streaming state is exercised
                "lookahead_docs": 50,
                "min_piece_tokens": 16,
            },
            "output": {"dir": str(out), "store_text": False},
        },
        base_dir=out,
    )


def run(
    corpus: Path, out: Path, case: dict[str, Any], web_tokens: int, prepared: list[PrepareResult], P: int
) -> tuple[Any, WorkDir]:
    cfg = config(out, case, web_tokens, max(1, P))
    work = WorkDir(cfg)
    work.prepare_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(corpus, work.prepare_dir)
    if P == 0:  # today's single-process path
        return select(cfg, work, prepared), work
    key = inputs_key(prepared)
    scattered = scatter(cfg, work, prepared)
    units = [dedup_partition(cfg, work, prepared, p, key, scattered) for p in range(P)]
    return select_partitioned(cfg, work, prepared, units), work


def scatter(cfg: BuildConfig, work: WorkDir, prepared: list[PrepareResult]) -> list[ScatterResult]:
    return [scatter_shard(cfg, work, prepared, si) for si in range(len(prepared))]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recount(work: WorkDir, prepared: list[PrepareResult], cfg: BuildConfig) -> set[str]:
    """Doc ids that survive exact dedup and budgets, counted in plain Python from the documents files."""
    docs = []
    for res in prepared:
        t = pq.read_table(work.prepare_dir / res.files["documents"]).to_pylist()
        docs += [(res.source, d["doc_id"], d["content_hash"], d["n_tokens"]) for d in t]
    seen: set[str] = set()
    alive = []
    for d in docs:
        if cfg.filters.exact_dedup and d[2] in seen:
            continue
        seen.add(d[2])
        alive.append(d)
    out = set()
    for name in ("web", "code"):
        mine = [d for d in alive if d[0] == name]
        budget = cfg.source(name).token_budget
        if budget is None:
            out |= {d[1] for d in mine}
            continue
        u = stable_uniform(cfg.run.seed, f"source_budget@1/{name}", [d[2] for d in mine]).tolist()
        total = 0
        for _u, i in sorted((u[i], i) for i in range(len(mine))):
            total += mine[i][3]
            if total > budget:
                break
            out.add(mine[i][1])
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_partitioned_select_is_byte_identical(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    corpus = tmp_path / "corpus"
    prepared, web_tokens = make_corpus(corpus, seed=len(name))
    single, w0 = run(corpus, tmp_path / "single", case, web_tokens, prepared, 0)
    ref = single.to_json()
    ref.pop("seconds")
    assert any(single.filtered.values()), "the case drops nothing: it would test little"
    for P in (1, 3, 8):
        got, w = run(corpus, tmp_path / f"p{P}", case, web_tokens, prepared, P)
        res = got.to_json()
        res.pop("seconds")
        assert res == ref, f"P={P}: SelectResult differs"
        for t in single.targets:
            assert digest(w.select_dir / t.layout_file) == digest(w0.select_dir / t.layout_file), (
                f"P={P} {t.layout_file}"
            )
        assert digest(w.select_dir / got.filtered_file) == digest(w0.select_dir / single.filtered_file), (
            f"P={P} filtered"
        )
    # which documents survive dedup and budgets, recounted without the code under test
    cfg = config(tmp_path / "single", case, web_tokens, 1)
    dropped = pq.read_table(w0.select_dir / single.filtered_file).to_pylist()
    early = {d["doc_id"] for d in dropped if d["step"] in ("exact_dedup@1", "source_budget@1")}
    every = {
        d
        for res in prepared
        for d in pq.read_table(w0.prepare_dir / res.files["documents"]).column("doc_id").to_pylist()
    }
    assert every - early == recount(w0, prepared, cfg)
    # and every surviving document is in a layout or has a later drop reason
    placed: set[str] = set()
    for t in single.targets:
        lay = pq.read_table(w0.select_dir / t.layout_file)
        for s, r in zip(lay.column("shard").to_pylist(), lay.column("doc_row").to_pylist(), strict=True):
            placed.add(f"{prepared[s].source}/{s}/{r}")
    late = {d["doc_id"] for d in dropped} - early
    assert placed | late == every - early and not placed & late


def test_partition_units_rerun_from_records(tmp_path: Path) -> None:
    """A unit whose verified record exists is reused; a changed partition file makes it run again."""
    case = CASES["best_fit, budget, one target"]
    corpus = tmp_path / "corpus"
    prepared, web_tokens = make_corpus(corpus, seed=5)
    _res, work = run(corpus, tmp_path / "o", case, web_tokens, prepared, 3)
    cfg = config(tmp_path / "o", case, web_tokens, 3)
    key = inputs_key(prepared)
    scattered = scatter(cfg, work, prepared)
    first = dedup_partition(cfg, work, prepared, 1, key, scattered)
    folder = work.select_dir / "partitions-3"
    (folder / first.dups_file).write_bytes(b"garbage")
    again = dedup_partition(cfg, work, prepared, 1, key, scattered)
    assert digest(folder / again.dups_file) == first.sha256["dups"]


def select_stage() -> Stage:
    """The select stage as the stage list builds it (its selectors and order handed in)."""
    return next(s for s in STAGES if s.name == "select")


def test_stage_units_are_partitions(tmp_path: Path) -> None:
    from pipeline.stages.base import Inputs, RunContext

    case = CASES["greedy, budget, two targets with budgets, last row dropped"]
    corpus = tmp_path / "corpus"
    prepared, web_tokens = make_corpus(corpus, seed=9)
    single, _w0 = run(corpus, tmp_path / "single", case, web_tokens, prepared, 0)
    cfg = config(tmp_path / "staged", case, web_tokens, 4)
    work = WorkDir(cfg)
    work.prepare_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(corpus, work.prepare_dir)
    inputs = Inputs()
    inputs.record("prepare", "k", prepared, None, frozenset())
    scatter_stage = next(s for s in STAGES if s.name == "scatter")
    assert scatter_stage.enabled(cfg) and not scatter_stage.enabled(config(tmp_path, case, web_tokens, 1))
    sc = scatter_stage.bind(RunContext(cfg), inputs)
    assert sc.units() == list(range(len(prepared)))
    inputs.record("scatter", "k", sc.merge([sc.run_unit(u) for u in sc.units()]), None, frozenset())
    sw = select_stage().bind(RunContext(cfg), inputs)
    assert sw.units() == [0, 1, 2, 3]
    merged = sw.merge([sw.run_unit(u) for u in sw.units()])
    assert merged.filtered_sha256 == single.filtered_sha256
    assert [t.layout_sha256 for t in merged.targets] == [t.layout_sha256 for t in single.targets]


def test_unsupported_partitioned_configs_fail_clearly(tmp_path: Path) -> None:
    from pipeline.stages.base import Inputs, RunContext

    case = dict(CASES["best_fit, budget, one target"])
    base = config(tmp_path, case, 1000, 2)
    cfg = base.model_copy(update={"packing": base.packing.model_copy(update={"doc_order": "shuffle"})})
    sw = select_stage().bind(RunContext(cfg), Inputs())
    with pytest.raises(ConfigError, match=r"run.select_partitions=2: packing.doc_order: shuffle"):
        sw.units()


def test_hash_bytes_names_the_bad_row() -> None:
    good = hashlib.sha256(b"a").hexdigest()
    raw = hash_bytes(pa.array([good, good.upper()]), "f.parquet")
    assert raw[0].tobytes() == hashlib.sha256(b"a").digest() == raw[1].tobytes()
    with pytest.raises(ValueError, match=r"f.parquet: row 1: content_hash is not a 64-character"):
        hash_bytes(pa.array([good, good[:-1]]), "f.parquet")
    with pytest.raises(ValueError, match=r"f.parquet: row 0: content_hash has a non-hex"):
        hash_bytes(pa.array(["z" * 64]), "f.parquet")


@pytest.mark.parametrize("strategy", ["greedy", "best_fit"])
def test_streaming_packers_match_batch(strategy: str) -> None:
    """Fed in uneven chunks with increasing ids, the streaming packers lay out what the batch ones do."""
    rng = np.random.default_rng(11)
    for L in (64, 1000):
        fp = rng.lognormal(3.5, 1.4, 3000).astype(np.int64) + 1
        ids = np.cumsum(rng.integers(1, 5, len(fp)))  # gaps: ids need only increase
        if strategy == "greedy":
            batch = pack_greedy(fp, L, "pad", min_piece=8)
            pk: GreedyPacker | BestFitPacker = GreedyPacker(L, 8)
        else:
            batch = pack_best_fit(fp, L, "pad", open_bins=9, lookahead=77, min_piece=8)
            pk = BestFitPacker(L, 9, 77, min_piece=8)
        taken = []
        for a, b in zip([0, 5, 700, 701, 2222], [5, 700, 701, 2222, 3000], strict=True):
            pk.feed(fp[a:b], ids[a:b])
            taken.append(pk.seg.take(pk.done_rows() - 1))
        pk.finish()
        taken.append(pk.seg.take())
        item, start, end, row, row_start, seg_fp = (np.concatenate(c) for c in zip(*taken, strict=True))
        assert np.array_equal(item, ids[batch.item]) and np.array_equal(seg_fp, fp[batch.item])
        for mine, want in (
            (start, batch.start),
            (end, batch.end),
            (row, batch.row),
            (row_start, batch.row_start),
        ):
            assert np.array_equal(mine, want)
        assert pk.seg.take()[0].size == 0


def test_partition_records_are_json(tmp_path: Path) -> None:
    case = CASES["best_fit, budget, one target"]
    corpus = tmp_path / "corpus"
    prepared, web_tokens = make_corpus(corpus, seed=2)
    _res, work = run(corpus, tmp_path / "o", case, web_tokens, prepared, 2)
    recs = sorted((work.select_dir / "partitions-2").glob("part-*.json"))
    assert [json.loads(r.read_text())["partition"] for r in recs] == [0, 1]


def test_partitioned_build_matches_the_pinned_bytes(tmp_path: Path) -> None:
    """The whole pinned build (tests/test_layout_identity.py) with the select stage in 3 partitions:
    every shard, audit table, the manifest and the card keep the recorded bytes."""
    from pipeline.build import run_build
    from tests.test_layout_identity import DATA, EXPECTED, PINNED_COMMAND, output_digests, pinned_config_dict

    data = pinned_config_dict(tmp_path / "out")
    data["run"] = {**data.get("run", {}), "select_partitions": 3}
    run_build(parse_config(data, base_dir=DATA), command=PINNED_COMMAND)
    assert sorted((tmp_path / "out" / ".longloom").glob("select-*/partitions-3/part-0000[0-2].json"))
    assert output_digests(tmp_path / "out") == EXPECTED


def test_partition_units_open_no_documents_file(tmp_path: Path) -> None:
    """Issue 14 item 2: every shard is read once, by its scatter unit; the partition units read only
    their partition's scatter files. With the documents files gone after the scatter pass, every
    partition unit still runs, and the merge (documents back) matches the single process byte for byte."""
    case = CASES["best_fit, budget, one target"]
    corpus = tmp_path / "corpus"
    prepared, web_tokens = make_corpus(corpus, seed=4)
    single, w0 = run(corpus, tmp_path / "single", case, web_tokens, prepared, 0)
    cfg = config(tmp_path / "o", case, web_tokens, 3)
    work = WorkDir(cfg)
    work.prepare_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(corpus, work.prepare_dir)
    scattered = scatter(cfg, work, prepared)
    assert [sum(r.rows) for r in scattered] == [r.documents for r in prepared]
    docs = work.prepare_dir / "documents"
    docs.rename(tmp_path / "hidden")  # no partition unit can open a documents file now
    key = inputs_key(prepared)
    units = [dedup_partition(cfg, work, prepared, p, key, scattered) for p in range(3)]
    assert sum(u.documents for u in units) == sum(r.documents for r in prepared)
    (tmp_path / "hidden").rename(docs)
    got = select_partitioned(cfg, work, prepared, units)
    assert got.filtered_sha256 == single.filtered_sha256
    assert [t.layout_sha256 for t in got.targets] == [t.layout_sha256 for t in single.targets]
    assert digest(work.select_dir / got.filtered_file) == digest(w0.select_dir / single.filtered_file)


def test_scatter_units_resume_from_verified_records(tmp_path: Path) -> None:
    """A scatter unit with a verified record is reused (its files untouched); a changed file, or a
    missing record (a unit killed before its record), makes it run again and rewrite its files."""
    case = CASES["best_fit, budget, one target"]
    corpus = tmp_path / "corpus"
    prepared, web_tokens = make_corpus(corpus, seed=6)
    cfg = config(tmp_path / "o", case, web_tokens, 4)
    work = WorkDir(cfg)
    work.prepare_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(corpus, work.prepare_dir)
    first = scatter_shard(cfg, work, prepared, 2)
    folder = work.select_dir / "partitions-4" / "scatter"
    files = [folder / f"p{p:05d}" / "s00002.parquet" for p in range(4)]
    assert [digest(f) for f in files] == first.sha256
    stamp = [f.stat().st_mtime_ns for f in files]
    assert scatter_shard(cfg, work, prepared, 2) == first
    assert [f.stat().st_mtime_ns for f in files] == stamp  # reused, not rewritten
    files[1].write_bytes(b"garbage")
    assert scatter_shard(cfg, work, prepared, 2).sha256 == first.sha256
    assert digest(files[1]) == first.sha256[1]
    (folder / "s00002.json").unlink()
    files[3].unlink()
    assert scatter_shard(cfg, work, prepared, 2).sha256 == first.sha256
    # the partition files hold every row of the shard once, in canonical order, with its hash
    t = pq.read_table(work.prepare_dir / prepared[2].files["documents"])
    got = pa.concat_tables([pq.read_table(f) for f in files])
    assert sorted(got.column("row").to_pylist()) == list(range(t.num_rows))
    for f in files:
        rows = pq.read_table(f).column("row").to_pylist()
        assert rows == sorted(rows)
    want = {r: bytes.fromhex(h) for r, h in enumerate(t.column("content_hash").to_pylist())}
    assert all(
        want[r] == h
        for r, h in zip(got.column("row").to_pylist(), got.column("hash").to_pylist(), strict=True)
    )


def test_filtered_and_layout_row_groups_are_small_and_identical(tmp_path: Path) -> None:
    """Issue 14 item 1: the merge's memory grew with the corpus while it held a 1,048,576-row group of
    `filtered` rows; both select paths now write the `filtered` table and the layouts in row groups of
    at most 65,536 rows, and stay byte-identical across a row-group boundary (70,000 duplicates)."""
    n = 70_000
    rng = np.random.default_rng(8)
    (tmp_path / "corpus" / "documents").mkdir(parents=True)
    base = [hashlib.sha256(rng.bytes(8)).hexdigest() for _ in range(n)]
    prepared = []
    for si, hashes in enumerate([base, base[::-1]]):  # shard 1: copies of shard 0, in another order
        n_tokens = rng.integers(1, 60, n)
        table = pa.table(
            {
                "source": pa.array(["web"] * n, pa.string()),
                "uri": pa.array([f"web-{si}.jsonl"] * n, pa.string()),
                "record": pa.array(np.arange(n, dtype=np.int64) + 1),
                "doc_id": pa.array([f"web/{si}/{r}" for r in range(n)], pa.string()),
                "content_hash": pa.array(hashes, pa.string()),
                "n_chars": pa.array(n_tokens),
                "n_bytes": pa.array(n_tokens),
                "n_tokens": pa.array(n_tokens),
                "token_start": pa.array(np.cumsum(n_tokens) - n_tokens),
            },
            schema=DOC_SCHEMA,
        )
        rel = f"documents/s{si}.parquet"
        with ParquetSink(tmp_path / "corpus" / rel, DOC_SCHEMA) as sink:
            sink.write(table)
        prepared.append(
            PrepareResult(
                shard_id=f"s{si}",
                source="web",
                uri=f"s{si}",
                revision=None,
                input_bytes=0,
                records_read=n,
                quarantined={},
                documents=n,
                tokens_read=int(n_tokens.sum()),
                filtered={},
                filtered_tokens={},
                kept=n,
                kept_tokens=int(n_tokens.sum()),
                files={"documents": rel},
                sha256={"documents": sink.sha256 or ""},
            )
        )
    case = {"strategy": "greedy", "targets": [{"length": 64}], "budget": None, "last_row": "pad"}
    single, w0 = run(tmp_path / "corpus", tmp_path / "single", case, 0, prepared, 0)
    got, w = run(tmp_path / "corpus", tmp_path / "p2", case, 0, prepared, 2)
    for res, wd in ((single, w0), (got, w)):
        for rel in [res.filtered_file] + [t.layout_file for t in res.targets]:
            meta = pq.ParquetFile(wd.select_dir / rel).metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            assert sum(sizes) > 65_536 and max(sizes) == 65_536, (rel, sizes)
    assert single.filtered["web"]["exact_duplicate"] == n
    assert digest(w.select_dir / got.filtered_file) == digest(w0.select_dir / single.filtered_file)
    for t in single.targets:
        assert digest(w.select_dir / t.layout_file) == digest(w0.select_dir / t.layout_file)
