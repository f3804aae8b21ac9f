"""Servers on loopback for the STAC API tests: a real STAC API (stac-fastapi-geoparquet under
uvicorn, in a subprocess) over the sample catalog, a static file server that answers HTTP
range requests (python's http.server does not) with fault injection, a proxy that fails its
first requests, and a port that accepts connections and never answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    status: int


@dataclass
class FileServerState:
    root: Path
    # path -> statuses to answer (in order) before serving it
    faults: dict[str, list[int]] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests_for(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.log if r.path == path]


class RangeFileHandler(BaseHTTPRequestHandler):
    """GET and HEAD of files under the server's root, with ``Range: bytes=a-b`` (206) support.
    A path may start with ``/_n/<token>/``, which is dropped: the same file under a fresh URL,
    out of GDAL's per-process cache of what it fetched."""

    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    @property
    def state(self) -> FileServerState:
        return self.server.state  # type: ignore[attr-defined,no-any-return]

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _finish(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        with self.state.lock:
            self.state.log.append(Request(self.command, self.path, self.headers.get("Range"), status))

    def _serve(self) -> None:
        url_path = self.path.split("?", 1)[0]
        with self.state.lock:
            pending = self.state.faults.get(url_path)
            fault = pending.pop(0) if pending else None
        if fault is not None:
            self._finish(fault, b"injected fault", {"Content-Type": "text/plain"})
            return
        rel = url_path.lstrip("/")
        if rel.startswith("_n/"):
            rel = rel.split("/", 2)[2]
        path = (self.state.root / rel).resolve()
        if self.state.root not in path.parents or not path.is_file():
            self._finish(404, b"not found", {"Content-Type": "text/plain"})
            return
        data = path.read_bytes()
        size = len(data)
        spec = self.headers.get("Range")
        base = {"Content-Type": "image/tiff", "Accept-Ranges": "bytes"}
        if spec is None:
            self._finish(200, data, base)
            return
        try:
            unit, _, span = spec.partition("=")
            first, _, last = span.partition("-")
            start = int(first) if first else size - int(last)
            end = min(int(last), size - 1) if first and last else size - 1
            if unit.strip() != "bytes" or "," in span or start < 0 or start > end:
                raise ValueError(spec)
        except ValueError:
            self._finish(416, b"", {"Content-Range": f"bytes */{size}"})
            return
        self._finish(206, data[start : end + 1], {**base, "Content-Range": f"bytes {start}-{end}/{size}"})

    do_GET = _serve
    do_HEAD = _serve


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], state: Any) -> Iterator[str]:
    """``handler`` on a free loopback port in a thread, ``state`` as ``server.state``; yields the
    base URL and stops the server at the end."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def range_file_server(root: Path) -> Iterator[tuple[str, FileServerState]]:
    """Serves ``root`` at ``http://127.0.0.1:<port>``; yields (base URL, state)."""
    state = FileServerState(root.resolve())
    with serving(RangeFileHandler, state) as url:
        yield url, state


def write_items_geoparquet(sample_root: Path, cog_base_url: str, out: Path,
                           collection: str = "sentinel-2-l2a") -> int:
    """The sample catalog's items as stac-geoparquet, their asset hrefs rewritten to URLs under
    ``cog_base_url`` (the file server serving ``sample_root``). Returns the item count."""
    import rustac

    items = []
    for item_path in sorted((sample_root / collection).glob("*/*.json")):
        item = json.loads(item_path.read_text())
        for asset in item["assets"].values():
            local = (item_path.parent / asset["href"]).resolve()
            asset["href"] = f"{cog_base_url}/{local.relative_to(sample_root.resolve()).as_posix()}"
        item["collection"] = collection
        item["links"] = []
        items.append(item)
    rustac.write_sync(str(out), items)
    return len(items)


@contextmanager
def stac_api_server(geoparquet: Path, log_path: Path, startup_s: float = 60.0) -> Iterator[str]:
    """stac-fastapi-geoparquet serving ``geoparquet`` under uvicorn in a subprocess, on a free
    loopback port; yields its URL once it answers."""
    port = free_port()
    env = {**os.environ, "STAC_FASTAPI_GEOPARQUET_HREF": str(geoparquet)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "stac_api_app:create_app",
             "--app-dir", str(APP_DIR), "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning", "--no-access-log"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the STAC API server exited with {proc.returncode}:\n{log_path.read_text()}"
                )
            try:
                with urllib.request.urlopen(f"{url}/conformance", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the STAC API server did not answer in {startup_s:.0f} s:\n"
                                   f"{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class ProxyState:
    upstream: str
    failures_left: int
    answered: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FlakyProxyHandler(BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures_left`` requests, then forwards to the upstream."""

    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _relay(self) -> None:
        state: ProxyState = self.server.state  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with state.lock:
            fail = state.failures_left > 0
            state.failures_left -= int(fail)
        if fail:
            status, payload, ctype = 503, b'{"detail": "injected 503"}', "application/json"
        else:
            req = urllib.request.Request(
                state.upstream + self.path, data=body or None, method=self.command,
                headers={"Content-Type": self.headers.get("Content-Type", "application/json")},
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    status, payload = resp.status, resp.read()
                    ctype = resp.headers.get("Content-Type", "application/json")
            except urllib.error.HTTPError as exc:
                status, payload = exc.code, exc.read()
                ctype = exc.headers.get("Content-Type", "application/json")
        with state.lock:
            state.answered.append(status)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = _relay
    do_POST = _relay


@contextmanager
def flaky_proxy(upstream: str, failures: int) -> Iterator[tuple[str, ProxyState]]:
    state = ProxyState(upstream, failures)
    with serving(FlakyProxyHandler, state) as url:
        yield url, state


@contextmanager
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A port that accepts connections and never answers; yields (URL, accepted sockets)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in accepted:
            conn.close()
        listener.close()
