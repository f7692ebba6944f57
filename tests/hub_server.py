"""A small Hugging Face hub look-alike on 127.0.0.1, for publishing and loading tests (no network).

It implements the endpoints `huggingface_hub` calls to create a repo and commit to it (repo creation,
YAML validation, preupload, the git-LFS batch API with basic uploads and verify, the ndjson commit)
and those `datasets.load_dataset("ORG/NAME")` reads through (repo info by revision, tree listing,
paths-info, `resolve/` downloads with ETag, X-Repo-Commit, Content-Length and byte ranges). Repos
keep every commit's tree, so downloads by commit id work. Each request is recorded, so a test can
see exactly which files were uploaded and committed.

    with HubServer(token="hf_test") as hub:   # hub.url -> HF_ENDPOINT
        ...
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_EXTENSIONS = (".parquet", ".png", ".arrow", ".bin", ".safetensors", ".gz", ".zst")
LFS_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    size: int
    blob_id: str  # git oid (of the pointer file for LFS blobs)
    content: bytes | None = None  # regular files
    lfs_oid: str | None = None  # sha256 of the content, for LFS files

    @property
    def etag(self) -> str:
        return self.lfs_oid or self.blob_id


def regular(data: bytes) -> Blob:
    return Blob(len(data), git_blob_id(data), content=data)


def lfs(oid: str, size: int) -> Blob:
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()
    return Blob(size, git_blob_id(pointer), lfs_oid=oid)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    trees: dict[str, dict[str, Blob]] = field(default_factory=dict)  # commit id -> path -> blob
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    created: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"))

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        return rev if rev in self.trees else None


@dataclass
class Request:
    method: str
    path: str
    status: int
    detail: dict[str, Any] = field(default_factory=dict)


class HubServer:
    """Thread-backed hub on an ephemeral port. `token` is required for writes and private reads."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- what tests look at ------------------------------------------------------------------------

    def lfs_uploads(self) -> list[str]:
        """oids whose bytes were PUT, in order."""
        return [r.detail["oid"] for r in self.requests if r.method == "PUT" and r.status == 200]

    def commits(self) -> list[dict[str, Any]]:
        """Each commit's operations: {"files": [...], "lfs": [...], "deleted": [...]}."""
        return [r.detail for r in self.requests if r.path.endswith("/commit/main") and r.status == 200]

    def files(self, repo_id: str, rev: str = "main", repo_type: str = "dataset") -> dict[str, Blob]:
        repo = self.repos[(repo_type, repo_id)]
        return dict(repo.trees[repo.resolve(rev) or ""])

    def content(self, blob: Blob) -> bytes:
        return blob.content if blob.content is not None else self.lfs_store[blob.lfs_oid or ""]

    # --- repo operations ---------------------------------------------------------------------------

    def create(self, repo_type: str, repo_id: str, private: bool) -> bool:
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                return False
            repo = Repo(repo_type, repo_id, private)
            self.repos[key] = repo
            self._commit(repo, "main", {".gitattributes": regular(GITATTRIBUTES)}, "initial commit")
            return True

    def _commit(self, repo: Repo, branch: str, tree: dict[str, Blob], summary: str) -> str:
        parent = repo.branches.get(branch, "")
        listing = json.dumps({p: b.blob_id for p, b in sorted(tree.items())})
        sha = hashlib.sha1(f"{parent}\n{summary}\n{listing}".encode()).hexdigest()
        repo.trees[sha] = tree
        repo.branches[branch] = sha
        return sha


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    repo_re = r"(?P<type>datasets|models|spaces)/(?P<repo>[^/]+/[^/]+)"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        # --- plumbing ---------------------------------------------------------------------------

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(
            self,
            status: int,
            body: bytes = b"",
            ctype: str = "application/json",
            headers: dict[str, str] | None = None,
            head: bool = False,
            length: int | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head and self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None, **detail: Any) -> None:
            self._record(status, **detail)
            self._send(status, json.dumps(obj).encode(), headers=headers)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._json(status, {"error": message}, headers)

        def _record(self, status: int, **detail: Any) -> None:
            with hub.lock:
                hub.requests.append(Request(self.command, urlsplit(self.path).path, status, detail))

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _repo(self, m: re.Match[str], write: bool = False) -> Repo | None:
            repo = hub.repos.get((m["type"][:-1], m["repo"]))
            if repo is None or ((write or repo.private) and not self._authorized()):
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            return repo

        def _tree(self, repo: Repo, rev: str) -> tuple[str, dict[str, Blob]] | None:
            sha = repo.resolve(unquote(rev))
            if sha is None:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                return None
            return sha, repo.trees[sha]

        def _base(self) -> str:
            return f"http://{self.headers.get('Host')}"

        # --- verbs ------------------------------------------------------------------------------

        def do_HEAD(self) -> None:
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:
            url = urlsplit(self.path)
            path = url.path
            query = parse_qs(url.query)
            if m := re.fullmatch(rf"/{repo_re}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path):
                return self._resolve(m, head)
            if m := re.fullmatch(rf"/api/{repo_re}(?:/revision/(?P<rev>[^/]+))?", path):
                return self._info(m)
            if m := re.fullmatch(rf"/api/{repo_re}/tree/(?P<rev>[^/]+)(?:/(?P<dir>.*))?", path):
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._list(m, recursive)
            self._error(404, f"no route for GET {path}")

        def do_POST(self) -> None:
            path = urlsplit(self.path).path
            body = self._body()
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            if path == "/api/validate-yaml":
                return self._validate(json.loads(body))
            if m := re.fullmatch(rf"/api/{repo_re}/preupload/(?P<rev>[^/]+)", path):
                return self._preupload(m, json.loads(body))
            if m := re.fullmatch(rf"/api/{repo_re}/commit/(?P<rev>[^/]+)", path):
                return self._commit(m, body)
            if m := re.fullmatch(rf"/api/{repo_re}/paths-info/(?P<rev>[^/]+)", path):
                return self._paths_info(m, body)
            if m := re.fullmatch(rf"/{repo_re}\.git/info/lfs/objects/batch", path):
                return self._lfs_batch(m, json.loads(body))
            if path == "/lfs/verify":
                req = json.loads(body)
                ok = req.get("oid") in hub.lfs_store
                return self._json(200 if ok else 404, {"ok": ok})
            self._error(404, f"no route for POST {path}")

        def do_PUT(self) -> None:
            path = urlsplit(self.path).path
            if not (m := re.fullmatch(r"/lfs/upload/(?P<oid>[0-9a-f]{64})", path)):
                return self._error(404, f"no route for PUT {path}")
            data = self._body()
            if hashlib.sha256(data).hexdigest() != m["oid"]:
                return self._json(400, {"error": "sha256 mismatch"}, oid=m["oid"])
            with hub.lock:
                hub.lfs_store[m["oid"]] = data
            self._json(200, {}, oid=m["oid"], size=len(data))

        # --- endpoints --------------------------------------------------------------------------

        def _create(self, req: dict[str, Any]) -> None:
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            repo_type = req.get("type") or "model"
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            private = req.get("private") or req.get("visibility") == "private"
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{self._base()}/{prefix}{repo_id}"
            if not hub.create(repo_type, repo_id, bool(private)):
                return self._json(409, {"error": "You already created this repo", "url": url})
            self._json(200, {"url": url, "name": repo_id}, repo=repo_id)

        def _validate(self, req: dict[str, Any]) -> None:
            content = req.get("content", "")
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as err:
                return self._json(400, {"errors": [{"message": f"invalid YAML: {err}"}]})
            if meta is not None and not isinstance(meta, dict):
                return self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
            self._json(200, {"errors": [], "warnings": []})

        def _preupload(self, m: re.Match[str], req: dict[str, Any]) -> None:
            if not (repo := self._repo(m, write=True)) or not (t := self._tree(repo, m["rev"])):
                return
            tree = t[1]
            files = []
            for f in req["files"]:
                sample = base64.b64decode(f["sample"])
                is_lfs = f["path"].endswith(LFS_EXTENSIONS) or b"\0" in sample or f["size"] >= LFS_SIZE
                old = tree.get(f["path"])
                files.append(
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if is_lfs else "regular",
                        "shouldIgnore": False,
                        "oid": None if old is None else (old.lfs_oid if is_lfs else old.blob_id),
                    }
                )
            self._json(200, {"files": files, "commitOid": t[0]}, paths=[f["path"] for f in files])

        def _lfs_batch(self, m: re.Match[str], req: dict[str, Any]) -> None:
            if not self._repo(m, write=True):
                return
            objects = []
            for o in req["objects"]:
                entry: dict[str, Any] = {"oid": o["oid"], "size": o["size"]}
                if len(hub.lfs_store.get(o["oid"], b"")) != o["size"] or o["oid"] not in hub.lfs_store:
                    entry["authenticated"] = True
                    entry["actions"] = {
                        "upload": {"href": f"{self._base()}/lfs/upload/{o['oid']}"},
                        "verify": {"href": f"{self._base()}/lfs/verify", "header": {}},
                    }
                objects.append(entry)
            self._record(200, oids=[o["oid"] for o in req["objects"]])
            self._send(
                200,
                json.dumps({"transfer": "basic", "objects": objects}).encode(),
                "application/vnd.git-lfs+json",
            )

        def _commit(self, m: re.Match[str], body: bytes) -> None:
            if not (repo := self._repo(m, write=True)):
                return
            lines = [json.loads(x) for x in body.splitlines() if x.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            with hub.lock:
                if not (t := self._tree(repo, m["rev"])):
                    return
                tree = dict(t[1])
                detail: dict[str, list[str]] = {"files": [], "lfs": [], "deleted": []}
                for op in lines:
                    v = op["value"]
                    if op["key"] == "file":
                        tree[v["path"]] = regular(base64.b64decode(v["content"]))
                        detail["files"].append(v["path"])
                    elif op["key"] == "lfsFile":
                        if v["oid"] not in hub.lfs_store:
                            return self._error(422, f"LFS object {v['oid']} was never uploaded")
                        tree[v["path"]] = lfs(v["oid"], len(hub.lfs_store[v["oid"]]))
                        detail["lfs"].append(v["path"])
                    elif op["key"] == "deletedFile":
                        if tree.pop(v["path"], None) is None:
                            return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                        detail["deleted"].append(v["path"])
                    elif op["key"] == "deletedFolder":
                        gone = [p for p in tree if p.startswith(v["path"].rstrip("/") + "/")]
                        for p in gone:
                            del tree[p]
                        detail["deleted"] += gone
                sha = hub._commit(repo, unquote(m["rev"]), tree, header["summary"])
            url = f"{self._base()}/{m['type']}/{repo.repo_id}/commit/{sha}"
            self._json(
                200, {"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None}, **detail
            )

        def _info(self, m: re.Match[str]) -> None:
            if not (repo := self._repo(m)) or not (t := self._tree(repo, m["rev"] or "main")):
                return
            sha, tree = t
            card: dict[str, Any] = {}
            if "README.md" in tree:
                text = hub.content(tree["README.md"]).decode()
                if mm := re.match(r"^---\n(.*?)\n---\n", text, re.S):
                    card = yaml.safe_load(mm.group(1)) or {}
            info = {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": sha,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": repo.created,
                "lastModified": repo.created,
                "cardData": card,
                "siblings": [{"rfilename": p} for p in sorted(tree)],
            }
            self._json(200, info)

        def _entry(self, path: str, tree: dict[str, Blob]) -> dict[str, Any] | None:
            if path in tree:
                b = tree[path]
                e: dict[str, Any] = {"type": "file", "oid": b.blob_id, "size": b.size, "path": path}
                if b.lfs_oid:
                    e["lfs"] = {"oid": b.lfs_oid, "size": b.size, "pointerSize": 134}
                return e
            if any(p.startswith(path + "/") for p in tree) or path == "":
                oid = hashlib.sha1(("tree:" + path).encode()).hexdigest()
                return {"type": "directory", "oid": oid, "size": 0, "path": path}
            return None

        def _list(self, m: re.Match[str], recursive: bool) -> None:
            if not (repo := self._repo(m)) or not (t := self._tree(repo, m["rev"])):
                return
            tree = t[1]
            base = unquote(m["dir"] or "").strip("/")
            if base and base in tree:
                return self._json(200, [self._entry(base, tree)])
            prefix = base + "/" if base else ""
            if base and not any(p.startswith(prefix) for p in tree):
                return self._error(404, f"{base} does not exist", "EntryNotFound")
            names: set[str] = set()
            for p in tree:
                if not p.startswith(prefix):
                    continue
                parts = p[len(prefix) :].split("/")
                upto = len(parts) if recursive else 1
                for k in range(1, upto + 1):
                    names.add(prefix + "/".join(parts[:k]))
            entries = [self._entry(p, tree) for p in sorted(names)]
            self._json(200, entries)

        def _paths_info(self, m: re.Match[str], body: bytes) -> None:
            if not (repo := self._repo(m)) or not (t := self._tree(repo, m["rev"])):
                return
            form = parse_qs(body.decode())
            paths = form.get("paths", [])
            entries = [e for p in paths if (e := self._entry(p.strip("/"), t[1])) is not None]
            self._json(200, entries)

        def _resolve(self, m: re.Match[str], head: bool) -> None:
            if not (repo := self._repo(m)) or not (t := self._tree(repo, m["rev"])):
                return
            sha, tree = t
            name = unquote(m["file"])
            if name not in tree:
                return self._error(404, f"Entry not found: {name}", "EntryNotFound")
            blob = tree[name]
            data = hub.content(blob)
            headers = {"ETag": f'"{blob.etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
            status = 200
            rng = self.headers.get("Range")
            if rng and (r := re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())):
                start = int(r[1]) if r[1] else max(0, len(data) - int(r[2]))
                end = min(int(r[2]), len(data) - 1) if r[1] and r[2] else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start : end + 1], 206
            self._record(status, file=name)
            self._send(status, data, "application/octet-stream", headers, head=head)

    return Handler
