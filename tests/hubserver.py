"""A local HTTP server that speaks the Hugging Face Hub's file API, and ModelScope's, for download tests
without a network.

It serves folders as repos: model info, the tree listing, and `resolve` with HEAD, ETags, commit headers
and byte ranges, as huggingface_hub expects; and ModelScope's `/api/v1/models/{id}/repo/files` listing and
`/api/v1/models/{id}/repo?FilePath=` file route (with byte ranges), as the modelscope package expects. Faults can be switched on per test: cut a file's body after
N bytes, stall, throttle, or require a token.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubState:
    repos: dict[str, Path] = field(default_factory=dict)
    token: str | None = None  # when set, every repo is gated behind it
    cut_after: dict[str, int] = field(default_factory=dict)  # filename -> bytes sent before the connection drops (once)
    stall: set[str] = field(default_factory=set)  # filenames whose body never comes
    bytes_per_second: int | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    modelscope_revisions: list[str] = field(default_factory=list)  # the Revision each ModelScope call asked for
    lock: threading.Lock = field(default_factory=threading.Lock)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


class Handler(BaseHTTPRequestHandler):
    server_version = "fakehub/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    @property
    def hub(self) -> HubState:
        return self.server.hub  # type: ignore[attr-defined]

    def _json(self, code: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, code: int, message: str, kind: str | None = None) -> None:
        self.send_response(code)
        body = json.dumps({"error": message}).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if kind:
            self.send_header("X-Error-Code", kind)
            self.send_header("X-Error-Message", message)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self) -> bool:
        if self.hub.token is None:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        with self.hub.lock:
            self.hub.requests.append((self.command, self.path, self.headers.get("Range")))
        path = self.path.split("?", 1)[0]
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
        if m:
            return self._info(m.group(1))
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$", path)
        if m:
            return self._tree(m.group(1))
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._resolve(m.group(1), m.group(3))
        m = re.match(r"^/api/v1/models/([^/]+/[^/]+)/repo(/files)?$", path)
        if m:
            query = parse_qs(urlsplit(self.path).query)
            with self.hub.lock:
                self.hub.modelscope_revisions.append(query.get("Revision", [""])[0])
            if m.group(2):
                return self._ms_files(m.group(1))
            return self._ms_file(m.group(1), query.get("FilePath", [""])[0])
        self._error(404, "not found")

    # ModelScope: errors and listings come wrapped in {"Code", "Message", "Data", "Success"}

    def _ms_files(self, repo: str) -> None:
        root = self._repo(repo, modelscope=True)
        if root is None:
            return
        files = [{"Name": p.name, "Path": str(p.relative_to(root)), "Type": "blob", "Size": p.stat().st_size,
                  "Sha256": _sha256(p), "Revision": COMMIT} for p in _files(root)]
        self._json(200, {"Code": 200, "Data": {"Files": files}, "Message": "success", "Success": True})

    def _ms_file(self, repo: str, filename: str) -> None:
        root = self._repo(repo, modelscope=True)
        if root is None:
            return
        p = root / filename
        if not p.is_file() or ".." in filename:
            self._json(404, {"Code": 10010205004, "Message": f"file {filename} not found", "Success": False})
            return
        self._send_file(p, filename)

    def _repo(self, repo: str, modelscope: bool = False) -> Path | None:
        """The repo's folder; or None, once a 404 (no such repo) or 401 (no token) went out in the asked hub's
        dialect."""
        root = self.hub.repos.get(repo)
        if root is not None and self._authorized():
            return root
        missing = root is None
        if modelscope:
            self._json(404 if missing else 401, {
                "Code": 10010205001 if missing else 10010205002, "Success": False,
                "Message": f"model {repo} not found" if missing else "the model is private: log in first"})
        elif missing:
            self._error(404, "Repository not found", "RepoNotFound")
        else:
            self._error(401, "Access to this model is restricted. You must have access to it and be authenticated.",
                        "GatedRepo")
        return None

    def _info(self, repo: str) -> None:
        root = self._repo(repo)
        if root is None:
            return
        siblings = []
        for p in _files(root):
            sib = {"rfilename": str(p.relative_to(root)), "size": p.stat().st_size,
                   "blobId": hashlib.sha1(p.read_bytes()).hexdigest()}
            if p.suffix == ".safetensors":
                sib["lfs"] = {"sha256": _sha256(p), "size": p.stat().st_size, "pointerSize": 134}
            siblings.append(sib)
        self._json(200, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings})

    def _tree(self, repo: str) -> None:
        root = self._repo(repo)
        if root is None:
            return
        entries = []
        for p in _files(root):
            rel = str(p.relative_to(root))
            size = p.stat().st_size
            entry = {"type": "file", "path": rel, "size": size, "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
            if p.suffix == ".safetensors":
                entry["lfs"] = {"oid": _sha256(p), "size": size, "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries)

    def _resolve(self, repo: str, filename: str) -> None:
        root = self._repo(repo)
        if root is None:
            return
        p = root / filename
        if not p.is_file() or ".." in filename:
            self._error(404, "Entry not found", "EntryNotFound")
            return
        self._send_file(p, filename)

    def _send_file(self, p: Path, filename: str) -> None:
        """The body of one file, from the `Range` start when given, with the faults switched on for it."""
        data = p.read_bytes()
        etag = f'"{_sha256(p)}"'
        start = 0
        rng = self.headers.get("Range")
        if rng:
            m = re.match(r"bytes=(\d+)-(\d*)$", rng)
            if m:
                start = int(m.group(1))
        if start >= len(data) and len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.send_header("X-Repo-Commit", COMMIT)
        if p.suffix == ".safetensors":
            self.send_header("X-Linked-Etag", etag)
            self.send_header("X-Linked-Size", str(len(data)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if self.command == "HEAD":
            return
        if filename in self.hub.stall:
            time.sleep(3600)
            return
        cut = None
        with self.hub.lock:
            if filename in self.hub.cut_after:
                cut = self.hub.cut_after.pop(filename)
        sent = 0
        step = 64 * 1024
        while sent < len(body):
            piece = body[sent: sent + step]
            if cut is not None and sent + len(piece) > cut:
                self.wfile.write(piece[: max(0, cut - sent)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            try:
                self.wfile.write(piece)
            except (BrokenPipeError, ConnectionResetError):
                return
            sent += len(piece)
            if self.hub.bytes_per_second:
                time.sleep(len(piece) / self.hub.bytes_per_second)


class FakeHub:
    """`host`: the address to listen on (loopback, or the process nodes' bridge address for pods to reach)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.state = HubState()
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.hub = self.state  # type: ignore[attr-defined]
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def ranges(self, filename: str) -> list[str | None]:
        """The Range header of every GET of `filename`, by either hub's route."""
        return [r for m, p, r in self.state.requests
                if m == "GET" and (p.split("?")[0].endswith("/" + filename) or p.endswith("FilePath=" + filename))]
