"""The transport under pull: bounded GETs over kept-alive HTTP connections, or local reads."""

from __future__ import annotations

import gzip
import os

import pytest

from cfsdeploy.remote.transport import Limits, NotFoundError, TransportError, open_transport

from .hostile import HostileServer


@pytest.fixture
def server(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "file").write_bytes(bytes(range(256)) * 100)
    s = HostileServer(tmp_path)
    yield s
    s.close()


DATA = bytes(range(256)) * 100
LIMITS = Limits(timeout=2, retries=0)


def test_one_thread_reuses_one_connection(server) -> None:
    t = open_transport(server.url, LIMITS)
    for _ in range(20):
        assert t.get("dir/file", limit=len(DATA)) == DATA
    t.close()
    assert server.connections == 1 and t.stats.requests == 20


def test_a_kept_alive_connection_the_server_closed_is_reopened(server) -> None:
    t = open_transport(server.url, LIMITS)
    t.get("dir/file", limit=len(DATA))
    server.hooks["/dir/other"] = lambda h, data: (h.send(200, b"bye"), setattr(h, "close_connection", True))
    assert t.get("dir/other", limit=10) == b"bye"
    assert t.get("dir/file", limit=len(DATA)) == DATA
    assert server.connections == 2


def test_gzip_responses_are_decoded_and_counted_compressed(server) -> None:
    packed = gzip.compress(DATA)
    server.hooks["/dir/file"] = lambda h, data: h.send(200, packed, {"Content-Encoding": "gzip"})
    t = open_transport(server.url, LIMITS)
    assert t.get("dir/file", limit=len(DATA)) == DATA
    assert t.stats.wire_bytes == len(packed)
    assert server.log[-1][2] == "gzip"


def test_unknown_content_encodings_are_refused(server) -> None:
    server.hooks["/dir/file"] = lambda h, data: h.send(200, data, {"Content-Encoding": "br"})
    with pytest.raises(TransportError, match="unsupported Content-Encoding 'br'"):
        open_transport(server.url, LIMITS).get("dir/file", limit=len(DATA))


def test_a_server_ignoring_the_range_still_gives_the_rest(server) -> None:
    server.hooks["/dir/file"] = lambda h, data: h.send(200, data)
    out = bytearray()
    open_transport(server.url, LIMITS).fetch("dir/file", out.extend, limit=len(DATA), offset=1000)
    assert out == DATA[1000:]


def test_a_range_answer_for_another_range_is_refused(server) -> None:
    server.hooks["/dir/file"] = lambda h, data: h.send(206, data[5:], {"Content-Range": f"bytes 5-{len(data) - 1}/*"})
    with pytest.raises(TransportError, match="range other than"):
        open_transport(server.url, LIMITS).fetch("dir/file", lambda b: None, limit=len(DATA), offset=1000)


def test_a_declared_length_over_the_limit_is_refused_before_reading(server) -> None:
    with pytest.raises(TransportError, match="larger than the 100 bytes expected"):
        open_transport(server.url, LIMITS).get("dir/file", limit=100)


def test_redirects_are_followed(server) -> None:
    server.hooks["/moved"] = lambda h, data: h.send(301, b"<html>moved</html>" * 100, {"Location": "/dir/file"})
    t = open_transport(server.url, LIMITS)
    assert t.get("moved", limit=len(DATA)) == DATA
    assert t.get("moved", limit=len(DATA)) == DATA


def test_redirects_to_other_schemes_are_refused(server) -> None:
    server.hooks["/moved"] = lambda h, data: h.send(302, b"", {"Location": "file:///etc/shadow"})
    with pytest.raises(TransportError, match="unsupported URL"):
        open_transport(server.url, LIMITS).get("moved", limit=100)


def test_file_transport_reads_from_an_offset(tmp_path) -> None:
    (tmp_path / "f").write_bytes(DATA)
    out = bytearray()
    t = open_transport(f"file://{tmp_path}", LIMITS)
    t.fetch("f", out.extend, limit=len(DATA), offset=10)
    assert out == DATA[10:] and t.stats.wire_bytes == len(DATA) - 10


def test_file_transport_refuses_what_is_not_a_regular_file(tmp_path) -> None:
    os.mkfifo(tmp_path / "fifo")
    t = open_transport(f"file://{tmp_path}", LIMITS)
    with pytest.raises(TransportError, match="not a regular file"):
        t.get("fifo", limit=10)
    with pytest.raises(NotFoundError):
        t.get("absent", limit=10)
    with pytest.raises(TransportError, match="larger than"):
        (tmp_path / "big").write_bytes(b"x" * 11)
        t.get("big", limit=10)
