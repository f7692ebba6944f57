"""Parquet and file plumbing shared by every writer: atomic publication, checksums, writer settings."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Token-id columns compress well with zstd alone; dictionary encoding them costs 3x the write time.
_NO_DICTIONARY = ("input_ids",)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Leaf column paths worth dictionary-encoding: strings (repeated lineage), never token ids."""
    out: list[str] = []

    def walk(prefix: str, t: pa.DataType) -> None:
        if pa.types.is_struct(t):
            for f in t:
                walk(f"{prefix}.{f.name}", f.type)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            walk(f"{prefix}.list.element", t.value_type)
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            out.append(prefix)

    for f in schema:
        if f.name not in _NO_DICTIONARY:
            walk(f.name, f.type)
    return out


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc only).

    Batches of text and token ids are large, short-lived and allocated from several threads, so
    glibc keeps their freed pages and fragments; without this, RSS creeps up over a long run.
    """
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class DiskFullError(RuntimeError):
    """The disk filled while writing `path`: said in one line, with what was needed and what is free.

    Built from plain arguments so it survives pickling between Dask workers and the flow.
    """

    def __init__(self, path: str, needed: int, free: int | None) -> None:
        super().__init__(path, needed, free)
        self.path, self.needed, self.free = path, needed, free

    def __str__(self) -> str:
        free = "unknown" if self.free is None else f"{self.free:,}"
        return (
            f"disk full while writing {self.path}: about {self.needed:,} more bytes needed, {free} bytes "
            "free there. Free some space (`longloom gc OUT --delete` removes intermediates of earlier "
            "configs) and rerun the same command: finished work is kept and the run resumes"
        )


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC (or a quota) from the OS, or from Arrow's writers, which report it in the message."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "[errno 28]" in text.lower()


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path)
    for candidate in (p, *p.parents):
        if candidate.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(candidate).free
            return None
    return None


def disk_full(path: str | Path, needed: int) -> DiskFullError:
    return DiskFullError(str(path), max(1, needed), free_bytes(path))


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync and rename it into place.

    Readers never see a half-written file: either the old one (or none) or the complete new one.
    A crash leaves only a `.tmp-*` file: readers skip dot-files, and the next run deletes it (WorkDir).
    `durable=False` skips the fsyncs: for intermediates whose checksum is verified before reuse, so a
    file a crash left incomplete is redone rather than trusted.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # unique per writer: Dask may run a task twice at once, on machines whose pids collide
    tmp = final.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}"
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        if durable:
            _fsync_dir(final.parent)
    except DiskFullError:
        raise
    except OSError as err:
        if not is_disk_full(err):
            raise
        # the size written so far is all that is known here; the sinks say more (the failed write)
        raise disk_full(final, tmp.stat().st_size if tmp.exists() else 1) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class _AtomicSink:
    """A file published on a clean exit from its `with` block and discarded on an error."""

    def close(self) -> str:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ParquetSink(_AtomicSink):
    """Writes one Parquet file atomically, in row groups as they come; empty files get the schema."""

    def __init__(
        self, path: str | Path, schema: pa.Schema, compression_level: int = 1, durable: bool = True
    ) -> None:
        self.path = Path(path)
        self.schema = schema
        self.rows = 0
        self.sha256: str | None = None  # set by close()
        self._ctx = atomic_path(self.path, durable)
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(
            self._tmp,
            schema,
            compression="zstd",
            compression_level=compression_level,
            use_dictionary=dictionary_columns(schema),
            write_statistics=False,
        )

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            try:
                self._writer.write_table(table.cast(self.schema) if table.schema != self.schema else table)
            except OSError as err:
                if is_disk_full(err):
                    raise disk_full(self.path, table.nbytes) from None
                raise
            self.rows += table.num_rows

    def close(self) -> str:
        """Publish the file and return its sha256."""
        try:
            self._writer.close()
        except OSError as err:
            if is_disk_full(err):
                raise disk_full(self.path, 1 << 20) from None  # the footer and buffered pages
            raise
        self._ctx.__exit__(None, None, None)
        self.sha256 = sha256_file(self.path)  # read back once, while the file is in the page cache
        return self.sha256

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


class TokenFileSink(_AtomicSink):
    """Writes token ids as one raw little-endian int32 file, atomically, hashing the bytes as they go.

    The layout of datatrove's tokenized files: no framing, so a reader fetches any span with one
    positioned read. Ids are int32 (every vocabulary here is below 2**31).
    """

    def __init__(self, path: str | Path, durable: bool = True) -> None:
        self.path = Path(path)
        self.tokens = 0
        self.sha256: str | None = None  # set by close()
        self._sha = hashlib.sha256()
        self._ctx = atomic_path(self.path, durable)
        self._f = open(self._ctx.__enter__(), "wb")  # noqa: SIM115 (closed in close/abort)

    def write(self, ids: np.ndarray) -> None:
        buf = memoryview(np.ascontiguousarray(ids, dtype="<i4")).cast("B")  # type: ignore[arg-type]
        try:
            self._f.write(buf)  # both release the GIL on large buffers
        except OSError as err:
            if is_disk_full(err):
                raise disk_full(self.path, buf.nbytes) from None
            raise
        self._sha.update(buf)
        self.tokens += len(ids)

    def close(self) -> str:
        """Publish the file and return its sha256."""
        try:
            self._f.close()  # flushes the last buffered bytes
        except OSError as err:
            if is_disk_full(err):
                raise disk_full(self.path, 1 << 20) from None
            raise
        self._ctx.__exit__(None, None, None)
        self.sha256 = self._sha.hexdigest()
        return self.sha256

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()
        with contextlib.suppress(Exception):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def read_tokens_into(fd: int, out: np.ndarray, token_offset: int) -> None:
    """Fill `out` (int32, contiguous) with the tokens of a TokenFileSink file starting at `token_offset`."""
    view = memoryview(out).cast("B")  # type: ignore[arg-type]
    pos, want = token_offset * 4, view.nbytes
    done = 0
    while done < want:
        n = os.preadv(fd, [view[done:]], pos + done)
        if n <= 0:
            raise OSError(f"token file ends early: wanted {want} bytes at {pos}, got {done}")
        done += n


class Background:
    """Runs calls on one worker thread, in submission order, with at most `depth` waiting.

    Lets compression and file writes (which release the GIL) overlap with the next batch's compute
    while memory stays bounded. An error in a call surfaces at the next submit or at `drain`.
    """

    def __init__(self, depth: int = 2, name: str = "longloom-io") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque[Future[Any]] = deque()
        self._depth = depth

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for every submitted call; raises the first error."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Background:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.drain()
        else:
            with contextlib.suppress(Exception):
                self.drain()
