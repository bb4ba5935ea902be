"""composefs-dump(5): the text format of a manifest, parsed and written exactly.

One line per file: PATH SIZE MODE NLINK UID GID RDEV MTIME PAYLOAD CONTENT DIGEST
then KEY=VALUE xattrs.  Fields are separated by single spaces; bytes that are not
printable are escaped as \\xXY (plus \\\\ \\n \\r \\t).  A MODE starting with '@'
marks a hardlink whose PAYLOAD is the path of the file it links to.

Strict mode (the default) also requires a trailing newline, rdev 0 on anything
but devices, and a symlink SIZE equal to its target's length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import IO

from ..util.errors import DumpfileError, TreeError
from .fsverity import Digest
from .tree import (
    DIGEST_SIZE,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    VALID_TYPES,
    XATTR_BUDGET,
    Hardlink,
    Inode,
    check_inode,
    check_name,
    lookup,
    no_gc,
    walk,
    xattr_cost,
)

# An xattr line section longer than this is rejected (the reference caps it too).
XATTR_LINE_MAX = 0xFFFF
_ESCAPE_RE = re.compile(rb"\\(?:x(..)|(.)|$)", re.S)
_SIMPLE_ESCAPES = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def unescape(field: bytes) -> bytes:
    if b"\\" not in field:
        return field

    def sub(m: re.Match[bytes]) -> bytes:
        hexpair, simple = m.group(1), m.group(2)
        if hexpair is not None:
            if hexpair[0] not in _HEX or hexpair[1] not in _HEX:
                raise ValueError(f"invalid hex escape \\x{hexpair.decode('latin-1')}")
            return bytes([int(hexpair, 16)])
        if simple is None:
            raise ValueError("no character after escape")
        if simple == b"x":
            raise ValueError("no hex characters after hex escape")
        out = _SIMPLE_ESCAPES.get(simple)
        if out is None:
            raise ValueError(f"unsupported escape \\{simple.decode('latin-1')}")
        return out

    return _ESCAPE_RE.sub(sub, field)


def _escape_table(escape_space: bool, escape_equal: bool) -> list[bytes]:
    table = []
    for c in range(256):
        b = bytes([c])
        if b == b"\\":
            table.append(b"\\\\")
        elif b == b"\n":
            table.append(b"\\n")
        elif b == b"\r":
            table.append(b"\\r")
        elif b == b"\t":
            table.append(b"\\t")
        elif b == b"=" and escape_equal:
            table.append(b"\\x3d")
        elif c == 0x20 and not escape_space:
            table.append(b)
        elif 0x21 <= c <= 0x7E:
            table.append(b)
        else:
            table.append(b"\\x%02x" % c)
    return table


_TABLE_STANDARD = _escape_table(escape_space=True, escape_equal=False)
_TABLE_XATTR = _escape_table(escape_space=True, escape_equal=True)
_NEEDS_ESCAPE = re.compile(rb"[^\x21-\x3c\x3e-\x5b\x5d-\x7e]")
_NEEDS_ESCAPE_NOEQ = re.compile(rb"[^\x21-\x5b\x5d-\x7e]")


def escape(value: bytes) -> bytes:
    if _NEEDS_ESCAPE_NOEQ.search(value) is None:
        return value
    return b"".join(_TABLE_STANDARD[c] for c in value)


def escape_xattr(value: bytes) -> bytes:
    if _NEEDS_ESCAPE.search(value) is None:
        return value
    return b"".join(_TABLE_XATTR[c] for c in value)


def escape_optional(value: bytes | None) -> bytes:
    if value is None:
        return b"-"
    if value == b"-":
        return b"\\x2d"
    return escape(value)


def _int(field: bytes, what: str, base: int = 10) -> int:
    # The reference uses strtoull; we accept plain digits only, no signs or spaces.
    if not field.isdigit() or (base == 8 and (b"8" in field or b"9" in field)):
        raise ValueError(f"invalid {what} {field[:40].decode('latin-1')!r}")
    return int(field, base)


_NUMBERS = re.compile(rb"([0-9]+) ([0-9]+) ([0-9]+) ([0-9]+) (-?[0-9]+)\.([0-9]+)")
_DIGEST = re.compile(rb"[0-9a-fA-F]{%d}" % (2 * DIGEST_SIZE))


@lru_cache(maxsize=4096)
def _unescape_value(value: bytes) -> bytes:
    # xattr values (SELinux labels above all) repeat on most lines.
    return unescape(value)


def _optional(field: bytes) -> bytes | None:
    return None if field == b"-" else unescape(field)


class _Parser:
    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.root: Inode | None = None
        self.links: list[tuple[Hardlink, bytes, int]] = []
        self.dirs: dict[bytes, Inode] = {}
        self.lineno = 0

    def parent_of(self, path: bytes) -> tuple[Inode, bytes]:
        if not path.startswith(b"/"):
            raise ValueError(f"path must be absolute: {path!r}")
        if self.root is None:
            raise ValueError("root directory missing: the first line must be '/'")
        dirpath, _, name = path.rpartition(b"/")
        try:
            check_name(name)
        except TreeError as e:
            raise ValueError(f"{e} in path {path!r}") from None
        # Directories are indexed by path as they are added; every parent must come first.
        node = self.dirs.get(dirpath)
        if node is None:
            if lookup(self.root, dirpath) is not None:
                raise ValueError(f"parent is not a directory for {path!r}")
            raise ValueError(f"parent directory missing for {path!r}")
        if name in node.children:  # type: ignore[operator]
            raise ValueError(f"path {path!r} already exists")
        return node, name

    def line(self, line: bytes) -> None:
        nul = line.find(b"\0")
        if nul >= 0:
            raise ValueError(f"embedded NUL character at position {nul}")
        fields = line.split(b" ", 11)
        if len(fields) < 11:
            if self.strict:
                raise ValueError(f"expected at least 11 fields, found {len(fields)}")
            # Lenient mode reads missing trailing fields as empty, like the reference.
            fields += [b""] * (11 - len(fields))
        path = unescape(fields[0])
        if not path:
            raise ValueError("empty path")
        mode_field = fields[2]
        is_link = mode_field.startswith(b"@")
        mode = _int(mode_field[1:] if is_link else mode_field, "mode", 8)
        if mode > 0xFFFFFFFF or mode & S_IFMT not in VALID_TYPES:
            raise ValueError(f"invalid mode {mode:o}")

        if path == b"/":
            if is_link:
                raise ValueError("the root cannot be a hardlink")
            if self.root is not None:
                raise ValueError("more than one root entry")
            if mode & S_IFMT != S_IFDIR:
                raise ValueError("root must be a directory")
            parent, name = None, b""
        else:
            parent, name = self.parent_of(path)

        if is_link:
            if mode & S_IFMT == S_IFDIR:
                raise ValueError("directories can't be hardlinked")
            target = _optional(fields[8])
            if not target:
                raise ValueError("hardlink without a target path")
            link = Hardlink(target=None)  # type: ignore[arg-type]  # resolved at the end
            self.links.append((link, target, self.lineno))
            parent.children[name] = link  # type: ignore[union-attr,index]
            return

        ftype = mode & S_IFMT
        m = _NUMBERS.fullmatch(b" ".join(fields[3:8]))
        if m is not None:
            # Fast path: one regex validates every numeric field of a well-formed line.
            size = _int(fields[1], "size")
            nlink, uid, gid, rdev, mtime_sec, mtime_nsec = map(int, m.groups())
        else:
            size = _int(fields[1], "size")
            nlink = _int(fields[3], "nlink")
            uid = _int(fields[4], "uid")
            gid = _int(fields[5], "gid")
            rdev = _int(fields[6], "rdev")
            sec, dot, nsec = fields[7].partition(b".")
            if not dot:
                raise ValueError(f"invalid mtime {fields[7].decode('latin-1')!r}: expected SEC.NSEC")
            # Times before 1970 are negative, as the reference prints them (PRIi64).
            negative = sec.startswith(b"-")
            mtime_sec = _int(sec[1:] if negative else sec, "mtime seconds")
            mtime_sec = -mtime_sec if negative else mtime_sec
            mtime_nsec = _int(nsec, "mtime nanoseconds")
        payload = _optional(fields[8])
        content = _optional(fields[9])
        digest_field = _optional(fields[10])

        if ftype not in (S_IFCHR, S_IFBLK) and rdev != 0:
            if self.strict:
                raise ValueError("non-zero rdev on a non-device")
            rdev = 0

        digest = None
        if digest_field:
            if _DIGEST.fullmatch(digest_field) is None:
                raise ValueError(f"invalid digest {digest_field[:80]!r}: expected 64 hex digits")
            digest = Digest(bytes.fromhex(digest_field.decode()))

        if ftype == S_IFLNK:
            if self.strict:
                if payload is not None and size != len(payload):
                    raise ValueError(f"symlink size {size} does not match its target's length {len(payload)}")
                if content:
                    raise ValueError("symlink cannot have content")
            size = len(payload or b"")
            content = None
        else:
            if content == b"":
                content = None
            if payload == b"" and ftype == S_IFREG:
                payload = None

        node = Inode(mode=mode, uid=uid, gid=gid, nlink=nlink, rdev=rdev, mtime_sec=mtime_sec,
                     mtime_nsec=mtime_nsec, size=size, payload=payload, content=content,
                     digest=digest, children={} if ftype == S_IFDIR else None)

        rest = fields[11] if len(fields) == 12 else b""
        if len(rest) > XATTR_LINE_MAX:
            raise ValueError("too many xattrs")
        if rest:
            budget = 0
            for item in rest.split(b" "):
                key, eq, value = item.partition(b"=")
                if not eq:
                    raise ValueError(f"missing '=' in xattr {item[:60]!r}")
                if b"\\" in key:
                    key = unescape(key)
                if b"\\" in value:
                    value = _unescape_value(value)
                old = node.xattrs.pop(key, None)
                if old is not None:
                    budget = budget - xattr_cost(key, old) if node.xattrs else 0
                cost = xattr_cost(key, value) + (0 if node.xattrs else 12)
                if budget + cost > XATTR_BUDGET:
                    raise ValueError(f"xattrs too large (limit {XATTR_BUDGET} bytes per file)")
                budget += cost
                node.xattrs[key] = value
        try:
            check_inode(node)
        except TreeError as e:
            raise ValueError(f"{escape(path).decode()}: {e}") from None

        if parent is None:
            self.root = node
            self.dirs[b""] = node
        else:
            parent.children[name] = node  # type: ignore[index]
            if node.children is not None:
                self.dirs[path] = node

    def resolve_links(self) -> None:
        assert self.root is not None
        pending = {id(link): (target, lineno) for link, target, lineno in self.links}
        for link, _, _ in self.links:
            chain: list[Hardlink] = []
            cur = link
            # Follow links to links until an inode turns up; remember the chain.
            while cur.target is None:
                target_path, lineno = pending[id(cur)]
                if any(c is cur for c in chain):
                    raise DumpfileError(f"hardlink cycle through {target_path!r}", lineno)
                chain.append(cur)
                found = lookup(self.root, target_path)
                if found is None:
                    raise DumpfileError(f"no target at {target_path!r} for hardlink", lineno)
                if found is cur:
                    raise DumpfileError(f"self-referential hardlink {target_path!r}", lineno)
                if isinstance(found, Inode):
                    if found.children is not None:
                        raise DumpfileError(f"hardlink to directory {target_path!r}", lineno)
                    cur.target = found
                    break
                cur = found
            for c in chain:
                c.target = cur.target


def parse(data: bytes, *, strict: bool = True) -> Inode:
    """Parse a whole dumpfile into a tree; raise DumpfileError naming the line."""
    p = _Parser(strict)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines and strict:
        raise DumpfileError("missing trailing newline", len(lines))
    with no_gc():
        for p.lineno, line in enumerate(lines, 1):
            try:
                p.line(line)
            except ValueError as e:
                raise DumpfileError(str(e), p.lineno) from None
    if p.root is None:
        raise DumpfileError("empty dumpfile: no root entry")
    p.resolve_links()
    return p.root


def _line(path: bytes, node: Inode, link_path: bytes | None) -> bytes:
    if link_path is not None:
        mode = b"@%o" % node.mode
        payload = escape_optional(link_path)
    else:
        mode = b"%o" % node.mode
        payload = escape_optional(node.payload)
    parts = [
        escape(path), b"%d" % node.size, mode, b"%d" % node.nlink, b"%d" % node.uid,
        b"%d" % node.gid, b"%d" % node.rdev, b"%d.%d" % (node.mtime_sec, node.mtime_nsec),
        payload, escape_optional(node.content),
        node.digest.hex().encode() if node.digest is not None else b"-",
    ]
    parts.extend(escape_xattr(k) + b"=" + escape_xattr(v) for k, v in node.xattrs.items())
    return b" ".join(parts) + b"\n"


def lines(root: Inode) -> Iterable[bytes]:
    """The dumpfile lines of a tree: pre-order, children sorted by name as bytes."""
    entries = list(walk(root))
    primary = {id(e): p for p, e in entries if isinstance(e, Inode)}
    for path, entry in entries:
        if isinstance(entry, Hardlink):
            yield _line(path, entry.target, primary[id(entry.target)])
        else:
            yield _line(path, entry, None)


def dumps(root: Inode) -> bytes:
    return b"".join(lines(root))


def dump(root: Inode, out: IO[bytes]) -> None:
    for line in lines(root):
        out.write(line)


def parse_paths(data: bytes, pattern: bytes) -> Inode:
    """Parse only the entries whose path (as written, escaped) matches the regular
    expression `pattern`, with their ancestors and hardlink targets: a partial tree,
    for when reading a few paths should not cost a parse of the whole manifest (the
    regular expression engine finds the lines without Python touching the others)."""
    found: dict[bytes, tuple[int, bytes]] = {}
    for m in re.finditer(rb"^(?:" + pattern + rb") [^\n]*\n", data, re.M):
        found[m.group().split(b" ", 1)[0]] = (m.start(), m.group())
    todo = list(found)
    while todo:
        p = todo.pop()
        fields = found[p][1].split(b" ", 9)
        needs = [p.rpartition(b"/")[0] or b"/"] if p != b"/" else []
        if len(fields) > 8 and fields[2].startswith(b"@"):
            needs.append(fields[8])
        for q in needs:
            if q not in found:
                line = re.search(rb"^" + re.escape(q) + rb" [^\n]*\n", data, re.M)
                if line is not None:  # else parse() names what is missing
                    found[q] = (line.start(), line.group())
                    todo.append(q)
    # The file's order is pre-order: ancestors come before their descendants.
    return parse(b"".join(line for _, line in sorted(found.values())))


def external_digests(data: bytes) -> set[bytes]:
    """The digests of the objects a manifest's regular files name, read straight from
    its lines (the same set as tree.objects_of(parse(data)), without building a tree)."""
    out = set()
    for line in data.splitlines():
        fields = line.split(b" ", 11)
        if len(fields) > 10 and fields[10] != b"-" and fields[9] == b"-" and not fields[2].startswith(b"@"):
            out.add(bytes.fromhex(fields[10].decode()))
    return out
