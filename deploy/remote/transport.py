"""Getting files from a remote repository: HTTP(S) GETs or local reads, bounded.

The server is not trusted: every response is capped in size (after decompression),
every wait on the network in time (a timeout per read, a lowest transfer rate, an
optional deadline for everything), redirects are limited, and what arrives is
handed to the caller as it comes, for the caller to verify.  HTTP responses may be
gzip-compressed (Content-Encoding); the bytes as received are what `Stats` counts.
Each thread keeps its own keep-alive connection per server.
"""

from __future__ import annotations

import errno
import http.client
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from .. import __version__
from ..util import errors
from ..util.errors import CfsError

Sink = Callable[[bytes], object]

_CHUNK = 1 << 18
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})


class TransportError(CfsError):
    pass


class NotFoundError(TransportError, errors.NotFoundError):
    pass


class _Retryable(TransportError):
    """A failure a second attempt may not meet (network trouble, a server error)."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 30.0              # seconds a connect or a read may wait
    total: float | None = None         # seconds for everything this transport does
    low_speed_limit: int = 1000        # bytes/s a transfer must keep up...
    low_speed_time: float = 30.0       # ...over this many seconds (as curl and ostree)
    max_redirects: int = 5
    retries: int = 2                   # further attempts after network or server errors


class Stats:
    """Bytes and requests as they went over the wire, counted across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.wire_bytes = 0
        self.requests = 0

    def add(self, wire: int = 0, requests: int = 0) -> None:
        with self._lock:
            self.wire_bytes += wire
            self.requests += requests


class Transport:
    """Reads files below a base URL.  fetch() hands the bytes of `path` from
    `offset` on to `sink` and raises TransportError (NotFoundError for a missing
    file) if the file is larger than `limit` or anything else goes wrong."""

    def __init__(self, url: str, limits: Limits) -> None:
        self.url = url.rstrip("/")
        self.limits = limits
        self.stats = Stats()
        self.deadline = None if limits.total is None else time.monotonic() + limits.total

    def fetch(self, path: str, sink: Sink, *, limit: int, offset: int = 0, compress: bool = True) -> None:
        raise NotImplementedError

    def get(self, path: str, *, limit: int, compress: bool = True) -> bytes:
        out = bytearray()
        self.fetch(path, out.extend, limit=limit, compress=compress)
        return bytes(out)

    def close(self) -> None:
        pass

    def _failure(self, what: str, e: BaseException) -> TransportError:
        """The error for a failed network operation: final once the deadline passed."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return TransportError(f"{what}: gave up after {self.limits.total:g} s (the time limit)")
        if isinstance(e, ssl.SSLCertVerificationError):
            return TransportError(f"{what}: TLS certificate not trusted: {e.verify_message}")
        return _Retryable(f"{what}: {_reason(e)}")

    def _remaining(self, what: str) -> float:
        """Seconds a wait may last now: the read timeout, or less near the deadline."""
        if self.deadline is None:
            return self.limits.timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TransportError(f"{what}: gave up after {self.limits.total:g} s (the time limit)")
        return min(self.limits.timeout, left)


def open_transport(url: str, limits: Limits | None = None) -> Transport:
    limits = limits or Limits()
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "file":
        return FileTransport(url, limits)
    if scheme in ("http", "https"):
        return HttpTransport(url, limits)
    raise TransportError(f"unsupported URL {url!r}")


class _Receiver:
    """Decodes, bounds and forwards one response body; skips what precedes `skip`."""

    def __init__(self, what: str, sink: Sink, limit: int, start: int, skip: int, gzip: bool) -> None:
        self.what = what
        self.sink = sink
        self.limit = limit
        self.pos = start          # offset in the file of the next decoded byte
        self.skip = skip          # deliver nothing before this offset
        self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None

    def feed(self, data: bytes) -> None:
        if self.inflate is None:
            self._emit(data)
            return
        try:
            # Bounded steps: a small compressed body may inflate to anything.
            self._emit(self.inflate.decompress(data, _CHUNK))
            while self.inflate.unconsumed_tail:
                self._emit(self.inflate.decompress(self.inflate.unconsumed_tail, _CHUNK))
        except zlib.error as e:
            raise TransportError(f"{self.what}: corrupt gzip data ({e})") from None
        if self.inflate.unused_data:
            raise TransportError(f"{self.what}: data after the end of the gzip stream")

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        end = self.pos + len(data)
        if end > self.limit:
            raise TransportError(f"{self.what}: larger than the {self.limit} bytes expected")
        if end > self.skip:
            self.sink(data[max(0, self.skip - self.pos):])
        self.pos = end

    def finish(self) -> None:
        if self.inflate is not None and not self.inflate.eof:
            raise _Retryable(f"{self.what}: the compressed response ended early")


class _Pace:
    """Fails a transfer that stays below the lowest rate for the whole window."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.start = time.monotonic()
        self.count = 0

    def add(self, what: str, n: int) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.start >= self.limits.low_speed_time:
            if self.count < self.limits.low_speed_limit * (now - self.start):
                raise _Retryable(f"{what}: slower than {self.limits.low_speed_limit} bytes/s "
                                 f"for {self.limits.low_speed_time:g} s")
            self.start, self.count = now, 0


class FileTransport(Transport):
    def __init__(self, url: str, limits: Limits) -> None:
        super().__init__(url, limits)
        self.root = urllib.parse.unquote(urllib.parse.urlsplit(url).path)

    def fetch(self, path: str, sink: Sink, *, limit: int, offset: int = 0, compress: bool = True) -> None:
        name = os.path.join(self.root, path)
        self.stats.add(requests=1)
        try:
            # O_NONBLOCK: a FIFO planted in a served tree must not hang the open.
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NotFoundError(f"{name}: not found") from None
        except OSError as e:
            raise TransportError(f"{name}: {e.strerror}") from None
        with os.fdopen(fd, "rb", buffering=0) as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TransportError(f"{name}: not a regular file")
            if st.st_size > limit:
                raise TransportError(f"{name}: larger than the {limit} bytes expected")
            receiver = _Receiver(name, sink, limit, offset, offset, gzip=False)
            f.seek(offset)
            while chunk := f.read(_CHUNK):
                self._remaining(name)
                self.stats.add(wire=len(chunk))
                receiver.feed(chunk)


class HttpTransport(Transport):
    def __init__(self, url: str, limits: Limits) -> None:
        super().__init__(url, limits)
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._all_lock = threading.Lock()
        self._tls = ssl.create_default_context()

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

    def _connection(self, parts: urllib.parse.SplitResult) -> http.client.HTTPConnection:
        pool: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__.setdefault("pool", {})
        key = (parts.scheme, parts.netloc)
        conn = pool.get(key)
        if conn is None:
            host, port = parts.hostname or "", parts.port
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(host, port, timeout=self.limits.timeout, context=self._tls)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.limits.timeout)
            pool[key] = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def fetch(self, path: str, sink: Sink, *, limit: int, offset: int = 0, compress: bool = True) -> None:
        url = f"{self.url}/{urllib.parse.quote(path)}"
        got = [offset]  # where the next delivered byte is, across attempts

        def deliver(data: bytes) -> None:
            sink(data)
            got[0] += len(data)

        for attempt in range(self.limits.retries + 1):
            try:
                return self._get(url, deliver, limit, got[0], compress)
            except _Retryable as e:
                if attempt == self.limits.retries:
                    raise TransportError(str(e)) from None
                time.sleep(min(0.25 * 2 ** attempt, 2.0))

    def _get(self, url: str, sink: Sink, limit: int, offset: int, compress: bool) -> None:
        for _ in range(self.limits.max_redirects + 1):
            location = self._request(url, sink, limit, offset, compress)
            if location is None:
                return
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise TransportError(f"{url}: redirect to an unsupported URL")
        raise TransportError(f"{url}: more than {self.limits.max_redirects} redirects")

    def _request(self, url: str, sink: Sink, limit: int, offset: int, compress: bool) -> str | None:
        """One GET; returns the redirect's Location, or None when the body was delivered."""
        parts = urllib.parse.urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": f"cfsdeploy/{__version__}",
                   # A resumed transfer continues the decoded bytes: no compression then.
                   "Accept-Encoding": "gzip" if compress and offset == 0 else "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        conn = self._connection(parts)
        for reuse in (conn.sock is not None, False):
            try:
                conn.timeout = self._remaining(url)
                conn.request("GET", target, headers=headers)
                self.stats.add(requests=1)
                sock = conn.sock  # the response reads from it, even once conn lets go of it
                resp = conn.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if not reuse:  # a kept-alive connection the server has since closed: once more
                    raise self._failure(url, e) from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise self._failure(url, e) from None
        try:
            location = self._response(url, resp, sock, sink, limit, offset)
        except BaseException:
            conn.close()
            raise
        finally:
            resp.close()
        if location is not None:
            conn.close()  # the redirect's body was not read: the connection can carry nothing more
        return location

    def _response(self, url: str, resp: http.client.HTTPResponse, sock: socket.socket, sink: Sink,
                  limit: int, offset: int) -> str | None:
        status = resp.status
        if status in _REDIRECT_STATUS:
            location = resp.getheader("Location")
            if not location:
                raise TransportError(f"{url}: HTTP {status} without a Location")
            return location
        if status in (404, 410):
            raise NotFoundError(f"{url}: HTTP {status} {resp.reason}")
        if status in _RETRY_STATUS:
            raise _Retryable(f"{url}: HTTP {status} {resp.reason}")
        start = 0
        if status == 206:
            start = _range_start(resp.getheader("Content-Range", ""))
            if start != offset:
                raise TransportError(f"{url}: the server sent a range other than the one asked for")
        elif status != 200:
            raise TransportError(f"{url}: HTTP {status} {resp.reason}")
        encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip"):
            raise TransportError(f"{url}: unsupported Content-Encoding {encoding!r}")
        length = resp.getheader("Content-Length")
        if encoding == "identity" and length is not None and length.isdigit() and start + int(length) > limit:
            raise TransportError(f"{url}: larger than the {limit} bytes expected")
        receiver = _Receiver(url, sink, limit, start, offset, gzip=encoding != "identity")
        pace = _Pace(self.limits)
        while True:
            sock.settimeout(self._remaining(url))
            try:
                # read1: whatever one system call brings, so slow servers are noticed.
                chunk = resp.read1(_CHUNK)
            except http.client.IncompleteRead:
                raise _Retryable(f"{url}: the response ended early (truncated)") from None
            except (OSError, http.client.HTTPException) as e:
                raise self._failure(url, e) from None
            if not chunk:
                if resp.length:  # Content-Length promised more
                    raise _Retryable(f"{url}: the response ended early (truncated)")
                break
            self.stats.add(wire=len(chunk))
            pace.add(url, len(chunk))
            receiver.feed(chunk)
        receiver.finish()
        return None


def _range_start(content_range: str) -> int:
    unit, _, rest = content_range.strip().partition(" ")
    first = rest.split("-", 1)[0]
    return int(first) if unit == "bytes" and first.isdigit() else -1


def _reason(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out waiting for the server"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection"
    if isinstance(e, OSError) and e.errno is not None:
        return f"{e.strerror or errno.errorcode.get(e.errno, e.errno)}"
    return str(e) or type(e).__name__
