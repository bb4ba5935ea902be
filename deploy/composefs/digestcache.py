"""Digests of files already read, so re-committing an unchanged tree reads nothing.

A file's digest is remembered under its stat identity (st_dev, st_ino, st_size,
st_mtime_ns, st_ctime_ns).  Why that is enough: any change to a file's content
sets its ctime to the current time, and no system call sets ctime to a chosen
value (mtime can be set, so it is not trusted alone); a file deleted and another
created in its inode gets a new ctime too.  One hole remains: a change within
the same ctime tick as the state that was read looks unchanged (git's "racily
clean" problem).  So a digest is recorded only for files whose ctime is older
than the scan's start by more than the coarsest timestamp granularity of Linux
filesystems (2 s); files touched just before a scan are simply read again next
time.  The cache is a hint: the caller also requires the object to exist before
using a digest from it, and a damaged or foreign cache file counts as empty.
"""

from __future__ import annotations

import os
import struct
import time

from ..util.fsutil import atomic_write_bytes
from .fsverity import Digest

_MAGIC = b"cfsdeploy digest cache 1\n"
_KEY = struct.Struct("<QQQqq")  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns
_DIGEST = 32
_RECORD = _KEY.size + _DIGEST
# Files whose ctime is this close to the scan's start may still change unseen.
SETTLE_NS = 2_000_000_000


def _key(st: os.stat_result) -> bytes:
    return _KEY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class DigestCache:
    def __init__(self, entries: dict[bytes, bytes] | None = None) -> None:
        self._old = entries or {}
        self._new: dict[bytes, bytes] = {}
        self._settled_before = time.time_ns() - SETTLE_NS

    @classmethod
    def load(cls, path: str) -> DigestCache:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return cls()
        if not data.startswith(_MAGIC) or (len(data) - len(_MAGIC)) % _RECORD:
            return cls()
        k = _KEY.size
        return cls({data[i:i + k]: data[i + k:i + _RECORD]
                    for i in range(len(_MAGIC), len(data), _RECORD)})

    def get(self, st: os.stat_result) -> Digest | None:
        """The digest recorded for this exact file state, if any; a hit is kept for
        the next save."""
        key = _key(st)
        digest = self._old.get(key)
        if digest is None:
            return None
        self._new[key] = digest
        return Digest(digest)

    def put(self, st: os.stat_result, digest: bytes) -> None:
        """Remember a digest just computed for the file in state `st` (if settled)."""
        if st.st_ctime_ns < self._settled_before:
            self._new[_key(st)] = digest

    def save(self, path: str) -> None:
        """Write the entries got or put since load (so it holds the last tree
        scanned), unless they are what was loaded."""
        if self._new == self._old:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, _MAGIC + b"".join(k + d for k, d in self._new.items()))
