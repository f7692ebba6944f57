"""Issue 19 item 2: what finalize pays for the card's figures stays off the build's path where it can.

The figures are drawn with matplotlib's object API on an Agg canvas, without importing `pyplot`
(its import and figure registry were a third of the figures' cost); the pictures stay the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

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
