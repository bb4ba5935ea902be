"""composefs/imagefile: a directory or a dumpfile to an image file, as `image build` does."""

from __future__ import annotations

import os

import pytest

from cfsdeploy.composefs import dumpfile, fsverity, imagefile, imagereader
from cfsdeploy.util.errors import DumpfileError


def test_an_image_of_a_directory_is_written_with_its_digest(tmp_path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/big").write_bytes(os.urandom(1000))
    built = imagefile.from_directory(str(tmp_path / "tree"), str(tmp_path / "img"),
                                     digest_store=str(tmp_path / "objects"))
    assert built.digest == fsverity.digest_file(tmp_path / "img") and built.version == 0
    big = imagereader.read_image_file(str(tmp_path / "img")).root.children[b"big"]
    assert os.path.exists(tmp_path / "objects" / os.fsdecode(big.payload))


def test_an_image_of_a_dumpfile_has_the_tree_it_describes(tmp_path) -> None:
    dump = b"/ 4096 40755 2 0 0 0 0.0 - - -\n/f 3 100644 1 0 0 0 0.0 - abc -\n"
    built = imagefile.from_dumpfile(dump, str(tmp_path / "img"))
    assert dumpfile.dumps(imagereader.read_image_file(built.path).root) == dump


def test_a_malformed_dumpfile_writes_nothing(tmp_path) -> None:
    with pytest.raises(DumpfileError):
        imagefile.from_dumpfile(b"/ nonsense\n", str(tmp_path / "img"))
    assert not os.path.exists(tmp_path / "img")
