"""What changed between two manifests: added, removed and modified paths, and how."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..composefs.tree import Inode, resolve, walk


@dataclass
class TreeDiff:
    added: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    # path -> what changed: "content", "mode", "owner", "xattrs"
    modified: dict[bytes, list[str]] = field(default_factory=dict)


def _index(root: Inode) -> dict[bytes, Inode]:
    return {path: resolve(entry) for path, entry in walk(root)}


def _changes(a: Inode, b: Inode) -> list[str]:
    what = []
    if a.type == b.type:
        if a.is_reg():
            same = (a.size, a.digest, a.content) == (b.size, b.digest, b.content)
        else:
            same = (a.payload, a.rdev) == (b.payload, b.rdev)
        if not same:
            what.append("content")
    if a.mode != b.mode:
        what.append("mode")
    if (a.uid, a.gid) != (b.uid, b.gid):
        what.append("owner")
    if a.xattrs != b.xattrs:
        what.append("xattrs")
    return what


def diff(old: Inode, new: Inode) -> TreeDiff:
    a, b = _index(old), _index(new)
    result = TreeDiff(added=sorted(b.keys() - a.keys()), removed=sorted(a.keys() - b.keys()))
    for path in sorted(a.keys() & b.keys()):
        what = _changes(a[path], b[path])
        if what:
            result.modified[path] = what
    return result
