"""A Hugging Face hub look-alike on 127.0.0.1, for `convert-hf --remote` tests and benchmarks.

It serves model directories as hub repositories through the endpoints huggingface_hub calls:

- GET /api/models/{repo}[/revision/{rev}]: the model info (id, sha, siblings);
- GET /api/models/{repo}/tree/{rev}: the file listing (snapshot_download);
- HEAD and GET /{repo}/resolve/{rev}/{path}: the file, with X-Repo-Commit, ETag, Content-Length and
  Accept-Ranges headers, and single byte ranges (206 with Content-Range);
- errors as the hub reports them (X-Error-Code RepoNotFound, RevisionNotFound, EntryNotFound).

The files are read from disk at each request, so replacing one changes what is served (and its ETag,
made from its size and modification time). Faults can be injected into the data requests (ranged GETs
past the first 64 KiB, i.e. tensor data rather than safetensors headers): dropped connections
mid-body, truncated bodies, HTTP 503 / 429 (with Retry-After), slow responses, stalls, a file replaced
after some requests. `rate` limits each connection to that many bytes per second (benchmarks).

    with HubServer({"org/name": Path("model_dir")}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

HEADER_ZONE = 64 << 10  # ranges starting below this are safetensors headers: never faulted


@dataclass
class Fault:
    kind: str  # drop | truncate | 503 | 429 | slow | stall | replace
    count: int = 1  # requests it applies to
    after: int = 0  # data requests to let through first
    seconds: float = 0.0  # slow / stall: delay; 429: Retry-After
    match: str = ".safetensors"  # substring of the file path
    action: object = None  # replace: called (once) with the file path before the response


class HubServer:
    def __init__(self, repos: dict[str, Path], commit: str = "0123456789abcdef0123456789abcdef01234567",
                 rate: float | None = None, token: str | None = None):
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.commit = commit
        self.rate = rate  # bytes per second per connection
        self.token = token  # required Bearer token, if any
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.data_requests = 0
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, range)
        self.bytes_sent = 0
        self.transfers: list[tuple[float, float]] = []  # (start, end) of each safetensors body sent
        self.open_connections = 0
        self.peak_connections = 0
        self.httpd = None

    # -- control -----------------------------------------------------------------------------------
    def busy_seconds(self) -> float:
        """How long at least one safetensors body was being sent (the union of the transfers)."""
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self.transfers):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total

    def inject(self, kind: str, **kw) -> Fault:
        fault = Fault(kind, **kw)
        with self.lock:
            self.faults.append(fault)
        return fault

    def _fault_for(self, path: str) -> Fault | None:
        with self.lock:
            self.data_requests += 1
            for f in self.faults:
                if f.count > 0 and f.match in path:
                    if f.after > 0:
                        f.after -= 1
                        continue
                    f.count -= 1
                    return f
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- content -----------------------------------------------------------------------------------
    def files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    @staticmethod
    def etag(path: Path) -> str:
        st = path.stat()
        return hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.hub.lock:
            self.hub.open_connections += 1
            self.hub.peak_connections = max(self.hub.peak_connections, self.hub.open_connections)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.hub.lock:
                self.hub.open_connections -= 1

    def _error(self, status: int, code: str | None = None, message: str = "") -> None:
        body = json.dumps({"error": message or code or str(status)}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message or code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorised(self) -> bool:
        if self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}":
            return True
        self._error(401, "RepoNotFound", "Repository not found")
        return False

    def _repo(self, repo: str, rev: str) -> bool:
        if repo not in self.hub.repos:
            self._error(404, "RepoNotFound", "Repository not found")
            return False
        if rev not in ("main", self.hub.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return False
        return True

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub.lock:
            self.hub.requests.append((self.command, path, self.headers.get("Range")))
        if not self._authorised():
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            repo, rev = m.group(1), m.group(2) or "main"
            if self._repo(repo, rev):
                info = {"id": repo, "modelId": repo, "sha": self.hub.commit, "private": self.hub.token is not None,
                        "siblings": [{"rfilename": f} for f in self.hub.files(repo)]}
                self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)/?(.*)", path)
        if m:  # the listing snapshot_download asks for (one page, all files)
            repo, rev, under = m.groups()
            if self._repo(repo, rev):
                root = self.hub.repos[repo]
                tree = [{"type": "file", "path": f, "size": (root / f).stat().st_size,
                         "oid": HubServer.etag(root / f)[:40]} for f in self.hub.files(repo) if f.startswith(under)]
                self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
            return
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m:
            self._error(404, None, "not found")
            return
        repo, rev, name = m.groups()
        if not self._repo(repo, rev):
            return
        file = self.hub.repos[repo] / name
        if ".." in Path(name).parts or not file.is_file():
            self._error(404, "EntryNotFound", f"{name} does not exist")
            return
        self._file(file, name)

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _file(self, file: Path, name: str) -> None:
        size = file.stat().st_size
        headers = {"X-Repo-Commit": self.hub.commit, "ETag": f'"{HubServer.etag(file)}"', "Accept-Ranges": "bytes"}
        want = self.headers.get("Range")
        start, end = 0, size  # end exclusive
        if want:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", want.strip())
            if not m:
                self._error(416, None, "bad range")
                return
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            if start >= size or end <= start:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        fault = self._fault_for(name) if self.command == "GET" and want and start >= HEADER_ZONE else None
        if fault is not None and fault.kind == "replace":
            fault.action(file)
            fault = None
            size = file.stat().st_size
            headers["ETag"] = f'"{HubServer.etag(file)}"'
            end = min(end, size)
        if fault is not None and fault.kind in ("503", "429"):
            extra = {"Retry-After": f"{fault.seconds:g}"} if fault.kind == "429" else {}
            self._send(int(fault.kind), b"busy", {**extra, "Content-Type": "text/plain"})
            return
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.seconds)
        with open(file, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        self.send_response(206 if want else 200)
        for k, v in headers.items():
            self.send_header(k, v)
        if want:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault is not None and fault.kind in ("drop", "truncate", "stall"):
            cut = len(body) // 2
            self._write(body[:cut])
            if fault.kind == "stall":
                time.sleep(fault.seconds)
            self.wfile.flush()
            self.close_connection = True
            if fault.kind == "drop":  # a reset, not a clean end
                try:
                    import socket
                    import struct
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            return
        began = time.perf_counter()
        self._write(body)
        if name.endswith(".safetensors"):
            with self.hub.lock:
                self.hub.transfers.append((began, time.perf_counter()))

    def _fault_for(self, name: str) -> Fault | None:
        return self.hub._fault_for(name)

    def _write(self, body: bytes) -> None:
        rate = self.hub.rate
        if not rate:
            self.wfile.write(body)
            with self.hub.lock:
                self.hub.bytes_sent += len(body)
            return
        step = max(1, int(rate / 50))  # 20 ms slices
        began = time.perf_counter()
        sent = 0
        view = memoryview(body)
        while sent < len(body):
            n = min(step, len(body) - sent)
            self.wfile.write(view[sent:sent + n])
            sent += n
            with self.hub.lock:
                self.hub.bytes_sent += n
            ahead = sent / rate - (time.perf_counter() - began)
            if ahead > 0:
                time.sleep(ahead)


def main() -> None:  # serve directories by hand: python scripts/hub_server.py org/name=DIR ...
    import sys
    repos = dict(arg.split("=", 1) for arg in sys.argv[1:])
    with HubServer(repos) as hub:
        print(f"HF_ENDPOINT={hub.url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
