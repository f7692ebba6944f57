"""Source-code repositories: one directory becomes ONE repository-level document.

The document is the repository's text files, each preceded by a header line
`# ===== <path relative to the repository> =====`, with one blank line between files, in an order where
a Python module follows the in-repo modules it imports (see `pyimports`); the other files keep path
order. This follows the repository-level packing of long-context code data (e.g. DeepSeek-Coder's
dependency-ordered concatenation). Excluded and hidden folders, symlinks and files outside
`include_extensions` are skipped by policy (counted in a log line); binary, undecodable and oversized
files are quarantined with `member` = their path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import storage
from pipeline.readers.base import (
    RAW_PREFIX_BYTES,
    DocumentNotFound,
    InputShard,
    ReadBatch,
    ShardReader,
    expand_glob,
    input_uri,
    shard_id,
)
from pipeline.readers.pyimports import ModuleIndex, dependency_order, imports_of
from schemas.config import CodeOptions, ConfigError, SourceConfig
from schemas.redact import redact_url
from schemas.stage_config import HasSources

STEP = "code_repo_reader@1"
FILE_HEADER = "# ===== {path} =====\n"
BINARY_SNIFF_BYTES = 8192
log = logging.getLogger("longloom.readers.code")
_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


@dataclass
class Quarantined:
    member: str
    reason: str
    detail: str
    raw: bytes


@dataclass
class RepoDocument:
    """The outcome of reading one repository directory."""

    text: str | None  # None when no file was usable
    files: list[str] = field(default_factory=list)  # members in document order
    quarantined: list[Quarantined] = field(default_factory=list)
    skipped: int = 0  # files left out by policy: excluded/hidden dirs, symlinks, extensions
    raw_bytes: int = 0

    @property
    def considered(self) -> int:
        return len(self.files) + len(self.quarantined)


def render(files: list[tuple[str, str]]) -> str:
    """The document text from (path, content) pairs in order."""
    blocks = []
    for path, content in files:
        end = "" if not content or content.endswith("\n") else "\n"
        blocks.append(FILE_HEADER.format(path=path) + content + end)
    return "\n".join(blocks)


def _normalized_extensions(opts: CodeOptions) -> set[str] | None:
    if opts.include_extensions is None:
        return None
    return {(e if e.startswith(".") else "." + e).lower() for e in opts.include_extensions}


def _count_files(folder: str) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def candidate_files(repo: Path, opts: CodeOptions) -> tuple[list[str], int]:
    """Repository-relative posix paths of the files to consider, sorted, and how many were skipped."""
    exclude = set(opts.exclude_dirs)
    exts = _normalized_extensions(opts)
    found: list[str] = []
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(repo):
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                skipped += 1
            elif d in exclude or d.startswith("."):
                skipped += _count_files(full)
            else:
                keep.append(d)
        dirnames[:] = sorted(keep)
        rel_dir = os.path.relpath(dirpath, repo)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or (exts is not None and os.path.splitext(name)[1].lower() not in exts):
                skipped += 1
                continue
            found.append(Path(rel_dir, name).as_posix() if rel_dir != "." else name)
    return sorted(found), skipped


def read_repo(repo: Path, uri: str, opts: CodeOptions) -> RepoDocument:
    """Read one repository into its document; one file in memory at a time besides the texts kept."""
    paths, skipped = candidate_files(repo, opts)
    doc = RepoDocument(text=None, skipped=skipped)
    texts: dict[str, str] = {}
    for rel in paths:
        full = repo / rel
        where = f"{rel} in repository {uri}"
        size = full.stat().st_size
        if size > opts.max_file_bytes:
            with open(full, "rb") as f:
                head = f.read(RAW_PREFIX_BYTES)
            doc.raw_bytes += len(head)
            doc.quarantined.append(
                Quarantined(
                    rel,
                    "too_large",
                    f"{where}: {size} bytes > code.max_file_bytes={opts.max_file_bytes}; "
                    f"raise sources[].code.max_file_bytes or exclude the file",
                    head,
                )
            )
            continue
        data = full.read_bytes()
        doc.raw_bytes += len(data)
        if b"\0" in data[:BINARY_SNIFF_BYTES]:
            doc.quarantined.append(
                Quarantined(
                    rel,
                    "binary_file",
                    f"{where}: a binary file (NUL byte in the first {BINARY_SNIFF_BYTES} bytes); "
                    f"set sources[].code.include_extensions to keep only source files",
                    data[:RAW_PREFIX_BYTES],
                )
            )
            continue
        try:
            texts[rel] = data.decode("utf-8")
        except UnicodeDecodeError as err:
            doc.quarantined.append(
                Quarantined(
                    rel,
                    "invalid_utf8",
                    f"{where}: not valid UTF-8 (bad byte at offset {err.start}); re-encode the file as UTF-8 "
                    f"or leave it out with sources[].code.include_extensions",
                    data[:RAW_PREFIX_BYTES],
                )
            )
    if texts:
        index = ModuleIndex(texts, root_package=repo.resolve().name)
        deps = {p: imports_of(p, t, index) for p, t in texts.items() if p.endswith(".py")}
        doc.files = dependency_order(sorted(texts), deps)
        doc.text = render([(p, texts[p]) for p in doc.files])
    return doc


def git_head(repo: Path) -> str | None:
    """The commit checked out in `repo`, read from .git without the git binary; else `git rev-parse`."""
    try:
        commit = _read_git_head(repo)
    except OSError:
        commit = None
    if commit is None and (repo / ".git").exists() and shutil.which("git"):
        try:
            out = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            commit = out.stdout.strip() if out.returncode == 0 and _SHA.match(out.stdout.strip()) else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return commit


def _read_git_head(repo: Path) -> str | None:
    dot_git = repo / ".git"
    if dot_git.is_file():  # worktrees and submodules: "gitdir: <path>"
        content = dot_git.read_text(encoding="utf-8").strip()
        if not content.startswith("gitdir:"):
            return None
        gitdir = (repo / content[len("gitdir:") :].strip()).resolve()
    elif dot_git.is_dir():
        gitdir = dot_git
    else:
        return None
    head = (gitdir / "HEAD").read_text(encoding="utf-8").strip()
    if _SHA.match(head):
        return head  # detached HEAD
    if not head.startswith("ref:"):
        return None
    ref = head[len("ref:") :].strip()
    common = gitdir
    if (gitdir / "commondir").is_file():
        common = (gitdir / (gitdir / "commondir").read_text(encoding="utf-8").strip()).resolve()
    for base in dict.fromkeys((gitdir, common)):
        loose = base / ref
        if loose.is_file():
            sha = loose.read_text(encoding="utf-8").strip()
            return sha if _SHA.match(sha) else None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref and _SHA.match(parts[0]):
                return parts[0]
    return None


class CodeShardReader(ShardReader):
    def _read(self) -> Iterator[ReadBatch]:
        repo = storage.input_path(self.cfg, self.shard.uri)
        doc = read_repo(repo, self.uri, self.source.code)
        b = self.new_builder()
        b.records_read = doc.considered
        for q in doc.quarantined:
            b.quarantine(0, q.reason, q.detail, raw=q.raw, member=q.member)
        if doc.text is None:
            b.quarantine(
                0,
                "empty_repository",
                f"repository {self.uri}: no usable text file ({len(doc.quarantined)} quarantined, "
                f"{doc.skipped} skipped by exclude_dirs/hidden folders/include_extensions); "
                f"check sources[].paths and sources[].code",
            )
        else:
            b.add_doc(0, self.uri, doc.text, len(doc.text))
        log.info(
            "%s: %d files in the document, %d quarantined, %d skipped by policy "
            "(code.exclude_dirs, hidden folders, symlinks, code.include_extensions)",
            self.uri,
            len(doc.files),
            len(doc.quarantined),
            doc.skipped,
        )
        commit = git_head(repo)
        if commit is not None:
            self._revision = commit
        elif doc.text is not None:
            self._revision = "sha256:" + hashlib.sha256(doc.text.encode("utf-8")).hexdigest()[:16]
        self._bytes = doc.raw_bytes
        yield b.flush()


def list_shards(cfg: HasSources, src: SourceConfig) -> list[InputShard]:
    repos: dict[str, Path] = {}
    for pattern in src.paths:
        if storage.is_remote(pattern):  # a checkout's git metadata and file tree are read in place
            raise ConfigError(
                f"source {src.name!r}: {redact_url(pattern)}: kind 'code' reads local repository folders; "
                "copy the repositories to a local (or shared) folder, or export them as jsonl/parquet"
            )
        matches = expand_glob(cfg, pattern)
        if not matches:
            raise ConfigError(
                f"source {src.name!r}: path pattern {pattern!r} matches nothing (patterns are relative to "
                f"{cfg.base_dir}); code paths must match repository folders, e.g. 'repos/*'"
            )
        for m in matches:
            uri = input_uri(cfg, m)
            if not m.is_dir():
                raise ConfigError(
                    f"source {src.name!r}: {uri} (from path pattern {pattern!r}) is not a directory; kind 'code' "
                    f"reads repository folders, so make the pattern match folders only, e.g. 'repos/*/'"
                )
            repos.setdefault(uri, m)
    return [
        InputShard(source=src.name, kind="code", uri=uri, shard_id=shard_id(src.name, i), index=i)
        for i, uri in enumerate(sorted(repos))
    ]


def fetch_text(cfg: HasSources, src: SourceConfig, uri: str, record: int) -> str:
    if record != 0:
        raise DocumentNotFound(f"repository {uri}: code documents have record 0, not {record}")
    doc = read_repo(storage.input_path(cfg, uri), uri, src.code)
    if doc.text is None:
        raise DocumentNotFound(f"repository {uri}: no usable text file (quarantined as empty_repository)")
    return doc.text
