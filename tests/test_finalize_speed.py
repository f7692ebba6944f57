"""Issue 19 item 2: what finalize pays for the dataset card, without changing the card.

The figures are drawn with matplotlib's object API on an Agg canvas, without importing `pyplot`
(its import and figure registry were a third of the figures' cost); the pictures stay the same. The
`dataset_info` figures come without importing `datasets` (seconds and ~60 MB), equal to what it computes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent

DRAW = """
import json, sys
from pathlib import Path
from pipeline.output.plots import grouped_bars, histogram, stacked_bars
out = Path(sys.argv[1])
histogram(out, "images/h.png", "Doc tokens", "tokens", [0, 10, 100, 1000], {"a": [1, 5, 3], "b": [0, 2, 9]})
stacked_bars(out, "images/s.png", "Tokens", "tokens", ["p64K", "chat"], {"a": [1000, 20], "padding": [7, 0]})
grouped_bars(out, "images/g.png", "Mix", "tokens", ["a", "b"], {"before": [10, 20], "after": [8, 19]})
print(json.dumps(sorted(m for m in sys.modules if m.startswith("matplotlib.pyplot"))))
"""


def png_chunks(data: bytes) -> dict[str, bytes]:
    """The PNG's chunks by type (the last of each), read with the format's own layout."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: dict[str, bytes] = {}
    texts: dict[str, bytes] = {}
    off = 8
    while off < len(data):
        n = int.from_bytes(data[off : off + 4], "big")
        kind = data[off + 4 : off + 8].decode("ascii")
        body = data[off + 8 : off + 8 + n]
        assert zlib.crc32(data[off + 4 : off + 8 + n]) == int.from_bytes(
            data[off + 8 + n : off + 12 + n], "big"
        )
        chunks[kind] = body
        if kind == "tEXt":
            key, _, value = body.partition(b"\0")
            texts[key.decode("latin-1")] = value
        elif kind == "zTXt":
            key, _, rest = body.partition(b"\0")
            texts[key.decode("latin-1")] = zlib.decompress(rest[1:])
        off += 12 + n
    chunks.update({f"text:{k}": v for k, v in texts.items()})
    return chunks


def test_figures_are_drawn_without_pyplot(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", DRAW, str(tmp_path)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    for name, w, h in (("h", 900, 1.0 + 1.5 * 2), ("s", 900, 4.8), ("g", 900, 4.8)):
        chunks = png_chunks((tmp_path / "images" / f"{name}.png").read_bytes())
        ihdr = chunks["IHDR"]
        assert (int.from_bytes(ihdr[:4], "big"), int.from_bytes(ihdr[4:8], "big")) == (w, round(h * 100))
        data = json.loads(chunks["text:longloom:data"])
        assert data["totals"]  # the series drawn travel with the picture


# --- the card's `dataset_info` without importing `datasets` -------------------------------------------


def _values(t: pa.DataType, n: int, rng: random.Random, nullable: bool) -> list[Any]:
    """n values of Arrow type t (some None where the field allows it), for a schema-generic table."""

    def one() -> Any:
        if nullable and rng.random() < 0.2:
            return None
        if pa.types.is_struct(t):
            return {
                t.field(i).name: _values(t.field(i).type, 1, rng, t.field(i).nullable)[0]
                for i in range(t.num_fields)
            }
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            k = rng.randrange(0, 4)
            return _values(t.value_type, k, rng, t.value_field.nullable)
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "".join(rng.choice("abcé😀 ") for _ in range(rng.randrange(0, 12)))
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 12)))
        if pa.types.is_boolean(t):
            return rng.random() < 0.5
        if pa.types.is_floating(t):
            return rng.random()
        if pa.types.is_integer(t):
            return rng.randrange(0, 100)
        raise AssertionError(f"no generator for {t}")

    return [one() for _ in range(n)]


def _table(schema: pa.Schema, n: int, seed: int) -> pa.Table:
    rng = random.Random(seed)
    cols = [pa.array(_values(f.type, n, rng, f.nullable), type=f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _every_written_schema() -> dict[str, pa.Schema]:
    from pipeline.output.card.meta import KNOWN_SCHEMAS
    from schemas.records import BOUNDARY_FIELDS, row_schema

    every_column = row_schema(True, [f.name for f in BOUNDARY_FIELDS])
    return {**KNOWN_SCHEMAS, "pretrain": row_schema(False), "pretrain-full": every_column}


@pytest.mark.parametrize("layout", ["row groups of 7", "single-row row groups", "one row"])
def test_dataset_info_without_datasets_equals_what_datasets_computes(tmp_path: Path, layout: str) -> None:
    """Every table schema Longloom writes, with nulls, over several files and row-group layouts (the
    single-row ones go through `datasets`' pooled-row path): the fast `dataset_info` (no `datasets`
    import) equals the one `datasets`' own Features, DatasetInfo and ArrowWriter compute."""
    from pipeline.output.card.meta import ConfigFiles, dataset_info, datasets_dataset_info, datasets_features
    from schemas.manifest import FileEntry

    sizes = {"row groups of 7": (23, 7), "single-row row groups": (5, 1), "one row": (1, 1)}[layout]
    for tag, schema in _every_written_schema().items():
        assert datasets_features(schema) is not None, f"{tag}: the fast path must cover it"
        files = []
        for k in range(2):
            path = tmp_path / tag / f"part-{k}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(_table(schema, sizes[0], seed=k), path, row_group_size=sizes[1])
            rel = str(path.relative_to(tmp_path))
            files.append(FileEntry(path=rel, rows=sizes[0], bytes=path.stat().st_size, sha256="0" * 64))
        c = ConfigFiles(name=tag.replace("@", "_"), folder=tag, kind="table", files=files)
        assert dataset_info(tmp_path, c) == datasets_dataset_info(tmp_path, c), tag


def test_card_of_a_build_does_not_import_datasets(tmp_path: Path) -> None:
    """`longloom card` (as finalize writes it) on a finished build: the same README, no `datasets`."""
    from pipeline.build import run_build
    from tests.conftest import make_config

    cfg = make_config(tmp_path / "out")
    assert run_build(cfg).ok
    out = Path(cfg.output.dir)
    before = (out / "README.md").read_bytes()
    code = (
        "import sys, json\nfrom pathlib import Path\nfrom pipeline.output.card import write_card\n"
        f"write_card(Path({str(out)!r}))\nprint(json.dumps('datasets' in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(proc.stdout.strip().splitlines()[-1]) is False
    assert (out / "README.md").read_bytes() == before
