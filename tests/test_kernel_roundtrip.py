"""Images we write, mounted by the real kernel, give back every file of the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from cfsdeploy.composefs import dumpfile, fsverity, imagereader, imagewriter
from cfsdeploy.composefs.mounts import mounted_composefs
from cfsdeploy.composefs.objects import ObjectStore
from cfsdeploy.composefs.scan import scan

from .fstree import compare_trees

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("requires_mount")]


@pytest.fixture(scope="module")
def built(tmp_path_factory, everything_tree):
    work = tmp_path_factory.mktemp("roundtrip")
    tree = everything_tree
    objects = work / "objects"
    objects.mkdir()
    root, _ = scan(tree, store=ObjectStore(objects))
    image = work / "image.cfs"
    image.write_bytes(imagewriter.build(root).image)
    return tree, objects, image, root


def test_mounted_image_equals_source_tree(built) -> None:
    tree, objects, image, _ = built
    with mounted_composefs(image, objects) as mnt:
        # Sockets are runtime objects: the scan skips them (with a warning).
        assert compare_trees(tree, mnt) == ["/special/socket: missing"]


@pytest.mark.skipif(shutil.which("fsck.erofs") is None, reason="fsck.erofs (erofs-utils) not installed")
def test_fsck_erofs_accepts_image_of_everything_tree(built) -> None:
    subprocess.run(["fsck.erofs", str(built[2])], check=True, capture_output=True)


def test_reader_gives_back_the_manifest_we_built_from(built) -> None:
    _, _, image, root = built
    back = imagereader.read_image_file(image).root
    expected = dumpfile.parse(dumpfile.dumps(root))
    _zero_dir_sizes(back)
    _zero_dir_sizes(expected)
    _recount_dir_nlinks(expected)
    assert dumpfile.dumps(back) == dumpfile.dumps(expected)


def test_objects_are_named_by_their_fsverity_digest(built) -> None:
    _, objects, _, _ = built
    names = [(d, f) for d in os.listdir(objects) if len(d) == 2 for f in os.listdir(objects / d)]
    assert names
    for d, f in names[:50]:
        assert fsverity.digest_file(objects / d / f).hex() == d + f


def _zero_dir_sizes(root) -> None:
    for _, entry in dumpfile.walk(root):
        if getattr(entry, "children", None) is not None:
            entry.size = 0


def _recount_dir_nlinks(root) -> None:
    for _, entry in dumpfile.walk(root):
        if getattr(entry, "children", None) is not None:
            entry.nlink = 2 + sum(1 for c in entry.children.values()
                                  if getattr(c, "children", None) is not None)
