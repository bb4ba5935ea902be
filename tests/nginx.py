"""A real nginx serving a directory on 127.0.0.1, started and stopped by tests and benchmarks.

Its own configuration, pid, logs and temp paths live in a work directory; it runs
in the foreground (`daemon off`) as a child of this process.  The access log has
one line per request: URI, status, bytes sent (headers included), body bytes, the
Range asked for and the Content-Encoding answered.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CONFIG = """\
daemon off;
worker_processes 2;
{user}
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format cfs '$request_uri $status $bytes_sent $body_bytes_sent "$http_range" "$sent_http_content_encoding"';
    access_log {work}/access.log cfs;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
{compression}
    server {{
        listen 127.0.0.1:{port}{tls};
        root {root};
        location / {{ }}
    }}
}}
"""

# Compression settings by name: what the pull tests and benchmarks compare.
COMPRESSION = {
    "off": "    gzip off;",
    "gzip": "    gzip on;\n    gzip_types *;\n    gzip_min_length 256;\n    gzip_comp_level {level};",
    "static": "    gzip_static on;",
}


@dataclass(frozen=True)
class Request:
    uri: str
    status: int
    bytes_sent: int
    body_bytes: int
    range: str
    encoding: str


def missing_reason() -> str | None:
    """Why nginx cannot run here, or None."""
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        return "nginx is not installed (Debian package nginx-light)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, root: Path, work: Path, *, compression: str = "gzip", level: int = 1,
                 tls: tuple[Path, Path] | None = None) -> None:
        """tls: (certificate, key) files to serve HTTPS instead of HTTP."""
        self.root = Path(root).absolute()
        self.work = Path(work).absolute()
        self.port = _free_port()
        self.scheme = "https" if tls else "http"
        self.work.mkdir(parents=True, exist_ok=True)
        config = CONFIG.format(user="user root root;" if os.geteuid() == 0 else "", work=self.work,
                               port=self.port, root=self.root,
                               tls=f" ssl;\n        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]}"
                               if tls else "",
                               compression=COMPRESSION[compression].format(level=level))
        (self.work / "nginx.conf").write_text(config)
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen([binary, "-p", str(self.work), "-e", str(self.work / "error.log"),
                                      "-c", str(self.work / "nginx.conf")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx did not start: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("nginx did not start listening within 10 s") from None
                time.sleep(0.05)

    def url(self, path: str = "") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def requests(self) -> list[Request]:
        """The requests logged so far (nginx logs each as it ends: wait until it settles)."""
        log = self.work / "access.log"
        text = None
        for _ in range(20):
            time.sleep(0.05)
            now = log.read_text() if log.exists() else ""
            if now == text:
                break
            text = now
        out = []
        for line in (text or "").splitlines():
            uri, status, sent, body, rest = line.split(" ", 4)
            rng, enc = (field.strip('"') for field in rest.rsplit(" ", 1))
            out.append(Request(uri, int(status), int(sent), int(body), "" if rng == "-" else rng,
                               "" if enc == "-" else enc))
        return out

    def clear_log(self) -> None:
        (self.work / "access.log").write_text("")
        # nginx keeps its file open and appends: truncating in place keeps it logging.

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finishes requests in flight
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
