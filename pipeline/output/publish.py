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

from pipeline.output.card import (
    dataset_configs,
    include_audit_of,
    load_manifest,
    split_front_matter,
    write_card,
)
from pipeline.output.card.figures import figure_mismatches
from schemas.manifest import FileEntry, Manifest
from schemas.publish import PublishConfig, repo_id_problem
from schemas.redact import redact_url

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


STAGED_README = Path(".longloom") / "publish" / "README.md"


def card_to_upload(out: Path, manifest: Manifest, include_audit: bool) -> Path:
    """The README.md to upload: the output's own, or, when the audit tables stay behind but the card
    lists them, a card regenerated without them under .longloom/publish/ (the local one is left alone)."""
    readme = out / "README.md"
    if not readme.is_file():
        raise PublishError(f"{readme}: missing; run `longloom card {out}` first")
    meta, _ = split_front_matter(readme.read_text(encoding="utf-8"))
    if (
        not include_audit
        and meta.get("configs") != dataset_configs(manifest, False)
        and meta.get("configs") == dataset_configs(manifest, True)
    ):
        return write_card(out, include_audit=False, readme=out / STAGED_README).path
    return readme


def check_card(
    out: Path, manifest: Manifest, readme: Path | None = None, include_audit: bool = True
) -> list[str]:
    """The card must describe this manifest, figures included; returns the images it links to."""
    readme = readme or out / "README.md"
    if not readme.is_file():
        raise PublishError(f"{readme}: missing; run `longloom card {out}` first")
    meta, body = split_front_matter(readme.read_text(encoding="utf-8"))
    if meta.get("configs") != dataset_configs(manifest, include_audit) or manifest.config_hash not in body:
        raise PublishError(
            f"{readme}: its `configs:` do not match {out / 'manifest.json'} (written by another run?); "
            f"run `longloom card {out}` to regenerate it"
        )
    wrong = figure_mismatches(meta, body, manifest)
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise PublishError(
            f"{readme}: {wrong[0]}{more}; the card must state the run's figures: "
            f"run `longloom card {out}` to regenerate it"
        )
    images = sorted(set(re.findall(r"\]\((images/[^)\s]+)\)", body)))
    missing = [i for i in images if not (out / i).is_file()]
    if missing:
        raise PublishError(f"{readme}: links to missing {', '.join(missing)}; run `longloom card {out}`")
    return images


def local_files(out: Path, manifest: Manifest, include_audit: bool = True) -> list[LocalFile]:
    """Every file to publish, hashed; shards are checked against the manifest's checksums.

    Without `include_audit` the audit tables (dropped documents, and the raw bytes of unreadable
    input in `audit/quarantine`) are not uploaded, and the card that goes up does not list them.
    """
    readme = card_to_upload(out, manifest, include_audit)
    images = check_card(out, manifest, readme, include_audit)
    entries: list[FileEntry] = [e for t in manifest.targets for e in t.shards]
    entries += [e for files in manifest.extra_configs.values() for e in files]
    if include_audit:
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
    card = _local(out, str(readme.relative_to(out)))
    files.append(LocalFile("README.md", card.local, card.size, card.sha256, card.blob_id))
    files += [_local(out, rel) for rel in ("manifest.json", *images)]
    return sorted(files, key=lambda f: f.path)


def _api(endpoint: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None)


PROBE_TIMEOUT_SECONDS = 5.0


def reachable(endpoint: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> str | None:
    """None if the endpoint answers HTTP at all (any status), else why not, in a few words.

    One request, no retries: huggingface_hub retries connection errors with back-off (about 25 s,
    each retry printed), which is the right thing mid-upload and the wrong thing for a mistyped
    HF_ENDPOINT or a machine without network.
    """
    import httpx

    try:
        httpx.head(f"{endpoint.rstrip('/')}/api/datasets", timeout=timeout, follow_redirects=False)
    except httpx.TimeoutException:
        return f"no answer within {timeout:g} s"
    except httpx.HTTPError as err:
        return f"{type(err).__name__}: {err}"
    return None


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
    include_audit: bool | None = None,
) -> PublishResult:
    """Create the dataset repo if needed and commit what changed; with `dry_run`, only say what would.

    `include_audit` None follows the run's `publish.include_audit`.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, get_token
    from huggingface_hub.errors import HfHubHTTPError

    out = Path(out)
    problem = repo_id_problem(repo_id)
    if problem:
        raise PublishError(f"repo id {repo_id!r}: {problem}")
    manifest = load_manifest(out)
    if include_audit is None:
        include_audit = include_audit_of(manifest)
    failed = [c for c in manifest.checks if not c.ok]
    if failed and not allow_failed_checks:
        raise PublishError(
            f"{out / 'manifest.json'}: {len(failed)} reconciliation checks failed "
            f"({'; '.join(c.name for c in failed[:3])}); fix the run, or pass --allow-failed-checks"
        )
    local = local_files(out, manifest, include_audit)
    api = _api(endpoint)
    if not dry_run and get_token() is None:
        raise PublishError("no hub token: set HF_TOKEN in the environment (never in a config file)")
    exists: bool | None
    shown = redact_url(api.endpoint)  # what errors and the plan show: never credentials in a URL
    unreachable = reachable(api.endpoint)
    if unreachable and not dry_run:
        raise PublishError(f"{shown}: cannot reach the hub ({unreachable}); check HF_ENDPOINT")
    try:
        if unreachable:
            raise ConnectionError(unreachable)
        remote = remote_files(api, repo_id, revision)
        exists = remote is not None
        if not dry_run and not exists:
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            remote = remote_files(api, repo_id, revision)
    except HfHubHTTPError as err:
        raise PublishError(f"{shown}: {err}") from None
    except Exception as err:  # connection refused, DNS, timeouts: a dry run still lists everything
        if not dry_run:
            raise PublishError(
                f"{shown}: cannot reach the hub ({type(err).__name__}: {err}); check HF_ENDPOINT"
            ) from None
        remote, exists = None, None
    changes = plan_changes(local, remote or {}, delete_stale)
    plan = PublishPlan(repo_id, revision, shown, exists, changes, dry_run)
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
        raise PublishError(f"{shown}: commit to {repo_id} failed: {err}") from None
    log.info("committed %s to %s", info.oid, repo_id)
    return PublishResult(plan, dry_run, commit=info.oid, url=info.commit_url)


def publish_configured(out: Path, cfg: PublishConfig) -> PublishResult:
    """Publish as the `publish:` section of a run's config says (the flow's last stage)."""
    if not cfg.repo_id:
        raise PublishError("publish.repo_id: required to publish (ORG/NAME of the dataset repo)")
    return publish(
        out,
        cfg.repo_id,
        private=cfg.private,
        revision=cfg.revision,
        delete_stale=cfg.delete_stale,
        include_audit=cfg.include_audit,
    )
