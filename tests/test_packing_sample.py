"""The bundled sample run, recounted from its Parquet rows: no document that fits in a row is split
more than once, no piece of a cut document is under packing.min_piece_tokens, every token of every
packed document is placed exactly once, and the lineage names the packing step version."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from schemas.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sample_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "out"
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "build",
        "data/sample.yaml",
        "--no-prefect",
        "--output",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_sample_run_splits_no_document_twice(sample_out: Path) -> None:
    cfg = load_config(ROOT / "data" / "sample.yaml")
    m = cfg.packing.min_piece_tokens
    dirs = sorted((sample_out / "data").glob("pretrain_*"))
    assert dirs
    for d in dirs:
        L = int(d.name.rsplit("_", 1)[1])
        spans: dict[tuple[str, str, int], list[tuple[int, int, int, bool]]] = defaultdict(list)
        steps: set[str] = set()
        for f in sorted(d.glob("*.parquet")):
            for row in pq.read_table(f, columns=["segments", "lineage"]).to_pylist():
                steps.update(row["lineage"]["steps"])
                for s in row["segments"]:
                    key = (s["source"], s["uri"], s["record"])
                    spans[key].append(
                        (s["doc_token_start"], s["doc_token_end"], s["doc_tokens"], s["separator_after"])
                    )
                    assert s["placed_by"] == "best_fit@2"
        assert "best_fit@2" in steps
        twice = {k: v for k, v in spans.items() if len(v) > 2 and v[0][2] + 1 <= L}
        assert not twice, (
            f"{d.name}: documents that fit a row split more than once: {list(twice.items())[:3]}"
        )
        for key, v in spans.items():
            v.sort()
            n_tok = v[0][2]
            # coverage: the spans tile [0, n_tokens) and the separator follows the last one only
            assert v[0][0] == 0 and v[-1][1] == n_tok, key
            assert all(a[1] == b[0] for a, b in pairwise(v)), key
            assert [x[3] for x in v] == [False] * (len(v) - 1) + [True], key
            if len(v) > 1:
                # footprint pieces (the last one carries the separator) keep the minimum
                pieces = [e - s for s, e, _, _ in v[:-1]] + [v[-1][1] - v[-1][0] + 1]
                assert min(pieces) >= min(m, L // 2), (key, pieces)
