"""A local stand-in for the Hugging Face hub: real HTTP on 127.0.0.1, the endpoints the installed
huggingface_hub calls for `HfApi.create_repo` and `HfApi.upload_folder`, and a bearer token it checks
(401 for any other).

- `POST /api/repos/create` (`{"name", "organization", "visibility"}`): records the repo and whether
  it is private; 409 (with its url) when it exists; 400 for a name in `rejected_names`.
- `GET /api/models/{repo}` (repo info, which create_repo asks after a 401 or 403).
- `GET /api/agent-harnesses` (asked once per process by huggingface_hub itself, without a token).
- `POST /api/validate-yaml` (upload_folder checks README.md's metadata first).
- `POST /api/models/{repo}/preupload/{revision}`: every file's upload mode is "regular", so its bytes
  arrive base64 in the commit itself (no LFS or Xet transfer: nothing else is needed).
- `POST /api/models/{repo}/commit/{revision}` (ndjson: a header line, then one line per file):
  records each file's bytes by path, in `commits` and in the repo's `files`.

Point huggingface_hub at it with `huggingface_hub.constants.ENDPOINT` (HfApi reads it when built)
or HF_ENDPOINT in a fresh process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from local_server import LocalServer

TOKEN = "hf_stubTOKEN0123456789abcdefDoNotLeak"
USER = "user"  # the token's user: a repo name without a namespace goes under it


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)


class HubStub(LocalServer):
    def __init__(self, token: str = TOKEN, rejected_names: tuple[str, ...] = ()):
        self.token = token
        self.rejected_names = set(rejected_names)
        self.repos: dict[str, Repo] = {}
        self.commits: list[dict[str, bytes]] = []
        self.requests: list[str] = []  # "METHOD path" of every request, in order
        super().__init__()

    @property
    def url(self) -> str:
        return self.root

    def _handler(self):
        stub = self
        repo_path = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                stub.requests.append(f"GET {self.path}")
                if self.path == "/api/agent-harnesses":  # huggingface_hub's own telemetry, no token
                    return self._send(200, {"standardEnvVars": [], "harnesses": {}})
                if not self._authorized():
                    return
                match = repo_path.match(self.path.split("?")[0])
                repo = stub.repos.get(match["repo"]) if match else None
                if repo is None:
                    return self._not_found()
                sha = hashlib.sha1(str(len(stub.commits)).encode()).hexdigest()
                self._send(200, {"id": match["repo"], "private": repo.private, "sha": sha, "siblings": []})

            def do_POST(self):
                stub.requests.append(f"POST {self.path}")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self._authorized():
                    return
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    return self._create(json.loads(body))
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                match = repo_path.match(path)
                if match is None or match["repo"] not in stub.repos:
                    return self._not_found()
                rest = match["rest"] or ""
                if rest.startswith("/preupload/"):
                    files = json.loads(body)["files"]
                    answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._send(200, {"files": answer})
                if rest.startswith("/commit/"):
                    return self._commit(match["repo"], body)
                self._send(404, {"error": f"no route {path}"})

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {stub.token}":
                    return True
                self._send(401, {"error": "Invalid credentials in Authorization header"})
                return False

            def _create(self, payload: dict):
                name = payload["name"]
                repo_id = f"{payload.get('organization') or USER}/{name}"
                if name in stub.rejected_names:
                    return self._send(400, {"error": "repository name is not allowed"})
                if repo_id in stub.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": self._url(repo_id)})
                stub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
                self._send(200, {"url": self._url(repo_id), "name": repo_id})

            def _commit(self, repo_id: str, body: bytes):
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                if not lines or lines[0]["key"] != "header":
                    return self._send(400, {"error": "the commit has no header line"})
                files = {}
                for line in lines[1:]:
                    if line["key"] != "file" or line["value"].get("encoding") != "base64":
                        return self._send(422, {"error": f"the stub takes regular files only, not {line['key']}"})
                    files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                stub.commits.append(files)
                stub.repos[repo_id].files.update(files)
                oid = hashlib.sha1(str(len(stub.commits)).encode()).hexdigest()
                self._send(200, {"commitUrl": f"{self._url(repo_id)}/commit/{oid}", "commitOid": oid,
                                 "pullRequestUrl": None})  # fmt: skip

            def _url(self, repo_id: str) -> str:
                return f"{stub.url}/{repo_id}"

            def _not_found(self):
                self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

            def _send(self, status: int, payload: dict, headers: dict | None = None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler
