"""Publish an output folder to a Hugging Face-compatible hub as a dataset repo.

What goes up is what the manifest lists (pretraining shards, synthesized sets, audit tables) plus
README.md, images/ and manifest.json; the `.longloom/` work folder and anything else lying in the
folder never do. A re-publish compares every file with the remote tree (sha256 for LFS files, the
git blob id otherwise) and commits only what changed, in one commit; files under data/, audit/ and
images/ that this run did not write are deleted, so a config never loads a stale shard.

The endpoint is `HF_ENDPOINT` (or huggingface.co) and the token is whatever huggingface_hub finds
in the environment (`HF_TOKEN`): this module never reads its value, logs it or writes it anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.card import dataset_configs, load_manifest, split_front_matter
from schemas.manifest import FileEntry, Manifest
from schemas.publish import PublishConfig

log = logging.getLogger("longloom")

MANAGED_FOLDERS = ("data/", "audit/", "images/")
Action = Literal["add", "update", "delete", "unchanged"]


class PublishError(RuntimeError):
    """Publishing cannot go ahead; the message names the file or setting and the fix."""


@dataclass(frozen=True)
class LocalFile:
    path: str  # path in the repo, "/"-separated
    local: Path
    size: int
    sha256: str
    blob_id: str  # git blob sha1, what the hub reports for non-LFS files


@dataclass(frozen=True)
class Change:
    path: str
    action: Action
    size: int


@dataclass
class PublishPlan:
    repo_id: str
    revision: str
    endpoint: str
    repo_exists: bool | None  # before this publish; None: the hub could not be asked (dry run only)
    changes: list[Change] = field(default_factory=list)
    dry_run: bool = False

    def of(self, *actions: Action) -> list[Change]:
        return [c for c in self.changes if c.action in actions]

    @property
    def upload_bytes(self) -> int:
        return sum(c.size for c in self.of("add", "update"))

    def lines(self) -> list[str]:
        where = f"{self.endpoint}/datasets/{self.repo_id} ({self.revision})"
        state = {True: "exists", False: "created", None: "could not be reached"}[self.repo_exists]
        if self.dry_run and self.repo_exists is False:
            state = "would be created"
        up = self.of("add", "update")
        out = [
            f"{where}: repo {state}; {len(up)} files to upload ({self.upload_bytes:,} bytes), "
            f"{len(self.of('delete'))} to delete, {len(self.of('unchanged'))} unchanged"
        ]
        out += [
            f"  {c.action:<9} {c.path} ({c.size:,} bytes)" for c in self.changes if c.action != "unchanged"
        ]
        return out


@dataclass
class PublishResult:
    plan: PublishPlan
    dry_run: bool
    commit: str | None = None  # commit id, None when nothing was committed
    url: str | None = None


def hash_file(path: Path, chunk: int = 1 << 22) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one pass."""
    size = path.stat().st_size
    sha = hashlib.sha256()
    git = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            git.update(block)
    return sha.hexdigest(), git.hexdigest()


def _local(out: Path, rel: str) -> LocalFile:
    p = out / rel
    sha, blob = hash_file(p)
    return LocalFile(rel, p, p.stat().st_size, sha, blob)


def check_card(out: Path, manifest: Manifest) -> list[str]:
    """The card must describe this manifest; returns the images it links to."""
    readme = out / "README.md"
    if not readme.is_file():
        raise PublishError(f"{readme}: missing; run `longloom card {out}` first")
    meta, body = split_front_matter(readme.read_text(encoding="utf-8"))
    if meta.get("configs") != dataset_configs(manifest) or manifest.config_hash not in body:
        raise PublishError(
            f"{readme}: its `configs:` do not match {out / 'manifest.json'} (written by another run?); "
            f"run `longloom card {out}` to regenerate it"
        )
    images = sorted(set(re.findall(r"\]\((images/[^)\s]+)\)", body)))
    missing = [i for i in images if not (out / i).is_file()]
    if missing:
        raise PublishError(f"{readme}: links to missing {', '.join(missing)}; run `longloom card {out}`")
    return images


def local_files(out: Path, manifest: Manifest) -> list[LocalFile]:
    """Every file to publish, hashed; shards are checked against the manifest's checksums."""
    images = check_card(out, manifest)
    entries: list[FileEntry] = [e for t in manifest.targets for e in t.shards]
    entries += [e for files in manifest.extra_configs.values() for e in files]
    entries += [e for files in manifest.audit.values() for e in files]
    files = []
    for e in entries:
        if not (out / e.path).is_file():
            raise PublishError(f"{out / e.path}: listed in manifest.json but missing; rebuild the output")
        f = _local(out, e.path)
        if f.sha256 != e.sha256:
            raise PublishError(
                f"{f.local}: sha256 {f.sha256[:12]}… differs from manifest.json ({e.sha256[:12]}…): "
                "the file changed after the run; rebuild the output"
            )
        files.append(f)
    files += [_local(out, rel) for rel in ("README.md", "manifest.json", *images)]
    return sorted(files, key=lambda f: f.path)


def _api(endpoint: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None)


def remote_files(api: Any, repo_id: str, revision: str) -> dict[str, Any] | None:
    """path -> RepoFile of the remote tree, or None when the repo does not exist yet."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        tree = api.list_repo_tree(repo_id, repo_type="dataset", revision=revision, recursive=True)
        return {f.path: f for f in tree if hasattr(f, "blob_id")}
    except RepositoryNotFoundError:
        return None
    except RevisionNotFoundError:
        return {}


def same(local: LocalFile, remote: Any) -> bool:
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return bool(lfs.sha256 == local.sha256)
    return bool(remote.blob_id == local.blob_id)


def plan_changes(local: list[LocalFile], remote: dict[str, Any], delete_stale: bool) -> list[Change]:
    changes: list[Change] = []
    for f in local:
        r = remote.get(f.path)
        action: Action = "add" if r is None else "unchanged" if same(f, r) else "update"
        changes.append(Change(f.path, action, f.size))
    if delete_stale:
        mine = {f.path for f in local}
        for path, r in sorted(remote.items()):
            if path.startswith(MANAGED_FOLDERS) and path not in mine:
                changes.append(Change(path, "delete", int(r.size)))
    return changes


def publish(
    out: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str = "main",
    dry_run: bool = False,
    delete_stale: bool = True,
    endpoint: str | None = None,
    commit_message: str | None = None,
    allow_failed_checks: bool = False,
) -> PublishResult:
    """Create the dataset repo if needed and commit what changed; with `dry_run`, only say what would."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, get_token
    from huggingface_hub.errors import HfHubHTTPError

    out = Path(out)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id):
        raise PublishError(f"repo id {repo_id!r}: expected ORG/NAME")
    manifest = load_manifest(out)
    failed = [c for c in manifest.checks if not c.ok]
    if failed and not allow_failed_checks:
        raise PublishError(
            f"{out / 'manifest.json'}: {len(failed)} reconciliation checks failed "
            f"({'; '.join(c.name for c in failed[:3])}); fix the run, or pass --allow-failed-checks"
        )
    local = local_files(out, manifest)
    api = _api(endpoint)
    if not dry_run and get_token() is None:
        raise PublishError("no hub token: set HF_TOKEN in the environment (never in a config file)")
    exists: bool | None
    try:
        remote = remote_files(api, repo_id, revision)
        exists = remote is not None
        if not dry_run and not exists:
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            remote = remote_files(api, repo_id, revision)
    except HfHubHTTPError as err:
        raise PublishError(f"{api.endpoint}: {err}") from None
    except Exception as err:  # connection refused, DNS, timeouts: a dry run still lists everything
        if not dry_run:
            raise PublishError(
                f"{api.endpoint}: cannot reach the hub ({type(err).__name__}: {err}); check HF_ENDPOINT"
            ) from None
        remote, exists = None, None
    changes = plan_changes(local, remote or {}, delete_stale)
    plan = PublishPlan(repo_id, revision, api.endpoint, exists, changes, dry_run)
    for line in plan.lines():
        log.info(line)
    if dry_run or not plan.of("add", "update", "delete"):
        return PublishResult(plan, dry_run)
    by_path = {f.path: f for f in local}
    ops: list[Any] = []
    for c in plan.of("add", "update"):
        op = CommitOperationAdd(path_in_repo=c.path, path_or_fileobj=str(by_path[c.path].local))
        op.upload_info.sha256 = bytes.fromhex(by_path[c.path].sha256)  # hashed once, above
        ops.append(op)
    ops += [CommitOperationDelete(path_in_repo=c.path) for c in plan.of("delete")]
    message = commit_message or (
        f"Longloom {manifest.longloom_version}: config {manifest.config_hash} "
        f"({len(plan.of('add', 'update'))} files, {len(plan.of('delete'))} deleted)"
    )
    try:
        info = api.create_commit(
            repo_id, operations=ops, commit_message=message, repo_type="dataset", revision=revision
        )
    except HfHubHTTPError as err:
        raise PublishError(f"{api.endpoint}: commit to {repo_id} failed: {err}") from None
    log.info("committed %s to %s", info.oid, repo_id)
    return PublishResult(plan, dry_run, commit=info.oid, url=info.commit_url)


def publish_configured(out: Path, cfg: PublishConfig) -> PublishResult:
    """Publish as the `publish:` section of a run's config says (the flow's last stage)."""
    if not cfg.repo_id:
        raise PublishError("publish.repo_id: required to publish (ORG/NAME of the dataset repo)")
    return publish(
        out, cfg.repo_id, private=cfg.private, revision=cfg.revision, delete_stale=cfg.delete_stale
    )
