"""A Hugging Face Hub on loopback for the tests: the endpoints `huggingface_hub` calls to resolve a
revision (`/api/models/{repo}/revision/{rev}`) and to read a file (`HEAD`/`GET`
`/{repo}/resolve/{rev}/{file}`, with byte ranges), serving model folders the tests made.

It counts what it serves, so a test can say how many bytes of weights left it:
`weight_bytes` are bytes of `.safetensors`/`.bin` files past their safetensors header.

    hub = FakeHub(); hub.add("org/base", "/tmp/toy/base"); hub.start()
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": "/tmp/cache"}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

WEIGHT_SUFFIXES = (".safetensors", ".bin")


class Repo:
    def __init__(self) -> None:
        self.branches: dict[str, str] = {}  # name -> commit
        self.commits: dict[str, dict[str, bytes]] = {}  # commit -> file name -> contents


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.authorization: list[str | None] = []  # each request's Authorization header
        self.weight_bytes = 0
        self.stall_after: dict[str, int] = {}  # "org/name/file" -> stop sending after this many bytes (once)
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def add(self, repo_id: str, folder: str, branch: str = "main") -> str:
        """Serve `folder`'s files as a new commit of `repo_id` on `branch`; returns the commit hash."""
        files = {}
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = f.read()
        digest = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode())
        commit = hashlib.sha1((repo_id + branch + digest.hexdigest() + str(len(self.repos))).encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        repo.commits[commit] = files
        repo.branches[branch] = commit
        return commit

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub.serve(self, body=False)

            def do_GET(self) -> None:
                hub.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def weight_requests(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith(WEIGHT_SUFFIXES)]

    # the protocol

    def _commit(self, repo_id: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        commit = repo.branches.get(rev, rev)
        return (commit, repo.commits[commit]) if commit in repo.commits else None

    def serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(h.path.split("?")[0])
        with self.lock:
            self.requests.append((h.command, path, h.headers.get("Range")))
            self.authorization.append(h.headers.get("Authorization"))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
        if m:
            found = self._commit(m.group(1), m.group(2))
            if found is None:
                code = "RepoNotFound" if m.group(1) not in self.repos else "RevisionNotFound"
                return self._send(h, 404, b'{"error": "not found"}', {"X-Error-Code": code}, body)
            commit, files = found
            doc = {"id": m.group(1), "modelId": m.group(1), "sha": commit, "private": False, "tags": [],
                   "siblings": [{"rfilename": n} for n in files]}  # fmt: skip
            return self._send(h, 200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, body)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m:
            return self._send(h, 404, b"no such endpoint", {}, body)
        found = self._commit(m.group(1), m.group(2))
        if found is None:
            code = "RepoNotFound" if m.group(1) not in self.repos else "RevisionNotFound"
            return self._send(h, 404, b"not found", {"X-Error-Code": code}, body)
        commit, files = found
        name = m.group(3)
        if name not in files:
            return self._send(h, 404, b"not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, body)
        data = files[name]
        etag = hashlib.sha256(data).hexdigest() if name.endswith(WEIGHT_SUFFIXES) else hashlib.sha1(data).hexdigest()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        begin, end, status = 0, len(data), 200
        rng = h.headers.get("Range")
        if rng:
            r = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if r:
                begin = int(r.group(1))
                end = min(len(data), int(r.group(2)) + 1) if r.group(2) else len(data)
                status = 206
                headers["Content-Range"] = f"bytes {begin}-{end - 1}/{len(data)}"
        chunk = data[begin:end]
        if body and name.endswith(WEIGHT_SUFFIXES):
            header_end = 8 + struct.unpack("<Q", data[:8])[0] if name.endswith(".safetensors") else 0
            with self.lock:
                self.weight_bytes += max(0, end - max(begin, header_end))
        stall = self.stall_after.pop(f"{m.group(1)}/{name}", None) if body and not rng else None
        if stall is not None:  # send part of a whole-file download, then hang until the client is killed
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(chunk)))
            h.end_headers()
            h.wfile.write(chunk[:stall])
            h.wfile.flush()
            time.sleep(60)
            return
        self._send(h, status, chunk, headers, body)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict, body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)
