"""The 3-way merge of /etc for a new deployment, with OSTree's semantics.

The local changes are the difference between the /etc the running deployment was
created from ("orig", a manifest subtree) and its writable /etc on disk ("local").
They are applied on top of a checkout of the new commit's /etc: local deletions,
edits and additions win; files the user never touched follow upstream.  A local
change that upstream made impossible (the path is now of a third type, or its
parent is no longer a directory) is a conflict: upstream's version is kept and
the conflict reported, the merge goes on.

Local entries are copied with their full metadata.  Hardlinks inside /etc become
separate copies and sockets are skipped: neither can be a configuration edit.

The local /etc belongs partly to users (a directory someone owns may be swapped for a
symlink at any moment), so everything copied from it is opened beneath an fd of the
/etc directory with no symlink followed in any component, and must be the very
inode the scan saw (device, inode number, type); anything else stops the merge.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from enum import Enum

from ..composefs.objects import ObjectStore
from ..composefs.scan import read_xattrs, scan
from ..composefs.tree import Inode, lookup, new_dir, resolve, walk
from ..repo.checkout import checkout
from ..util.errors import CfsError, TreeError
from ..util.fsutil import UnsafePathError, copy_fd, open_beneath, remove_tree

ETC = b"/etc"
# SELinux labels are set by relabelling (policy updates, restorecon), not by users
# editing configuration; counting them would freeze every relabelled file at its
# local version forever and stop it following upstream.  OSTree ignores xattrs in
# this diff for the same reason.  Other xattrs (ACLs, capabilities, user.*) are edits.
SELINUX = b"security.selinux"

_TYPE_NAMES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


class EtcMergeError(CfsError):
    """The local /etc cannot be read, or the merged /etc cannot be written."""


@dataclass
class ConflictKind(Enum):
    PARENT_NOT_DIRECTORY = "parent_not_directory"  # a parent of the path is no directory upstream
    BOTH_ADDED = "both_added"                      # added locally, and upstream added another type
    UPSTREAM_RETYPED = "upstream_retyped"          # upstream changed the type of what was edited locally


@dataclass(frozen=True)
class Conflict:
    """A local change not applied.  Types are words: file, directory, symlink, ..."""
    path: bytes
    kind: ConflictKind
    upstream: str                # upstream's type at path (at parent, for PARENT_NOT_DIRECTORY)
    local: str | None = None     # the local type (BOTH_ADDED, UPSTREAM_RETYPED)
    original: str | None = None  # the type before upstream changed it (UPSTREAM_RETYPED)
    parent: bytes | None = None  # the parent that is no directory (PARENT_NOT_DIRECTORY)


@dataclass
class MergeReport:
    """The local changes carried into the new /etc, paths like b"/etc/ssh/sshd_config"."""

    modified: list[bytes] = field(default_factory=list)
    added: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    # Local changes not applied: upstream's version was kept.
    conflicts: list[Conflict] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        name = os.fsdecode
        return {
            "modified": [name(p) for p in self.modified],
            "added": [name(p) for p in self.added],
            "removed": [name(p) for p in self.removed],
            "conflicts": [{"path": name(c.path), "kind": c.kind.value, "upstream": c.upstream, "local": c.local,
                           "original": c.original, "parent": None if c.parent is None else name(c.parent)}
                          for c in self.conflicts],
        }


@dataclass
class _Change:
    rel: bytes  # b"" for /etc itself, else b"/a/b"
    before: Inode | None  # None: added locally
    after: Inode | None  # None: removed locally


@dataclass
class LocalEtc:
    """A local /etc as scanned: its tree, the (st_dev, st_ino) of each path scanned,
    the sockets skipped, and an fd of the directory, beneath which what is copied is
    opened."""

    path: bytes
    fd: int
    root: Inode
    identities: dict[bytes, tuple[int, int]]
    sockets: set[bytes]

    def close(self) -> None:
        os.close(self.fd)


def read_local(path: bytes) -> LocalEtc:
    """Scan the local /etc at path (close the result).  All of it is read before
    anything is created, so an unreadable file fails the merge early and cleanly."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise EtcMergeError(f"cannot read the local /etc: {os.fsdecode(path)}: {e.strerror}") from None
    try:
        identities: dict[bytes, tuple[int, int]] = {}
        try:
            root, stats = scan(path, warn=lambda m: None, identities=identities)
        except TreeError as e:
            raise EtcMergeError(f"cannot read the local /etc: {e}") from None
        skipped: list[bytes] = stats.skipped
        etc = LocalEtc(path, fd, root, identities, {p[len(path):] for p in skipped})
        st = os.fstat(fd)
        if identities[path] != (st.st_dev, st.st_ino):
            raise _changed(b"")
        return etc
    except BaseException:
        os.close(fd)
        raise


def merge_etc(orig: Inode | None, local: bytes | None, new: Inode | None,
              store: ObjectStore, dest: bytes) -> MergeReport:
    """Create `dest` (which must not exist) as the new commit's /etc `new` with the
    local changes of `local` against `orig` applied.  Without `local` (a first
    deployment) it is a plain checkout of `new`; a missing `new` or `orig` counts as
    an empty directory, mode 0755, owned by root."""
    if local is None:
        checkout(_etc_dir(new, "new"), store, os.fsdecode(dest))
        return MergeReport()
    etc = read_local(os.fsencode(local))
    try:
        return merge_local(orig, etc, new, store, dest)
    finally:
        etc.close()


def merge_local(orig: Inode | None, local: LocalEtc, new: Inode | None,
                store: ObjectStore, dest: bytes) -> MergeReport:
    """merge_etc with the local /etc already read."""
    new_root = _etc_dir(new, "new")
    changes = _local_changes(_etc_dir(orig, "original"), local.root, local.sockets)
    checkout(new_root, store, os.fsdecode(dest))
    merge = _Merge(local, os.fsencode(dest))
    try:
        for change in changes:
            merge.apply(change)
        merge.finish()
    except BaseException as e:
        remove_tree(merge.dest, ignore_errors=True)
        if isinstance(e, OSError):
            where = os.fsdecode(e.filename if e.filename is not None else merge.dest)
            raise EtcMergeError(f"cannot merge /etc: {where}: {e.strerror}") from None
        raise
    report = merge.report
    for paths in (report.modified, report.added, report.removed):
        paths.sort()
    report.conflicts.sort(key=lambda c: c.path)
    return report


def _etc_dir(node: Inode | None, which: str) -> Inode:
    if node is None:
        return new_dir(0o755)
    if not node.is_dir():
        raise EtcMergeError(f"/etc of the {which} commit is not a directory")
    return node


def _without_selinux(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {k: v for k, v in xattrs.items() if k != SELINUX}


def _same_content(a: Inode, b: Inode) -> bool:
    if a.size != b.size:
        return False
    if a.content is not None or b.content is not None:
        return a.content == b.content
    return a.digest == b.digest


def _differs(a: Inode, b: Inode) -> bool:
    """Whether b is a user edit of a; mtime (and link counts) never count."""
    if (a.mode, a.uid, a.gid) != (b.mode, b.uid, b.gid):
        return True
    if _without_selinux(a.xattrs) != _without_selinux(b.xattrs):
        return True
    if a.is_reg():
        return not _same_content(a, b)
    return (a.payload, a.rdev) != (b.payload, b.rdev)


def _local_changes(orig: Inode, local: Inode, sockets: set[bytes]) -> list[_Change]:
    """The changes from orig to local, sorted by path.  Nothing below an added,
    removed or retyped path is listed; a directory whose own metadata changed is
    listed and its children are compared one by one."""
    changes = [_Change(b"", orig, local)] if _differs(orig, local) else []
    stack = [(b"", orig, local)]
    while stack:
        rel, o, loc = stack.pop()
        o_children, l_children = o.children or {}, loc.children or {}
        for name in o_children.keys() | l_children.keys():
            path = rel + b"/" + name
            before = resolve(o_children[name]) if name in o_children else None
            after = resolve(l_children[name]) if name in l_children else None
            if after is None:
                # A socket cannot be stored or copied; it leaves upstream's entry alone.
                if path not in sockets:
                    changes.append(_Change(path, before, None))
            elif before is None or before.type != after.type:
                changes.append(_Change(path, before, after))
            else:
                if _differs(before, after):
                    changes.append(_Change(path, before, after))
                if before.is_dir():
                    stack.append((path, before, after))
    changes.sort(key=lambda c: c.rel)
    return changes


def _lstat_type(path: bytes) -> int | None:
    try:
        return stat.S_IFMT(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


def _set_metadata(path: bytes, node: Inode, keep: frozenset[bytes] = frozenset()) -> None:
    """Give path node's owner, mode, exact xattrs (but those named in keep, left as
    they are) and mtime.  The owner comes before the mode (chown clears setuid bits
    and file capabilities), the xattrs after it (ACLs adjust the mode)."""
    os.lchown(path, node.uid, node.gid)
    if not node.is_symlink():
        os.chmod(path, stat.S_IMODE(node.mode))
    for name in read_xattrs(path).keys() - node.xattrs.keys() - keep:
        os.removexattr(path, name, follow_symlinks=False)
    for name, value in node.xattrs.items():
        if name not in keep:
            os.setxattr(path, name, value, follow_symlinks=False)
    os.utime(path, ns=(node.mtime_sec * 10**9 + node.mtime_nsec,) * 2, follow_symlinks=False)


def _kind(ftype: int | None) -> str:
    return "nothing" if ftype is None else _TYPE_NAMES[ftype]


def _parent(rel: bytes) -> bytes:
    return rel.rpartition(b"/")[0]


def _changed(rel: bytes) -> EtcMergeError:
    return EtcMergeError(f"{os.fsdecode(ETC + rel)} changed during the merge (it is not what was "
                         "read, or a symlink now leads to it): try again")


class _Merge:
    """Applies local changes to dest, a fresh checkout of the new /etc.

    Every path is checked component by component with lstat before it is used, so
    a symlink upstream put where a local directory was never leads outside dest."""

    def __init__(self, local: LocalEtc, dest: bytes) -> None:
        self.local = local
        self.local_root = local.root
        self.dest = dest
        self.report = MergeReport()
        # Directories of dest whose entries or metadata changed: they get the local
        # directory's mtime at the end (each exists in local as a directory).
        self.touched: set[bytes] = set()

    def apply(self, change: _Change) -> None:
        rel, before, after = change.rel, change.before, change.after
        problem = self._prepare_parents(rel, create=after is not None)
        if after is None:
            if problem is None and _lstat_type(self.dest + rel) is not None:
                remove_tree(self.dest + rel)
                self.touched.add(_parent(rel))
            self.report.removed.append(ETC + rel)
            return
        if problem is not None:
            parent, ftype = problem
            self._conflict(Conflict(ETC + rel, ConflictKind.PARENT_NOT_DIRECTORY, _kind(ftype), parent=ETC + parent))
            return
        upstream = _lstat_type(self.dest + rel)
        t0 = before.type if before is not None else None
        if upstream is not None and upstream not in (t0, after.type):
            if before is None:
                self._conflict(Conflict(ETC + rel, ConflictKind.BOTH_ADDED, _kind(upstream), _kind(after.type)))
            else:
                self._conflict(Conflict(ETC + rel, ConflictKind.UPSTREAM_RETYPED, _kind(upstream),
                                        _kind(after.type), _kind(t0)))
            return
        if before is not None and before.is_dir() and after.is_dir():
            self._set_dir_metadata(rel, after, upstream is not None)
        else:
            self._place(rel, after)
        (self.report.added if before is None else self.report.modified).append(ETC + rel)

    def finish(self) -> None:
        # Deepest first: setting a directory's mtime does not touch its parent's.
        for rel in sorted(self.touched, reverse=True):
            node = resolve(lookup(self.local_root, rel))  # type: ignore[arg-type]
            os.utime(self.dest + rel, ns=(node.mtime_sec * 10**9 + node.mtime_nsec,) * 2,
                     follow_symlinks=False)

    def _conflict(self, conflict: Conflict) -> None:
        self.report.conflicts.append(conflict)

    def _prepare_parents(self, rel: bytes, create: bool) -> tuple[bytes, int | None] | None:
        """Check that every parent of rel is a directory in dest, creating missing
        ones (if create) from the local directories as templates; else the first that
        is not, and its type upstream."""
        parent = b""
        for part in rel.split(b"/")[1:-1]:
            parent += b"/" + part
            ftype = _lstat_type(self.dest + parent)
            if ftype is None and create:
                template = resolve(lookup(self.local_root, parent))  # type: ignore[arg-type]
                os.close(self._open_local(parent, template))
                os.mkdir(self.dest + parent, 0o700)
                _set_metadata(self.dest + parent, template)
                self.touched.add(_parent(parent))
            elif ftype != stat.S_IFDIR:
                return parent, ftype
        return None

    def _set_dir_metadata(self, rel: bytes, node: Inode, exists: bool) -> None:
        os.close(self._open_local(rel, node))
        if exists:
            # Upstream's label stays: SELinux labels are not user edits (see SELINUX).
            _set_metadata(self.dest + rel, node, keep=frozenset({SELINUX}))
        else:
            os.mkdir(self.dest + rel, 0o700)
            _set_metadata(self.dest + rel, node)
            self.touched.add(_parent(rel))
        self.touched.add(rel)

    def _place(self, rel: bytes, node: Inode) -> None:
        """Put the local entry node at rel in dest.  A local directory meeting an
        upstream directory is merged into it, local children winning, so files
        upstream ships in the same directory stay."""
        path = self.dest + rel
        upstream = _lstat_type(path)
        if upstream == stat.S_IFDIR and node.is_dir():
            os.close(self._open_local(rel, node))
            _set_metadata(path, node)
            self.touched.add(rel)
            for name in sorted(node.children or {}):
                child = resolve(node.children[name])  # type: ignore[index]
                child_rel = rel + b"/" + name
                there = _lstat_type(self.dest + child_rel)
                if there is not None and there != child.type:
                    self._conflict(Conflict(ETC + child_rel, ConflictKind.BOTH_ADDED, _kind(there),
                                            _kind(child.type)))
                else:
                    self._place(child_rel, child)
            return
        if upstream is not None:
            remove_tree(path)
        self._copy(rel, node)
        self.touched.add(_parent(rel))

    def _copy(self, rel: bytes, top: Inode) -> None:
        """Copy the local entry top (a whole subtree for a directory) to rel in dest;
        directories get their metadata last, deepest first, once their children exist.
        Each entry is checked to be what the scan saw before anything of it is copied."""
        dirs: list[tuple[bytes, Inode]] = []
        for sub, entry in walk(top):
            sub_rel = rel if sub == b"/" else rel + sub
            node, path = resolve(entry), self.dest + sub_rel
            src = self._open_local(sub_rel, node)
            try:
                if node.is_dir():
                    os.mkdir(path, 0o700)
                    dirs.append((path, node))
                    continue
                if node.is_reg():
                    _copy_file(src, path)
                elif node.is_symlink():
                    os.symlink(node.payload or b"", path)
                else:
                    os.mknod(path, node.type | 0o600, node.rdev)
            finally:
                os.close(src)
            _set_metadata(path, node)
        for path, node in reversed(dirs):
            _set_metadata(path, node)

    def _open_local(self, rel: bytes, node: Inode) -> int:
        """An fd of the local entry at rel, reached with no symlink followed, that is
        the inode the scan saw as node: readable for a regular file, else O_PATH."""
        # O_NONBLOCK: should a fifo have taken a file's place, the open must not hang.
        flags = os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK if node.is_reg() else os.O_PATH
        try:
            fd = os.dup(self.local.fd) if not rel else open_beneath(self.local.fd, rel[1:], flags)
        except (UnsafePathError, FileNotFoundError, NotADirectoryError):
            raise _changed(rel) from None
        try:
            st = os.fstat(fd)
            if ((st.st_dev, st.st_ino) != self.local.identities.get(self.local.path + rel)
                    or stat.S_IFMT(st.st_mode) != node.type):
                raise _changed(rel)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _copy_file(src: int, dst_path: bytes) -> None:
    dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        copy_fd(src, dst)
    finally:
        os.close(dst)
