"""dump(build(x)) == x: the reader gives back what the writer was given.

The comparison is on the canonical form: fields the image format recomputes are
normalized on both sides (directory sizes and link counts, xattr order, the size of
a whiteout, mode bits above the 16 the format stores), everything else must be equal.
"""

from __future__ import annotations

import pytest

from cfsdeploy.composefs import dumpfile, imagereader, imagewriter
from cfsdeploy.composefs.tree import Inode, walk

from .vectors import BEFORE_1970, BEFORE_1970_DUMP, VALID, Vector


def canonical(root: Inode) -> bytes:
    for _, entry in walk(root):
        if not isinstance(entry, Inode):
            continue
        entry.mode &= 0xFFFF
        if entry.children is not None:
            entry.size = 0
            entry.nlink = 2 + sum(1 for c in entry.children.values()
                                  if isinstance(c, Inode) and c.children is not None)
        if entry.is_whiteout():
            entry.size = 0
        entry.xattrs = dict(sorted(entry.xattrs.items()))
    return dumpfile.dumps(root)


def build(v: Vector, root: Inode | None = None) -> bytes:
    kw = {"min_version": v.version, "max_version": v.version} if v.version is not None else {}
    return imagewriter.build(root or dumpfile.parse(v.data, strict=v.strict), **kw).image


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v.name)
def test_dump_of_built_image_is_the_input(vector: Vector) -> None:
    back = imagereader.read_image(build(vector)).root
    assert canonical(back) == canonical(dumpfile.parse(vector.data, strict=vector.strict))


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v.name)
def test_rebuilding_from_the_dump_gives_the_same_image(vector: Vector) -> None:
    image = build(vector)
    dumped = dumpfile.dumps(imagereader.read_image(image).root)
    assert build(vector, dumpfile.parse(dumped)) == image


def test_times_before_1970_read_back_as_the_reference_dumps_them() -> None:
    image = imagewriter.build(dumpfile.parse(BEFORE_1970)).image
    dumped = dumpfile.dumps(imagereader.read_image(image).root)
    assert dumped == BEFORE_1970_DUMP
    assert imagewriter.build(dumpfile.parse(dumped)).image == image
