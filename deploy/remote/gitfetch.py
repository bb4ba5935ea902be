"""The client side of git's "dumb HTTP" protocol: refs and objects by plain GETs.

A loose object `git/objects/XX/YYYY...` is zlib-deflated "<type> <size>\\0<data>";
its name is the SHA-1 of the inflated bytes, which is checked before anything
uses it.  Objects that only exist in packs (after a `git gc` on the server) are
found through git/objects/info/packs and each pack's index; a pack is checked by
`git index-pack --strict`, which computes every object's id from its content,
before it joins the local repository.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass

import pygit2

from ..util.errors import IntegrityError
from ..util.fsutil import fsync_dir
from ..util.run import run
from .transport import NotFoundError, Transport

TYPES = {"commit": pygit2.enums.ObjectType.COMMIT, "tree": pygit2.enums.ObjectType.TREE,
         "blob": pygit2.enums.ObjectType.BLOB, "tag": pygit2.enums.ObjectType.TAG}
_OID = re.compile(r"[0-9a-f]{40}")
_PACK = re.compile(r"pack-[0-9a-f]{40}\.pack")


class GitObjectError(IntegrityError):
    """A git object from the server is malformed or not what its name says."""


def check_oid(oid: str) -> str:
    if not _OID.fullmatch(oid):
        raise GitObjectError(f"invalid object id {oid[:60]!r}")
    return oid


def parse_info_refs(data: bytes) -> dict[str, str]:
    """{ref: id} from git/info/refs ("<id>\\t<ref>" lines; peeled "^{}" lines skipped)."""
    refs = {}
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        oid, tab, name = line.partition("\t")
        if not tab or not _OID.fullmatch(oid) or not name:
            raise GitObjectError(f"info/refs line {n}: expected '<id>\\t<ref>'")
        if not name.endswith("^{}"):
            refs[name] = oid
    return refs


def inflate_loose(oid: str, raw: bytes, limit: int) -> tuple[str, bytes]:
    """(type, data) of a loose object file, checked against its id and the size limit."""
    d = zlib.decompressobj()
    try:
        full = d.decompress(raw, limit + 64)
    except zlib.error as e:
        raise GitObjectError(f"object {oid}: corrupt zlib data ({e})") from None
    if d.unconsumed_tail:
        raise GitObjectError(f"object {oid}: larger than {limit} bytes")
    if not d.eof:
        raise GitObjectError(f"object {oid}: truncated")
    header, nul, data = full.partition(b"\0")
    kind, _, size = header.decode("ascii", "replace").partition(" ")
    if not nul or kind not in TYPES or not size.isdigit() or int(size) != len(data):
        raise GitObjectError(f"object {oid}: malformed header")
    if hashlib.sha1(full).hexdigest() != oid:
        raise GitObjectError(f"object {oid}: content does not match its id (corrupt or tampered)")
    return kind, data


@dataclass(frozen=True)
class RawCommit:
    """A git commit object as fetched: parsed, but nothing in it checked yet (the
    signature, binding and image are pull's to check).  Unlike CommitInfo, which
    describes a stored commit, it keeps the bytes a signature covers."""

    id: str
    tree: str
    parents: list[str]
    message: str
    time: int                 # the committer's timestamp
    signature: str | None     # the gpgsig header, armored
    signed_payload: bytes     # the commit without it: what the signature covers
    data: bytes               # the whole commit object's data


def parse_commit(oid: str, data: bytes) -> RawCommit:
    head, _, body = data.partition(b"\n\n")
    tree = None
    parents = []
    when = 0
    kept: list[bytes] = []
    sig: list[bytes] | None = None
    in_sig = False
    for line in head.split(b"\n"):
        if line.startswith(b" "):  # continuation of the header before
            if in_sig:
                sig.append(line[1:])  # type: ignore[union-attr]
                continue
        elif in_sig := line.startswith(b"gpgsig "):
            if sig is not None:
                raise GitObjectError(f"commit {oid}: more than one signature")
            sig = [line[7:]]
            continue
        elif line.startswith(b"tree "):
            if tree is not None or kept:
                raise GitObjectError(f"commit {oid}: the tree must come first, once")
            tree = line[5:].decode("ascii", "replace")
        elif line.startswith(b"parent "):
            parents.append(line[7:].decode("ascii", "replace"))
        elif line.startswith(b"committer "):
            # "committer Name <email> 1700000000 +0000"
            stamp = line.rsplit(b" ", 2)[-2:][0]
            when = int(stamp) if stamp.isdigit() else 0
        kept.append(line)
    if tree is None:
        raise GitObjectError(f"commit {oid}: no tree")
    for x in (tree, *parents):
        check_oid(x)
    return RawCommit(oid, tree, parents, body.decode("utf-8", "replace"), when,
                      None if sig is None else (b"\n".join(sig) + b"\n").decode("ascii", "replace"),
                      b"\n".join(kept) + b"\n\n" + body, data)


def parse_tree(oid: str, data: bytes) -> list[tuple[int, bytes, str]]:
    """(mode, name, id) of each entry of a tree object."""
    out = []
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        nul = data.find(b"\0", space + 1)
        if space < 0 or nul < 0 or nul + 21 > len(data):
            raise GitObjectError(f"tree {oid}: malformed")
        mode = data[pos:space]
        if not mode.isdigit():
            raise GitObjectError(f"tree {oid}: malformed mode")
        out.append((int(mode, 8), data[space + 1:nul], data[nul + 1:nul + 21].hex()))
        pos = nul + 21
    return out


class GitFetcher:
    """Reads git objects from the local repository, else from the server (checked)."""

    def __init__(self, git: pygit2.Repository, transport: Transport, tmpdir: str, *,
                 max_object: int, max_pack: int) -> None:
        self.git = git
        self.transport = transport
        self.tmpdir = tmpdir
        self.max_object = max_object
        self.max_pack = max_pack
        self.fetched = 0           # objects that came over the network
        self._packs: list[str] | None = None
        self._indexes: dict[str, set[str]] = {}

    def refs(self, limit: int) -> dict[str, str]:
        return parse_info_refs(self.transport.get("git/info/refs", limit=limit))

    def has(self, oid: str) -> bool:
        return oid in self.git

    def read(self, oid: str, kind: str) -> bytes:
        """The data of object oid, which must be of type kind."""
        check_oid(oid)
        if oid not in self.git:
            try:
                raw = self.transport.get(f"git/objects/{oid[:2]}/{oid[2:]}", limit=self.max_object,
                                         compress=False)  # already deflated
            except NotFoundError:
                self._install_pack_with(oid)
            else:
                got, data = inflate_loose(oid, raw, self.max_object)
                self.fetched += 1
                if got != kind:
                    raise GitObjectError(f"object {oid}: a {got}, not a {kind}")
                return data
        obj_type, data = self.git.odb.read(oid)
        if obj_type != TYPES[kind]:
            raise GitObjectError(f"object {oid}: not a {kind}")
        return data

    def write(self, kind: str, oid: str, data: bytes) -> None:
        """Store a checked object (libgit2 writes it to a temp file, fsyncs and renames it)."""
        if str(self.git.odb.write(TYPES[kind], data)) != oid:
            raise GitObjectError(f"object {oid}: stored under another id")  # parse_* were lax

    # --- packs ----------------------------------------------------------------------

    def _install_pack_with(self, oid: str) -> None:
        for pack in self._pack_names():
            if pack not in self._indexes:
                index = self.transport.get(f"git/objects/pack/{pack[:-5]}.idx", limit=self.max_pack)
                self._indexes[pack] = _index_ids(pack, index)
            if oid in self._indexes[pack]:
                self._packs.remove(pack)  # type: ignore[union-attr]  # installed now, once
                self._install_pack(pack)
                if oid in self.git:
                    return
                raise GitObjectError(f"object {oid}: not in {pack}, whose index lists it")
        raise NotFoundError(f"{self.transport.url}/git/objects/{oid[:2]}/{oid[2:]}: not found, "
                            "loose or in a pack")

    def _pack_names(self) -> list[str]:
        if self._packs is None:
            try:
                listing = self.transport.get("git/objects/info/packs", limit=1 << 20).decode("ascii", "replace")
            except NotFoundError:
                listing = ""
            self._packs = [line[2:] for line in listing.splitlines()
                           if line.startswith("P ") and _PACK.fullmatch(line[2:])]
        return self._packs

    def _install_pack(self, pack: str) -> None:
        work = tempfile.mkdtemp(prefix="pack-", dir=self.tmpdir)
        tmp_pack = os.path.join(work, "incoming.pack")
        with open(tmp_pack, "wb") as f:
            self.transport.fetch(f"git/objects/pack/{pack}", f.write, limit=self.max_pack, compress=False)
            f.flush()
            os.fsync(f.fileno())
        # index-pack reads every object, computes its id and writes our own index.
        out = run(["git", "--git-dir", self.git.path, "index-pack", "--strict",
                   "-o", os.path.join(work, "incoming.idx"), tmp_pack], capture=True, check=False)
        if out.returncode != 0:
            raise GitObjectError(f"{pack}: not a valid pack ({out.stderr.decode(errors='replace').strip()})")
        checksum = out.stdout.decode().split()[-1]
        dest = os.path.join(self.git.path, "objects", "pack")
        os.makedirs(dest, exist_ok=True)
        for ext in ("pack", "idx"):  # the index last: it makes the pack visible
            with open(os.path.join(work, f"incoming.{ext}"), "rb") as f:
                os.fsync(f.fileno())
            os.rename(os.path.join(work, f"incoming.{ext}"), os.path.join(dest, f"pack-{checksum}.{ext}"))
        fsync_dir(dest)
        os.rmdir(work)
        self.fetched += 1


def _index_ids(pack: str, index: bytes) -> set[str]:
    """The object ids a pack index (version 2) lists, after checking its checksum."""
    if len(index) < 8 + 1024 + 40 or hashlib.sha1(index[:-20]).digest() != index[-20:]:
        raise GitObjectError(f"{pack}: corrupt index")
    if index[:8] != b"\377tOc\0\0\0\2":
        raise GitObjectError(f"{pack}: unsupported index version")
    count = struct.unpack_from(">I", index, 8 + 255 * 4)[0]
    start = 8 + 1024
    if start + 20 * count > len(index):
        raise GitObjectError(f"{pack}: corrupt index")
    return {index[start + 20 * i:start + 20 * i + 20].hex() for i in range(count)}
