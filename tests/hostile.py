"""A small HTTP server on 127.0.0.1, in a thread, that serves a directory and
misbehaves on the paths it is told to: wrong bytes, short bodies, endless or
stalled responses, errors, redirects."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

Hook = Callable[["Handler", bytes], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.owner.connections += 1

    def do_GET(self) -> None:
        owner = self.server.owner
        with owner.lock:
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
        try:
            self.serve()
        finally:
            with owner.lock:
                owner.in_flight -= 1

    def serve(self) -> None:
        path = self.path.split("?")[0]
        self.server.owner.log.append((path, self.headers.get("Range"), self.headers.get("Accept-Encoding")))
        file = self.server.owner.root / path.lstrip("/")
        data = file.read_bytes() if file.is_file() else None
        hook = self.server.owner.hook_for(path)
        if self.server.owner.delay:
            time.sleep(self.server.owner.delay)
        try:
            if hook is not None:
                hook(self, data if data is not None else b"")
            elif data is None:
                self.send(404, b"not found")
            else:
                self.send_file(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_file(self, data: bytes) -> None:
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
            self.send(206, data[start:], {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        else:
            self.send(200, data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: HostileServer

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up on a misbehaving server is the point, not news


class HostileServer:
    """Serves `root`; `hooks` maps a path (or a path ending, with '*' in front) to a hook."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.hooks: dict[str, Hook] = {}
        self.delay = 0.0
        self.connections = 0
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.log: list[tuple[str, str | None, str | None]] = []
        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def hook_for(self, path: str) -> Hook | None:
        for pattern, hook in self.hooks.items():
            if pattern == path or (pattern.startswith("*") and path.endswith(pattern[1:])):
                return hook
        return None

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- misbehaviours -----------------------------------------------------------------


def wrong_bytes(h: Handler, data: bytes) -> None:
    h.send(200, bytes(b ^ 0x55 for b in data))


def truncated(h: Handler, data: bytes) -> None:
    """Promises the whole file, sends half, hangs up."""
    h.send_response(200)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data[:len(data) // 2])
    h.wfile.flush()
    h.close_connection = True


def endless(h: Handler, data: bytes) -> None:
    """A body that never ends (no length: it runs until the connection closes)."""
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()
    h.close_connection = True
    chunk = b"x" * 65536
    while True:
        h.wfile.write(chunk)


def dribble(h: Handler, data: bytes) -> None:
    """A byte now and then, forever: never idle long enough for a read timeout."""
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()
    h.close_connection = True
    while True:
        h.wfile.write(b"x")
        h.wfile.flush()
        time.sleep(0.2)


def stall_midway(h: Handler, data: bytes) -> None:
    """Sends half the file, then nothing for a minute."""
    h.send_response(200)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data[:len(data) // 2])
    h.wfile.flush()
    time.sleep(60)


def status(code: int) -> Hook:
    def hook(h: Handler, data: bytes) -> None:
        h.send(code, b"error")
    return hook


def redirect_to_itself(h: Handler, data: bytes) -> None:
    h.send(302, b"", {"Location": h.path})
