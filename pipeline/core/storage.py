"""Where files live: a plain path, or an fsspec URL (`s3://`, `gs://`, `hf://datasets/...`, `file://`).

Plain paths (and `file://` URLs, which are plain paths) keep the code path they always had. A remote
URL is used through local files, because the stages memory-map token files and write with atomic
local sinks (fsync + rename):

- **inputs** (`local_copy`): a source file or folder on a URL is copied into a per-machine input cache
  keyed by the URL and the object's size/ETag, so a changed object is read again and an unchanged one
  is fetched once per machine;
- **the output folder** (`Mirror`): each process works in a scratch folder of its own that mirrors
  the store. Before a unit runs the process `pull`s what changed in the store; the unit writes with the
  usual atomic sinks; then the process `push`es what it wrote: data files first, completion records
  (`*.json`) after them and `manifest.json` last. A single-object PUT on S3/GCS is atomic (the object is
  whole or absent), so the record that says a unit is done exists only once everything it points at
  is stored (manifest-last commit): a unit killed mid-way never looks done, and its rerun on any
  machine overwrites the same keys (nothing is duplicated).

Credentials come from where fsspec and its backends read them (the environment, `~/.aws`, fsspec's
config); nothing here records them. Every URL that reaches a record, a log line or an error message goes
through `redact_url` (userinfo and secret query values removed).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.core.faults import crash_point
from schemas.redact import redact_url

LOCAL_PROTOCOLS = ("file", "local")
# Never mirrored to the store: per-process files (the run lock, helper-process records) and
# temporaries an atomic sink is still writing.
_PRIVATE = (".longloom/lock", ".longloom/helpers/", ".longloom/run-lock", ".longloom/probes/")
LOCK_OBJECT = ".longloom/run-lock"  # the run's lock on a store (`StoreLock`), kept out of every mirror


class StorageError(ValueError):
    """A store that cannot be used: one line naming the (redacted) URL and what is missing."""


def protocol(path: str) -> str | None:
    """The URL scheme of `path` (`s3`, `gs`, `hf`, `file`), None for a plain path."""
    head, sep, _ = path.partition("://")
    if not sep or not head or not all(c.isalnum() or c in "+-." for c in head):
        return None
    return head.lower()


def is_remote(path: str | Path) -> bool:
    """True for a URL of an object store or hub; plain paths and `file://` URLs are local."""
    p = protocol(str(path))
    return p is not None and p not in LOCAL_PROTOCOLS


def shown(path: str) -> str:
    """`path` as it may be recorded or logged: a remote URL redacted, a local path unchanged."""
    return redact_url(path) if is_remote(path) else path


def local_path(path: str) -> Path:
    """A plain path or `file://` URL as a `Path` (only for `not is_remote(path)`)."""
    if protocol(path) in LOCAL_PROTOCOLS:
        return Path(path.partition("://")[2])
    return Path(path)


# A preflight must answer in seconds: botocore's default retries take ~20 s to give up on an endpoint
# that refuses connections.
_PREFLIGHT_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {
        "skip_instance_cache": True,
        "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 1, "mode": "standard"}},
    }
}


def _fs(url: str, preflight: bool = False) -> tuple[Any, str]:
    import fsspec  # imported only when a URL is used: plain-path runs never load it

    options = _PREFLIGHT_OPTIONS.get(protocol(url) or "", {}) if preflight else {}
    fs, root = fsspec.core.url_to_fs(url, **options)
    return fs, root.rstrip("/")


def _ident(info: dict[str, Any]) -> str:
    """What identifies one version of an object: size plus ETag (S3, GCS), blob id (Hugging Face hub),
    or else its modification or creation time."""
    keys = ("ETag", "etag", "blob_id", "md5Hash", "LastModified", "mtime", "created")
    tag = next((info[k] for k in keys if info.get(k)), "")
    return f"{info.get('size')}-{str(tag).strip(chr(34))}"


def explain(err: BaseException) -> str:
    """What is missing, from a backend's error, worded for the person who runs the build."""
    name = type(err).__name__
    text = str(err).splitlines()[0] if str(err) else name
    if "NoCredentials" in name or "credentials" in text.lower():
        return "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)"
    if isinstance(err, FileNotFoundError) or "NoSuchBucket" in text:
        return f"the bucket or path does not exist ({text})"
    if isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"access denied with the credentials found ({text})"
    if "connect" in text.lower() or "endpoint" in text.lower() or isinstance(err, OSError):
        return f"cannot connect to the store ({text}); check AWS_ENDPOINT_URL / the network"
    return f"{name}: {text}"


def scratch_root() -> Path:
    """Where this machine keeps mirrors and the input cache (`LONGLOOM_SCRATCH`, else the temp folder)."""
    env = os.environ.get("LONGLOOM_SCRATCH")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"longloom-{os.getuid()}"


def bucket_of(url: str) -> str:
    """`s3://bucket` of a URL, or `hf://datasets/org/name` of a hub URL: what one preflight check covers."""
    proto, _, rest = url.partition("://")
    if proto == "hf":
        return f"hf://{_store_root(proto, rest)}"
    return f"{proto}://{rest.split('/', 1)[0].rpartition('@')[2]}"


def _store_root(proto: str, root: str) -> str:
    """The part of a filesystem path that one credential check covers: the bucket, or on the hub the
    repository (`datasets/org/name`, `spaces/org/name`, `org/name` for a model), revision dropped."""
    parts = root.split("/")
    if proto != "hf":
        return parts[0]
    n = 3 if parts[0] in ("datasets", "spaces") else 2
    return "/".join(parts[:n]).partition("@")[0]


def check_store(url: str, what: str, must_exist: bool) -> None:
    """Preflight: StorageError (one line) unless the store at `url` answers with the credentials found.

    `must_exist`: the path itself must exist (an input); otherwise its bucket must (an output).
    """
    shown = redact_url(url)
    try:
        fs, root = _fs(url, preflight=True)
        if must_exist:
            if not fs.exists(root):
                raise StorageError(f"{what}: {shown} does not exist in the store")
            return
        bucket = _store_root(protocol(url) or "", root)
        if protocol(url) == "hf":  # a repository, not a bucket: it exists and this token may read it
            if not fs.exists(bucket):
                raise StorageError(
                    f"{what}: {shown}: the hub repository {bucket} does not exist, or is private and "
                    "HF_TOKEN is not set (or may not read it)"
                )
            return
        fs.ls(bucket, detail=False)  # the bucket exists and these credentials may list it
    except StorageError:
        raise
    except ImportError as err:
        raise StorageError(f"{what}: {shown}: no filesystem for this URL ({err}); install it") from None
    except ValueError as err:
        if "Protocol not known" not in str(err):
            raise StorageError(f"{what}: {shown}: {explain(err)}") from None
        raise StorageError(f"{what}: {shown}: no filesystem for this URL scheme ({err})") from None
    except Exception as err:  # backends raise anything: one clear line
        raise StorageError(f"{what}: {shown}: {explain(err)}") from None


def write_probe(url: str) -> None:
    """List the bucket of `url`, write a small object at `url` and delete it (a cluster check that the
    credentials this process finds may write there); raises what the backend raises."""
    fs, root = _fs(url, preflight=True)
    fs.ls(root.split("/", 1)[0], detail=False)
    fs.pipe_file(root, b"longloom probe\n")
    fs.rm_file(root)


def glob(pattern: str) -> list[str]:
    """Files matched by a URL pattern (`fs.glob`), as full URLs, sorted."""
    fs, _ = _fs(pattern)
    proto = protocol(pattern)
    found = fs.glob(pattern.partition("://")[2], detail=True)
    # spelled as the pattern is (`memory://x`, not the filesystem's own `/x`)
    return sorted(f"{proto}://{p.lstrip('/')}" for p, info in found.items() if info.get("type") == "file")


@contextlib.contextmanager
def open_input(url: str) -> Iterator[BinaryIO]:
    """The object at `url` opened for reading in the store (ranged reads: a Parquet footer is read
    without fetching the file)."""
    fs, root = _fs(url)
    with fs.open(root, "rb") as f:
        yield f


def info(url: str) -> str:
    """The identity of the object or folder at `url` (size/ETag of each file): what input stamps hash."""
    fs, root = _fs(url)
    if fs.isdir(root):
        return "|".join(
            f"{p[len(root) :]}:{_ident(i)}" for p, i in sorted(fs.find(root, detail=True).items())
        )
    return _ident(fs.info(root))


def input_path(cfg: Any, path: str) -> Path:
    """A config's input path as a local file: a store's URL through this machine's input cache
    (`local_copy`), anything else resolved by the config (`BuildConfig.resolve`: against its folder)."""
    return local_copy(path) if is_remote(path) else cfg.resolve(path)


def local_copy(url: str) -> Path:
    """A local copy of the file or folder at `url` in this machine's input cache (fetched when missing).

    Keyed by the URL and the object's size/ETag: a replaced object is fetched again. Written to a
    temporary name and renamed, so concurrent processes on one machine never read half a copy.
    """
    fs, root = _fs(url)
    ident = info(url)
    key = hashlib.sha256(f"{redact_url(url)}\n{ident}".encode()).hexdigest()[:24]
    dest = scratch_root() / "inputs" / key / (Path(root).name or "input")
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{os.getpid()}-{threading.get_ident()}"
    if fs.isdir(root):
        for p in sorted(fs.find(root)):
            target = tmp / p[len(root) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(p, str(target))
    else:
        fs.get_file(root, str(tmp))
    try:
        os.replace(tmp, dest)
    except OSError:  # another process renamed its copy first (a folder cannot replace a folder)
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


class KeyedFiles:
    """A cache folder of keyed files (embedding segments, rewriter responses, long-dependency scores):
    a local folder, or an fsspec URL read and written through this machine's local copy of it.

    On a URL an entry is fetched the first time it is asked for (one GET of that entry, never the whole
    cache) and kept in `$LONGLOOM_SCRATCH/caches/<url hash>/`; a new entry is written to a local
    temporary file and stored with one PUT (whole or absent: a reader never sees half an entry), then
    renamed into the local copy. Entries are named by what determines their content, so a local copy
    never goes stale. The local copy is keyed by the redacted URL: credentials reach no path.
    """

    def __init__(self, location: str | Path) -> None:
        loc = str(location)
        self.remote = is_remote(loc)
        self.location = loc
        self.shown = shown(loc)
        self.gets = 0  # entries fetched from the store (tests and statistics)
        self.puts = 0
        if self.remote:
            self.url = loc.rstrip("/")
            self.fs, self.root = _fs(self.url)
            tag = hashlib.sha256(self.shown.encode()).hexdigest()[:16]
            self.local = scratch_root() / "caches" / tag
        else:
            self.local = local_path(loc).expanduser()
        self._count = threading.Lock()

    def __truediv__(self, rel: str) -> str:
        """The location of entry `rel`, as it may be shown (for a report)."""
        return f"{self.shown.rstrip('/')}/{rel}"

    def path(self, rel: str) -> Path | None:
        """Entry `rel` as a local file (fetched from the store once if needed); None if there is none."""
        local = self.local / rel
        if local.exists() or not self.remote:
            return local if local.exists() else None
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f".tmp-get-{os.getpid()}-{threading.get_ident()}-{local.name}"
        try:
            self.fs.get_file(f"{self.root}/{rel}", str(tmp))
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            return None
        with self._count:
            self.gets += 1
        os.replace(tmp, local)
        return local

    def read_bytes(self, rel: str) -> bytes | None:
        p = self.path(rel)
        try:
            return p.read_bytes() if p is not None else None
        except FileNotFoundError:
            return None

    def list(self, folder: str, suffix: str = "") -> list[str]:
        """Entries directly in `folder` whose names end with `suffix`, as paths relative to the cache,
        sorted; on a URL the store is listed (what other machines added is seen)."""
        if not self.remote:
            d = self.local / folder
            names = [p.name for p in d.iterdir() if p.is_file()] if d.is_dir() else []
        else:
            target = f"{self.root}/{folder}".rstrip("/")
            self.fs.invalidate_cache(target)
            try:
                names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(target, detail=False)]
            except FileNotFoundError:
                names = []
        return sorted(f"{folder}/{n}" for n in names if n.endswith(suffix) and not n.startswith(".tmp-"))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Store entry `rel` atomically (see the class): a concurrent reader finds it whole or absent."""
        local = self.local / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f".tmp-{os.getpid()}-{threading.get_ident()}-{local.name}"
        try:
            tmp.write_bytes(data)
            if self.remote:
                self.fs.put_file(str(tmp), f"{self.root}/{rel}")  # one PUT: whole or absent
                with self._count:
                    self.puts += 1
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)


class Mirror:
    """This process's scratch copy of an output folder on a URL: `pull` before work, `push` after.

    The scratch folder belongs to one process (its pid is in the name) and is removed when the
    process exits; what a killed process leaves is removed by the next process on the machine.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.shown = redact_url(self.url)
        self.fs, self.root = _fs(self.url)
        base = scratch_root() / "mirrors"
        tag = hashlib.sha256(self.shown.encode()).hexdigest()[:16]
        _reap_dead(base)
        self.local = base / f"{tag}-{os.getpid()}"
        self.local.mkdir(parents=True, exist_ok=True)
        atexit.register(shutil.rmtree, self.local, True)
        # rel path -> (size, mtime_ns) of the local file / identity of the stored object, when they
        # were last known to be the same content (pulled or pushed)
        self._local: dict[str, tuple[int, int]] = {}
        self._remote: dict[str, str] = {}
        # Stored files this process has not fetched yet (rel path -> identity). A process that only
        # runs units (a Dask worker) fetches what each unit names (`fetch`); the process that holds
        # the run's lock merges stages' results, so it mirrors everything (`fetch_all`, `full`).
        self._pending: dict[str, str] = {}
        self.full = False
        self.fetched: list[str] = []  # every file fetched, in order (tests and statistics)
        self._lock = threading.RLock()  # units on threads of one process share its mirror

    def _listing(self) -> dict[str, dict[str, Any]]:
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return {}
        found = {p[len(self.root) :].lstrip("/"): i for p, i in self.fs.find(self.root, detail=True).items()}
        return {rel: i for rel, i in found.items() if not rel.startswith(_PRIVATE)}

    def _stat(self, rel: str) -> tuple[int, int] | None:
        try:
            st = (self.local / rel).stat()
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    def pull(self) -> int:
        """Learn what changed in the store since this process last saw it: drop local copies of files
        removed from the store, and fetch the changed files (`full`) or note them as pending, to be
        fetched when a unit names them (`fetch`); the count of changes."""
        n = 0
        with self._lock:
            listing = self._listing()
            for rel in [r for r in self._pending if r not in listing]:
                del self._pending[rel]
            # removed from the store by another process (e.g. finalize on a worker deleting stale
            # shards) and unchanged here since: remove the local copy too
            for rel in [r for r in self._local if r not in listing]:
                if self._stat(rel) == self._local[rel]:
                    (self.local / rel).unlink(missing_ok=True)
                    del self._local[rel]
                    self._remote.pop(rel, None)
                    n += 1
            for rel, meta in sorted(listing.items()):
                ident = _ident(meta)
                if self._remote.get(rel) == ident and self._stat(rel) == self._local.get(rel):
                    continue
                n += 1
                if self.full:
                    self._get(rel, ident)
                    continue
                if rel in self._local and self._stat(rel) == self._local[rel]:
                    # replaced in the store, unchanged here: the old copy must not be read as current
                    (self.local / rel).unlink(missing_ok=True)
                    del self._local[rel]
                    self._remote.pop(rel, None)
                self._pending[rel] = ident
        return n

    def _get(self, rel: str, ident: str) -> None:
        dest = self.local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-pull-{dest.name}"
        self.fs.get_file(f"{self.root}/{rel}", str(tmp))
        os.replace(tmp, dest)
        self._remote[rel], self._local[rel] = ident, self._stat(rel) or (0, 0)
        self._pending.pop(rel, None)
        self.fetched.append(rel)

    def fetch(self, paths: Iterable[str | Path] | None) -> int:
        """Fetch the pending files among `paths` (files or folders of this mirror, absolute or relative;
        a folder means every file under it); None: every pending file. The count fetched."""
        with self._lock:
            if paths is None:
                wanted = sorted(self._pending)
            else:
                prefixes = set()
                for p in paths:
                    named = Path(p).relative_to(self.local) if Path(p).is_absolute() else Path(p)
                    prefixes.add(named.as_posix().rstrip("/"))
                wanted = [
                    r
                    for r in sorted(self._pending)
                    if r in prefixes or any(r.startswith(f"{q}/") for q in prefixes)
                ]
            for rel in wanted:
                self._get(rel, self._pending[rel])
            return len(wanted)

    def fetch_all(self) -> int:
        """From now on mirror everything (the process that merges the stages' results): fetch every
        pending file, and every changed file at each later `pull`."""
        with self._lock:
            self.full = True
            return self.fetch(None)

    def _files(self) -> Iterator[str]:
        for dirpath, _, names in os.walk(self.local):
            for name in names:
                rel = (Path(dirpath) / name).relative_to(self.local).as_posix()
                if name.startswith(".tmp-") or rel.startswith(_PRIVATE):
                    continue
                yield rel

    def push(self) -> int:
        """Store what this process wrote or deleted since it last synced; the count of changes.

        Order is the commit protocol: data files, then deletions, then completion records (`*.json`),
        `manifest.json` last. A record is stored only after every file it names.
        """
        with self._lock:
            present = {rel: st for rel in self._files() if (st := self._stat(rel)) is not None}
            changed = [rel for rel, st in present.items() if self._local.get(rel) != st]
            gone = [rel for rel in self._local if rel not in present]

            def rank(rel: str) -> tuple[int, str]:
                return (2 if rel == "manifest.json" else 1 if rel.endswith(".json") else 0, rel)

            changed.sort(key=rank)
            data = [r for r in changed if rank(r)[0] == 0]
            records = [r for r in changed if rank(r)[0] > 0]
            for rel in changed:
                self._pending.pop(rel, None)  # written here: this process's copy is the one stored
            for rel in data:
                self._put(rel, present[rel])
            if records:
                crash_point("push_records")  # tests: die with the data stored and its records not
            for rel in gone:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(f"{self.root}/{rel}")
                self._local.pop(rel, None)
                self._remote.pop(rel, None)
            for rel in records:
                self._put(rel, present[rel])
            return len(changed) + len(gone)

    def _put(self, rel: str, st: tuple[int, int]) -> None:
        target = f"{self.root}/{rel}"
        self.fs.put_file(str(self.local / rel), target)  # one PUT: the object is whole or absent
        self._local[rel] = st
        with contextlib.suppress(Exception):  # only spares the next pull a download
            self.fs.invalidate_cache(target)
            self._remote[rel] = _ident(self.fs.info(target))


class StoreLock:
    """One run at a time on an output folder in a store, whatever machine each client runs on.

    The lock is an object (`LOCK_OBJECT`) created with a conditional PUT (`If-None-Match: *`, s3fs's
    `mode="create"`): of two clients creating it, one succeeds, the other gets FileExistsError and
    waits. It holds the holder's host, pid and a random token, and the holder rewrites it every
    `heartbeat` seconds. A waiter takes it over (deletes it, then creates its own) when the holder is
    on this machine and its process is gone (a SIGKILLed client resumed here), or when the object has
    not changed for `ttl` seconds by the waiter's own clock (no two machines' clocks are compared).
    Between judging a lock stale and deleting it, a waiter checks that it is unchanged; two waiters
    taking over the same stale lock at the same instant can still both delete, a window of one request.
    """

    def __init__(
        self,
        url: str,
        ttl: float | None = None,
        heartbeat: float | None = None,
        poll: float | None = None,
        host: str | None = None,
    ) -> None:
        self.shown = redact_url(url.rstrip("/"))
        self.fs, root = _fs(url.rstrip("/"))
        self.path = f"{root}/{LOCK_OBJECT}"
        self.ttl = ttl if ttl is not None else float(os.environ.get("LONGLOOM_STORE_LOCK_TTL", "120"))
        self.heartbeat = heartbeat if heartbeat is not None else min(30.0, self.ttl / 4)
        self.poll = poll if poll is not None else min(5.0, self.ttl / 10)
        self.host = host or socket.gethostname()
        self.token = uuid.uuid4().hex
        self.beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        rec = {"host": self.host, "pid": os.getpid(), "token": self.token, "beat": self.beats}
        return (json.dumps(rec, sort_keys=True) + "\n").encode()

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the lock's record, a digest of its bytes), or (None, None) when there is no lock."""
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        try:
            rec = json.loads(data)
        except ValueError:
            rec = {}  # not ours to read: only its age can free it
        return (rec if isinstance(rec, dict) else {}), hashlib.sha256(data).hexdigest()

    def _gone_here(self, rec: dict[str, Any]) -> bool:
        pid = rec.get("pid")
        if rec.get("host") != self.host or not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def acquire(self, log: Any = print, timeout: float | None = None) -> None:
        """Wait until this client holds the lock (TimeoutError after `timeout` seconds, if given)."""
        start = time.monotonic()
        seen: str | None = None
        seen_at = start
        said = False
        while True:
            try:
                self.fs.pipe_file(self.path, self._body(), mode="create")
                break
            except FileExistsError:
                pass
            rec, tag = self._read()
            if rec is None:
                continue  # released between our PUT and our read: try again at once
            now = time.monotonic()
            if tag != seen:
                seen, seen_at = tag, now
            if self._gone_here(rec) or now - seen_at > self.ttl:
                if self._read()[1] == tag:  # unchanged since judged stale
                    log(
                        f"{self.shown}: taking over the lock of a run that is gone (host {rec.get('host')}, "
                        f"pid {rec.get('pid')})"
                    )
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(self.path)
                continue
            if not said:
                log(
                    f"{self.shown}: another run holds this output folder (host {rec.get('host')}, pid "
                    f"{rec.get('pid')}); waiting for it to finish"
                )
                said = True
            if timeout is not None and now - start > timeout:
                raise TimeoutError(
                    f"{self.shown}: still locked by host {rec.get('host')}, pid {rec.get('pid')}"
                )
            time.sleep(self.poll)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="longloom-store-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            rec, _ = self._read()
            if rec is None or rec.get("token") != self.token:
                return  # taken over (this client was judged gone): never overwrite another's lock
            self.beats += 1
            with contextlib.suppress(Exception):  # a missed beat only brings the takeover closer
                self.fs.pipe_file(self.path, self._body())

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still this client's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        rec, _ = self._read()
        if rec is not None and rec.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)

    @contextlib.contextmanager
    def held(self, log: Any = print) -> Iterator[None]:
        self.acquire(log)
        try:
            yield
        finally:
            self.release()


def _reap_dead(base: Path) -> None:
    """Remove scratch folders of processes that are gone (killed before their exit hook ran)."""
    if not base.is_dir():
        return
    for d in base.iterdir():
        pid = d.name.rpartition("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


_MIRRORS: dict[str, Mirror] = {}
_MIRRORS_LOCK = threading.Lock()


def mirror(url: str) -> Mirror:
    """This process's mirror of the output folder at `url` (one per URL and process)."""
    key = url.rstrip("/")
    with _MIRRORS_LOCK:
        m = _MIRRORS.get(key)
        if m is None:
            m = _MIRRORS[key] = Mirror(key)
        return m


def output_path(dir: str) -> Path:
    """Where this process reads and writes the output folder `dir`: the folder itself when it is local,
    this process's mirror of it when it is a URL."""
    if is_remote(dir):
        return mirror(dir).local
    return local_path(dir)


def pull(dir: str) -> int:
    """`Mirror.pull` for a URL output folder; nothing for a local one."""
    return mirror(dir).pull() if is_remote(dir) else 0


def fetch(dir: str, paths: Iterable[str | Path] | None) -> int:
    """`Mirror.fetch` for a URL output folder (what a unit names, None: everything); nothing for a
    local one."""
    return mirror(dir).fetch(paths) if is_remote(dir) else 0


def fetch_all(dir: str) -> int:
    """`Mirror.fetch_all` for a URL output folder; nothing for a local one."""
    return mirror(dir).fetch_all() if is_remote(dir) else 0


def push(dir: str) -> int:
    """`Mirror.push` for a URL output folder; nothing for a local one."""
    return mirror(dir).push() if is_remote(dir) else 0
