"""Exports of a finished Longloom output folder to the formats trainers read.

`longloom export OUTPUT_DIR --format megatron` writes each config's token ids through Megatron-Core's
own `IndexedDatasetBuilder` (the `.bin`/`.idx` pair that Megatron-LM and NeMo read), one row (or chat
sample) per sequence and per document, in the Parquet files' order. Everything else a row carries
(`row_id`, `segments`, `lineage`, ...) goes to a Parquet sidecar keyed by the sequence index, so
sequence `i` of the `.bin` file and row `index == i` of the sidecar describe the same row.

The Parquet output is read one row group at a time, so memory stays at one row group whatever the
size of the output. The export is written into a hidden folder beside the destination and renamed
into place at the end, with `export.json` written last: a killed export never looks complete, and a
re-run replaces the previous export whole.

`--format mds` writes MosaicML MDS shards with `mosaicml-streaming`'s own `MDSWriter`, which cannot be
installed beside this project's environment (its pins and its torchvision import): the writer runs in
the training environment's Python (`pipeline/output/mds_writer.py`, run by path) and the rows are
streamed to it; the sidecar is written here, as for Megatron.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from pipeline.core.faults import crash_point
from pipeline.core.parquet_io import ParquetSink, sha256_file
from schemas.manifest import Manifest
from schemas.records import BOUNDARY_FIELDS

EXPORT_FORMAT = "longloom-export@1"
FORMATS = ("megatron", "mds")
MDS_FOLDER = "mds"  # inside a config's folder: MDSWriter's shards and index.json
MDS_PYTHON_ENV = "LONGLOOM_MDS_PYTHON"  # the interpreter that has mosaicml-streaming
MARKER = "export.json"  # written last: its presence means the export is complete
SIDECAR = "lineage.parquet"
PREFIX = "tokens"  # Megatron path prefix inside a config's folder: tokens.bin + tokens.idx
# columns the sidecar leaves out: the ids are in the .bin file, the text is the ids decoded
_NOT_IN_SIDECAR = ("input_ids", "text")


class ExportError(RuntimeError):
    """An export that cannot be made; the message names the file, row or field and what to do."""


@dataclass
class ConfigExport:
    name: str
    rows: int = 0
    tokens: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)  # the Parquet shards read, with sha256

    def as_dict(self, fmt: str, dtype: str, boundaries: bool) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": self.rows,
            "tokens": self.tokens,
            "megatron_prefix": f"{self.name}/{PREFIX}" if fmt == "megatron" else None,
            "mds_folder": f"{self.name}/{MDS_FOLDER}" if fmt == "mds" else None,
            "dtype": dtype,
            "sidecar": f"{self.name}/{SIDECAR}",
            "sidecar_key": "index",
            "boundaries": boundaries,
            "sources": self.files,
        }


@dataclass
class ExportResult:
    dest: Path
    format: str
    configs: list[ConfigExport]

    def lines(self) -> list[str]:
        return [
            f"{self.dest}/{c.name}: {c.rows:,} rows, {c.tokens:,} tokens ({self.format})"
            for c in self.configs
        ]


def load_output(out: Path) -> Manifest:
    path = out / "manifest.json"
    if not path.is_file():
        raise ExportError(f"{path}: no manifest; export a finished build's output folder (longloom build)")
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as err:
        raise ExportError(f"{path}: not a Longloom manifest ({err.error_count()} errors)") from None


def exportable_configs(out: Path, manifest: Manifest) -> dict[str, list[tuple[str, str, int]]]:
    """Config name -> its shards (path relative to `out`, sha256, rows), for configs with `input_ids`."""
    found: dict[str, list[tuple[str, str, int]]] = {}
    for t in manifest.targets:
        found[t.config_name] = [(e.path, e.sha256, e.rows) for e in t.shards]
    for name, entries in manifest.extra_configs.items():
        files = [(e.path, e.sha256, e.rows) for e in entries]
        if files and not (out / files[0][0]).is_file():
            raise ExportError(f"{out / files[0][0]}: listed in manifest.json but missing; rebuild the output")
        # evaluation tables and the like carry no token ids: nothing to export
        if files and "input_ids" in pq.read_schema(out / files[0][0]).names:
            found[name] = files
    return found


def boundaries(starts: np.ndarray, ends: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(cu_seqlens, position_ids) of one row whose documents span [starts[k], ends[k]) in row order.

    A separator belongs to the document it ends (so `ends` include it); the padding at the end, and
    any stretch no segment covers, counts as a sequence of its own, as in the card's usage snippet.
    """
    cuts: list[int] = []
    pos = 0
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        if s > pos:  # tokens no document claims
            cuts.append(pos)
        cuts.append(s)
        pos = e
    if pos < length:
        cuts.append(pos)
    if not cuts:
        cuts.append(0)
    cu = np.asarray([*cuts, length], dtype=np.int32)
    position_ids = (np.arange(length, dtype=np.int32) - np.repeat(cu[:-1], np.diff(cu))).astype(np.int32)
    return cu, position_ids


def _row_groups(path: Path) -> Iterator[tuple[int, pa.Table]]:
    """(first row's index in the file, table) for each row group of a Parquet file."""
    pf = pq.ParquetFile(path)
    first = 0
    for i in range(pf.num_row_groups):
        table = pf.read_row_group(i)
        yield first, table
        first += table.num_rows


def _boundary_columns(table: pa.Table, lengths: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """`cu_seqlens` and `position_ids` for every row of a row group, from its `segments` spans."""
    cus: list[np.ndarray] = []
    pids: list[np.ndarray] = []
    if "segments" in table.column_names:
        segs = table.column("segments").combine_chunks()
        offsets = segs.offsets.to_numpy()
        flat = segs.values
        start = flat.field("row_token_start").to_numpy(zero_copy_only=False).astype(np.int64)
        end = flat.field("row_token_end").to_numpy(zero_copy_only=False).astype(np.int64)
        end += flat.field("separator_after").to_numpy(zero_copy_only=False).astype(np.int64)
        for r, n in enumerate(lengths.tolist()):
            a, b = int(offsets[r]), int(offsets[r + 1])
            order = np.argsort(start[a:b], kind="stable")
            cu, pid = boundaries(start[a:b][order], end[a:b][order], n)
            cus.append(cu)
            pids.append(pid)
    else:  # a chat sample is one conversation: one sequence
        for n in lengths.tolist():
            cu, pid = boundaries(np.zeros(0, np.int64), np.zeros(0, np.int64), n)
            cus.append(cu)
            pids.append(pid)
    types = {f.name: f.type for f in BOUNDARY_FIELDS}

    def as_list(parts: list[np.ndarray], t: pa.DataType) -> pa.Array:
        offs = np.zeros(len(parts) + 1, dtype=np.int32)
        np.cumsum([len(p) for p in parts], out=offs[1:])
        values = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return pa.ListArray.from_arrays(pa.array(offs), pa.array(values, type=t.value_type)).cast(t)

    return as_list(cus, types["cu_seqlens"]), as_list(pids, types["position_ids"])


class _MegatronWriter:
    """One config's `.bin`/`.idx` pair through Megatron-Core's own builder (imported here: it is slow)."""

    def __init__(self, prefix: Path, n_vocab: int) -> None:
        try:
            with (
                warnings.catch_warnings()
            ):  # "Transformer Engine and Apex are not installed": not needed here
                warnings.simplefilter("ignore")
                from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path
        except ImportError as err:
            raise ExportError(
                f"--format megatron needs megatron-core ({err}); install it with pip install -e '.[export]'"
            ) from None
        import torch

        self._torch = torch
        self.prefix = prefix
        # uint16 when every id fits (vocabularies under 65,500), else int32: Megatron's own choice
        self.dtype = DType.optimal_dtype(n_vocab)
        self.n_vocab = n_vocab
        self._builder = IndexedDatasetBuilder(get_bin_path(str(prefix)), dtype=self.dtype)

    def add_rows(self, values: np.ndarray, offsets: np.ndarray) -> None:
        for r in range(len(offsets) - 1):
            ids = values[offsets[r] : offsets[r + 1]]
            self._builder.add_item(self._torch.from_numpy(np.ascontiguousarray(ids)))
            self._builder.end_document()  # one row = one document: Megatron keeps the packing as is

    def close(self) -> None:
        from megatron.core.datasets.indexed_dataset import get_idx_path

        self._builder.finalize(get_idx_path(str(self.prefix)))


class _MdsWriter:
    """One config's MDS shards, written by `mds_writer.py` in the Python that has mosaicml-streaming
    (a child process fed the rows on its standard input)."""

    dtype = "int32"

    def __init__(self, folder: Path, python: str) -> None:
        import struct
        import subprocess

        self._header = struct.Struct("<Q")
        self.folder = folder
        script = Path(__file__).with_name("mds_writer.py")
        try:
            self._proc = subprocess.Popen(
                [python, str(script), str(folder), "zstd"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as err:
            raise ExportError(f"--mds-python {python}: cannot run it ({err})") from None
        self.python = python
        self.rows = self.tokens = 0

    def add_rows(self, values: np.ndarray, offsets: np.ndarray) -> None:
        assert self._proc.stdin is not None
        parts: list[bytes] = []
        for r in range(len(offsets) - 1):
            ids = values[offsets[r] : offsets[r + 1]].astype("<i4", copy=False)
            parts += [self._header.pack(len(ids)), ids.tobytes()]
        try:
            self._proc.stdin.write(b"".join(parts))
        except BrokenPipeError:
            self._fail()
        self.rows += len(offsets) - 1
        self.tokens += int(offsets[-1] - offsets[0])

    def close(self) -> None:
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.close()
        out = self._proc.stdout.read().decode() if self._proc.stdout else ""
        if self._proc.wait() != 0:
            self._fail()
        got = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        if got != {"rows": self.rows, "tokens": self.tokens}:
            raise ExportError(f"{self.folder}: the MDS writer reports {got}, {self.rows} rows were sent")

    def abort(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _fail(self) -> NoReturn:
        if self._proc.poll() is None:
            self._proc.kill()
        code = self._proc.wait()
        err = self._proc.stderr.read().decode(errors="replace").strip() if self._proc.stderr else ""
        last = err.splitlines()[-1] if err else f"exit code {code}"
        if code == 3:  # mds_writer.MISSING_STREAMING
            raise ExportError(
                f"--format mds: {self.python} {last}. mosaicml-streaming cannot be installed beside "
                f"Longloom (it pins numpy<2.2 and transformers<5); point --mds-python (or {MDS_PYTHON_ENV}) "
                "at the Python of an environment that has it, e.g. your llm-foundry environment"
            )
        raise ExportError(f"--format mds: the MDS writer ({self.python}) failed: {last}")


def _export_config(
    out: Path,
    name: str,
    shards: list[tuple[str, str, int]],
    work: Path,
    n_vocab: int,
    with_boundaries: bool,
    fmt: str = "megatron",
    mds_python: str | None = None,
) -> tuple[ConfigExport, str]:
    folder = work / name
    folder.mkdir(parents=True)
    result = ConfigExport(name=name)
    writer: _MegatronWriter | _MdsWriter
    if fmt == "mds":
        writer = _MdsWriter(folder / MDS_FOLDER, mds_python or sys.executable)
    else:
        writer = _MegatronWriter(folder / PREFIX, n_vocab)
    sidecar: ParquetSink | None = None
    try:
        for rel, sha, n_rows in shards:
            path = out / rel
            if not path.is_file():
                raise ExportError(f"{path}: listed in manifest.json but missing; rebuild the output")
            if sha256_file(path) != sha:
                raise ExportError(
                    f"{path}: sha256 differs from manifest.json (changed since the build); rebuild the output"
                )
            read = 0
            for first, table in _row_groups(path):
                crash_point("export_row_group")
                if "input_ids" not in table.column_names:
                    raise ExportError(f"{path}: no input_ids column; config {name} cannot be exported")
                col = table.column("input_ids").combine_chunks()
                if col.null_count:
                    bad = first + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                    raise ExportError(
                        f"{path} row {bad}: input_ids is null; export the configs with ids (--config NAME)"
                    )
                offsets = col.offsets.to_numpy().astype(np.int64)
                offsets -= offsets[0]
                # a writable copy (Arrow's buffers are read-only; torch.from_numpy warns on those)
                values = np.array(col.flatten().to_numpy(), dtype=np.int32)
                if values.size and (int(values.min()) < 0 or int(values.max()) >= n_vocab):
                    at = int(np.flatnonzero((values < 0) | (values >= n_vocab))[0])
                    row = first + int(np.searchsorted(offsets, at, side="right")) - 1
                    raise ExportError(
                        f"{path} row {row}: input_ids holds {int(values[at])}, outside the tokenizer's "
                        f"{n_vocab} ids (manifest.json tokenizer.n_vocab); the file does not match its manifest"
                    )
                writer.add_rows(values, offsets)
                keep = [c for c in table.column_names if c not in _NOT_IN_SIDECAR]
                lengths = np.diff(offsets)
                side = table.select(keep)
                side = side.add_column(
                    0, "index", pa.array(np.arange(result.rows, result.rows + len(col), dtype=np.int64))
                )
                side = side.append_column("source_file", pa.array([rel] * len(col), pa.string()))
                side = side.append_column(
                    "source_row", pa.array(np.arange(first, first + len(col), dtype=np.int64))
                )
                if with_boundaries:
                    cu, pid = _boundary_columns(table, lengths)
                    # rows written with output.boundary_columns already carry some: recomputed the same way
                    side = side.drop_columns([f.name for f in BOUNDARY_FIELDS if f.name in side.column_names])
                    side = side.append_column(BOUNDARY_FIELDS[0], cu).append_column(BOUNDARY_FIELDS[1], pid)
                if sidecar is None:
                    schema = side.schema.remove_metadata().with_metadata(
                        {"longloom.table": "export-sidecar@1"}
                    )
                    sidecar = ParquetSink(folder / SIDECAR, schema)
                sidecar.write(side)
                result.rows += len(col)
                result.tokens += int(offsets[-1])
                read += len(col)
            if read != n_rows:
                raise ExportError(f"{path}: {read} rows, manifest.json says {n_rows}; rebuild the output")
            result.files.append({"path": rel, "sha256": sha, "rows": n_rows})
        writer.close()
        if sidecar is None:  # a config with no rows: an empty sidecar still says what its columns are
            sidecar = ParquetSink(folder / SIDECAR, pa.schema([pa.field("index", pa.int64())]))
        sidecar.close()
    except BaseException:
        if sidecar is not None:
            sidecar.abort()
        if isinstance(writer, _MdsWriter):
            writer.abort()
        raise
    return result, np.dtype(writer.dtype).name


def _partial_name(dest: Path) -> str:
    return f".{dest.name}.partial-"


def _clear_leftovers(dest: Path) -> None:
    """Delete the hidden folders of exports to `dest` that were killed (their process is gone)."""
    for p in dest.parent.glob(f".{glob.escape(dest.name)}.*-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # another export to the same place is running: leave it alone
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True)


def is_export(folder: Path) -> bool:
    """True when `folder` holds a complete Longloom export."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def export(
    out: Path,
    dest: Path,
    fmt: str,
    configs: list[str] | None = None,
    with_boundaries: bool = False,
    mds_python: str | None = None,
) -> ExportResult:
    """Export the configs (all with token ids if None) of the output folder `out` into `dest`.

    `mds_python`: for `fmt="mds"`, the interpreter that has mosaicml-streaming (default:
    $LONGLOOM_MDS_PYTHON, else this one)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: not supported; choose one of {', '.join(FORMATS)}")
    out, dest = out.resolve(), dest.resolve()
    manifest = load_output(out)
    available = exportable_configs(out, manifest)
    names = configs or sorted(available)
    unknown = [c for c in names if c not in available]
    if unknown:
        raise ExportError(
            f"--config {', '.join(unknown)}: not a config with token ids in {out}; "
            f"choose from {', '.join(sorted(available)) or '(none)'}"
        )
    if out == dest or out.is_relative_to(dest):
        raise ExportError(f"{dest}: would replace the output folder itself; export to another folder")
    if dest.exists() and not (dest.is_dir() and (is_export(dest) or not any(dest.iterdir()))):
        raise ExportError(
            f"{dest}: exists and is not a Longloom export, so it is left alone; remove it or choose another folder"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(dest)
    work = dest.parent / f"{_partial_name(dest)}{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    done: list[ConfigExport] = []
    described: list[dict[str, Any]] = []
    try:
        for name in names:
            res, dtype = _export_config(
                out,
                name,
                available[name],
                work,
                manifest.tokenizer.n_vocab,
                with_boundaries,
                fmt,
                mds_python or os.environ.get(MDS_PYTHON_ENV),
            )
            done.append(res)
            described.append(res.as_dict(fmt, dtype, with_boundaries))
        payload = {
            "format": EXPORT_FORMAT,
            "export_format": fmt,
            "config_hash": manifest.config_hash,
            "longloom_version": manifest.longloom_version,
            "tokenizer": manifest.tokenizer.model_dump(),
            "manifest_sha256": sha256_file(out / "manifest.json"),
            "configs": described,
        }
        (work / MARKER).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _replace(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportResult(dest=dest, format=fmt, configs=done)


def _replace(work: Path, dest: Path) -> None:
    """Put the finished export at `dest`, moving any previous one aside first and deleting it after."""
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    if dest.exists():
        os.replace(dest, old)
    os.replace(work, dest)
    with contextlib.suppress(OSError):
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    shutil.rmtree(old, ignore_errors=True)
