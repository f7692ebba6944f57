"""Writes MosaicML MDS shards with `mosaicml-streaming`'s own `MDSWriter`, in another Python.

`mosaicml-streaming` pins `numpy<2.2` and `transformers<5` and imports `torchvision` (whose Linux
wheels need a CUDA build of torch), so it cannot be installed beside Longloom's environment; a team that
trains with llm-foundry has it in its training environment. `longloom export --format mds` therefore
runs this file *by path* with that environment's interpreter (`--mds-python` or `LONGLOOM_MDS_PYTHON`)
and streams the rows to it. This file imports only the standard library, numpy and `streaming`:
nothing of Longloom, which that environment does not have.

Protocol on standard input, one record per row: the row's token count as an 8-byte little-endian
unsigned integer, then that many little-endian int32 token ids; end of input ends the export. Each row
becomes one MDS sample with a single column `tokens` (`ndarray:int32`, llm-foundry's name for
pre-tokenized text). On success the writer prints one JSON line `{"rows": N, "tokens": T}`; if
`streaming` cannot be imported it exits with status 3 and says why on standard error.

    python mds_writer.py OUT_FOLDER [COMPRESSION]
"""

from __future__ import annotations

import json
import struct
import sys

HEADER = struct.Struct("<Q")
MISSING_STREAMING = 3


def _read_exact(stream: object, n: int) -> bytes:
    data = stream.read(n)  # type: ignore[attr-defined]
    if len(data) != n:
        raise EOFError(f"input ended inside a row ({len(data)} of {n} bytes)")
    return bytes(data)


def main(argv: list[str]) -> int:
    folder = argv[1]
    compression = argv[2] if len(argv) > 2 and argv[2] != "none" else None
    try:
        import numpy as np
        from streaming import MDSWriter
    except Exception as err:  # ImportError, or torchvision failing to load its operators
        print(f"cannot import mosaicml-streaming here ({type(err).__name__}: {err})", file=sys.stderr)
        return MISSING_STREAMING
    stdin = sys.stdin.buffer
    rows = tokens = 0
    with MDSWriter(out=folder, columns={"tokens": "ndarray:int32"}, compression=compression) as writer:
        while True:
            head = stdin.read(HEADER.size)
            if not head:
                break
            if len(head) != HEADER.size:
                raise EOFError("input ended inside a row header")
            (n,) = HEADER.unpack(head)
            ids = np.frombuffer(_read_exact(stdin, 4 * n), dtype="<i4").astype(np.int32)
            writer.write({"tokens": ids})
            rows += 1
            tokens += n
    print(json.dumps({"rows": rows, "tokens": tokens}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
