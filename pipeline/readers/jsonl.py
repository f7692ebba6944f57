"""JSONL reader (plain, .gz, .zst): streamed in binary chunks, one orjson parse per line.

Every non-blank line becomes a document or a quarantine row; `record` is the 1-based line number.
The file's sha256 is taken over the raw bytes as they are read, so nothing is read twice.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import zstandard

from pipeline.core import storage
from pipeline.readers.base import (
    DocumentNotFound,
    InputShard,
    ReadBatch,
    ShardReader,
    input_uri,
    matched_files,
    shard_id,
)
from schemas.config import SourceConfig
from schemas.stage_config import HasSources

STEP = "jsonl_reader@1"
CHUNK_BYTES = 4 << 20  # decompressed bytes handed to the line splitter at a time
COMPRESSED_CHUNK_BYTES = 1 << 20  # compressed bytes fed to a decompressor at a time
_BOM = b"\xef\xbb\xbf"
_MISSING = object()


class TruncatedStream(Exception):
    """A compressed input ends early or is corrupt."""


def codec_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith((".zst", ".zstd")):
        return "zstd"
    return None


class ByteSource:
    """The decompressed bytes of one file, in chunks; hashes and counts the raw bytes as they pass."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sha = hashlib.sha256()
        self.raw_bytes = 0

    @property
    def revision(self) -> str:
        return "sha256:" + self.sha.hexdigest()[:16]

    def _raw(self, f: Any, n: int) -> bytes:
        b: bytes = f.read(n)
        self.sha.update(b)
        self.raw_bytes += len(b)
        return b

    def chunks(self) -> Iterator[bytes]:
        """Decompressed chunks; raises TruncatedStream where a compressed stream breaks off."""
        codec = codec_of(self.path)
        with open(self.path, "rb") as f:
            if codec == "gzip":
                yield from self._gzip(f)
            elif codec == "zstd":
                yield from self._zstd(f)
            else:
                while chunk := self._raw(f, CHUNK_BYTES):
                    yield chunk

    def _gzip(self, f: Any) -> Iterator[bytes]:
        d = zlib.decompressobj(wbits=31)
        in_member = False
        while raw := self._raw(f, COMPRESSED_CHUNK_BYTES):
            data = raw
            while data:
                in_member = True
                try:
                    # max_length bounds memory on highly compressible input
                    out = d.decompress(data, CHUNK_BYTES)
                except zlib.error as err:
                    raise TruncatedStream(f"corrupt gzip data ({err})") from None
                if out:
                    yield out
                if d.eof:  # a gzip file may hold several members back to back
                    data = d.unused_data
                    d = zlib.decompressobj(wbits=31)
                    in_member = False
                else:
                    data = d.unconsumed_tail
        if in_member:
            raise TruncatedStream("the gzip stream ends before its end marker")

    def _zstd(self, f: Any) -> Iterator[bytes]:
        dctx = zstandard.ZstdDecompressor()
        d = dctx.decompressobj()
        in_frame = False
        while raw := self._raw(f, COMPRESSED_CHUNK_BYTES // 4):
            data = raw
            while data:
                in_frame = True
                try:
                    out = d.decompress(data)
                except zstandard.ZstdError as err:
                    raise TruncatedStream(f"corrupt zstd data ({err})") from None
                if out:
                    yield out
                if d.eof:  # the next frame, if any, starts in unused_data
                    data = d.unused_data
                    d = dctx.decompressobj()
                    in_frame = False
                else:
                    data = b""
        if in_frame:
            raise TruncatedStream("the zstd stream ends before the end of its last frame")


# --- one line -> one document or one quarantine row ------------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


def parse_line(line: bytes, lineno: int, uri: str, src: SourceConfig) -> tuple[str, str] | Rejected:
    """(doc_id, text) of one non-blank line, or why it cannot be a document."""
    if lineno == 1 and line.startswith(_BOM):
        line = line[3:]
    where = f"line {lineno} of {uri}"
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError as err:
        return _decode_failure(line, where, err)
    if type(row) is not dict:
        return Rejected(
            "not_an_object",
            f"{where}: the line is a JSON {_json_type(row)}, not an object; "
            f"each line must be one JSON object with a {src.text_field!r} field",
        )
    tf = src.text_field
    text = row.get(tf, _MISSING)
    if type(text) is not str:
        return _bad_text(row, text, where, tf)
    if not text or text.isspace():
        return Rejected(
            "empty_text",
            f"{where}: field {tf!r} is empty or only whitespace; drop the line upstream "
            f"or point sources[].text_field at the field that holds the text",
        )
    if src.id_field is not None:
        doc_id = row.get(src.id_field)
        if doc_id is not None:
            return str(doc_id), text
    return f"{uri}#{lineno}", text


def _bad_text(row: dict[str, Any], text: object, where: str, tf: str) -> Rejected:
    if text is _MISSING:
        fields = ", ".join(sorted(row)[:20]) or "none"
        return Rejected(
            "missing_text_field", f"{where}: no field {tf!r} (fields: {fields}); set sources[].text_field"
        )
    if text is None:
        return Rejected(
            "missing_text_field", f"{where}: field {tf!r} is null; drop the line upstream or fill in its text"
        )
    return Rejected(
        "text_not_string",
        f"{where}: field {tf!r} is a JSON {_json_type(text)}, not a string; "
        f"set sources[].text_field to a field holding the text as a string",
    )


def _decode_failure(line: bytes, where: str, err: orjson.JSONDecodeError) -> Rejected:
    """Tell invalid UTF-8 (raw bytes or escaped lone surrogates) apart from broken JSON."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as uerr:
        return Rejected(
            "invalid_utf8",
            f"{where}: not valid UTF-8 (bad byte at offset {uerr.start} of the line); re-encode the file as UTF-8",
        )
    if "surrogate" in str(err):
        return Rejected(
            "invalid_utf8",
            f"{where}: a \\u escape encodes a lone UTF-16 surrogate, which is not valid Unicode text ({err}); "
            f"fix the text in the producer",
        )
    return Rejected("malformed_json", f"{where}: not valid JSON ({err}); fix or remove the line")


def _json_type(v: object) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
    }.get(type(v), "null" if v is None else type(v).__name__)


# --- reading a shard ----------------------------------------------------------------------------------------


class JsonlShardReader(ShardReader):
    def _read(self) -> Iterator[ReadBatch]:
        path = storage.input_path(self.cfg, self.shard.uri)
        src_bytes = ByteSource(path)
        b = self.new_builder()
        uri, src = self.uri, self.source
        batch_bytes = self.batch_bytes
        lineno = 0
        pending: list[bytes] = []  # pieces of a line that spans chunks: joined once, so never quadratic
        chunks = src_bytes.chunks()
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            except TruncatedStream as err:
                partial = b"".join(pending)
                b.records_read += 1
                b.quarantine(
                    lineno + 1,
                    "truncated_stream",
                    f"{uri}: {err}: reading stopped at line {lineno + 1} after "
                    f"{src_bytes.raw_bytes} compressed bytes; the rest of the file is lost. "
                    f"Re-download or recompress the file",
                    raw=partial,
                )
                pending = []
                break
            lines = chunk.split(b"\n")
            if pending:
                pending.append(lines[0])
                if len(lines) == 1:
                    continue
                lines[0] = b"".join(pending)
                pending = []
            tail = lines.pop()
            if tail:
                pending.append(tail)
            for line in lines:
                lineno += 1
                if not line or line.isspace():
                    continue
                b.records_read += 1
                got = parse_line(line, lineno, uri, src)
                if isinstance(got, Rejected):
                    b.quarantine(lineno, got.reason, got.detail, raw=line)
                else:
                    b.add_doc(lineno, got[0], got[1], len(line))
                if b.text_bytes >= batch_bytes:
                    yield b.flush()
        if pending:  # a last line without a final newline
            line = b"".join(pending)
            lineno += 1
            if not line.isspace():
                b.records_read += 1
                got = parse_line(line, lineno, uri, src)
                if isinstance(got, Rejected):
                    b.quarantine(lineno, got.reason, got.detail, raw=line)
                else:
                    b.add_doc(lineno, got[0], got[1], len(line))
        self._revision = src_bytes.revision
        self._bytes = src_bytes.raw_bytes
        if not b.empty:
            yield b.flush()


def list_shards(cfg: HasSources, src: SourceConfig) -> list[InputShard]:
    return [
        InputShard(
            source=src.name, kind="jsonl", uri=input_uri(cfg, p), shard_id=shard_id(src.name, i), index=i
        )
        for i, p in enumerate(matched_files(cfg, src))
    ]


# --- re-reading one document ----------------------------------------------------------------------------------


def read_line(path: Path, target: int) -> bytes | None:
    """The bytes of 1-based line `target` (without its newline), streaming; None past the end."""
    lineno = 1  # the line that the next unread byte belongs to
    pending: list[bytes] = []
    try:
        for chunk in ByteSource(path).chunks():
            start = 0
            if lineno < target:
                need = target - lineno
                if chunk.count(b"\n") < need:
                    lineno += chunk.count(b"\n")
                    continue
                pos = -1
                for _ in range(need):
                    pos = chunk.index(b"\n", pos + 1)
                start, lineno = pos + 1, target
            end = chunk.find(b"\n", start)
            if end >= 0:
                pending.append(chunk[start:end])
                return b"".join(pending)
            pending.append(chunk[start:])
    except TruncatedStream:
        return None  # the line read_shard quarantined as truncated_stream
    return b"".join(pending) if lineno == target else None


def fetch_text(cfg: HasSources, src: SourceConfig, uri: str, record: int) -> str:
    line = read_line(storage.input_path(cfg, uri), record) if record >= 1 else None
    if line is None or not line or line.isspace():
        raise DocumentNotFound(f"{uri}: line {record} is blank or past the end of the file")
    got = parse_line(line, record, uri, src)
    if isinstance(got, Rejected):
        raise DocumentNotFound(f"{got.detail} (quarantined as {got.reason})")
    return got[1]
