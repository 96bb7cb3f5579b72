"""A local stand-in for the Hugging Face Hub's HTTP API (HF_ENDPOINT points at it): it answers the calls huggingface_hub
makes to create a repository and a branch, upload files (preupload, the LFS batch API and its PUTs, the commit) and
read repository info, and records them, so the real client can be checked against what it sent. Gated and absent
repositories answer as the Hub does (X-Error-Code)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GATED, ABSENT = "acme/gated", "acme/absent"


@dataclass
class HubState:
    calls: list[tuple[str, str]] = field(default_factory=list)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo -> {"private", "branches"}
    blobs: dict[str, bytes] = field(default_factory=dict)  # LFS oid -> bytes
    commits: list[dict[str, Any]] = field(default_factory=list)  # {"repo", "revision", "files": {path: bytes}}


class FakeHub:
    def __init__(self) -> None:
        self.state = HubState()
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                state.calls.append(("GET", self.path))
                if self.path.startswith("/api/whoami"):
                    return self._send(200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})
                m = re.match(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/?]+))?", self.path)
                if m and m[1] == GATED:
                    return self._send(401, {"error": "gated"}, {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
                if m and (m[1] == ABSENT or m[1] not in state.repos):
                    return self._send(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound",
                                                                     "X-Error-Message": "Repository not found"})
                if m:
                    return self._send(200, {"id": m[1], "sha": "0" * 40, "siblings": []})
                self._send(404, {"error": "no route"})

            def do_PUT(self) -> None:
                body = self._body()
                state.calls.append(("PUT", self.path))
                oid = self.path.rsplit("/", 1)[1]
                state.blobs[oid] = body
                self._send(200 if hashlib.sha256(body).hexdigest() == oid else 400)

            def do_POST(self) -> None:
                body = self._body()
                state.calls.append(("POST", self.path))
                base = f"http://{self.headers['Host']}"
                if self.path == "/api/validate-yaml":  # the model card's front matter
                    return self._send(200, {"errors": [], "warnings": []})
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'tester'}/{req['name']}"
                    private = bool(req.get("private")) or req.get("visibility") == "private"
                    state.repos.setdefault(repo, {"private": private, "branches": {"main"}})
                    return self._send(200, {"url": f"{base}/{repo}", "name": repo, "id": repo})
                if m := re.match(r"/api/models/([^/]+/[^/]+)/branch/(.+)", self.path):
                    state.repos[m[1]]["branches"].add(m[2])
                    return self._send(200, {})
                if m := re.match(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", self.path):
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "lfs", "shouldIgnore": False}
                                                      for f in files], "commitOid": "0" * 40})
                if m := re.match(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", self.path):
                    objects = json.loads(body)["objects"]
                    return self._send(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"], "authenticated": True,
                         "actions": {"upload": {"href": f"{base}/lfs-upload/{o['oid']}"}}} for o in objects]})
                if m := re.match(r"/api/models/([^/]+/[^/]+)/commit/(.+)", self.path):
                    files: dict[str, bytes] = {}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        value = item.get("value", {})
                        if item.get("key") == "file":
                            files[value["path"]] = base64.b64decode(value["content"])
                        elif item.get("key") == "lfsFile":
                            files[value["path"]] = state.blobs.get(value["oid"], b"")
                    state.commits.append({"repo": m[1], "revision": m[2], "files": files})
                    return self._send(200, {"commitUrl": f"{base}/{m[1]}/commit/{'1' * 40}", "commitOid": "1" * 40})
                self._send(404, {"error": "no route"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
