"""An image file from a tree: a directory scanned or a dumpfile parsed, built into
a composefs image, written atomically (what `cfsdeploy image build` does)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..util.fsutil import atomic_write_bytes
from . import dumpfile, imagewriter
from .fsverity import Digest, digest_bytes
from .objects import ObjectStore
from .scan import scan
from .tree import Inode


@dataclass(frozen=True)
class ImageFile:
    """An image written: where, its fs-verity digest and format version."""

    path: str
    digest: Digest
    version: int


def from_directory(source: str, dest: str, *, digest_store: str | None = None, min_version: int = 0,
                   max_version: int = imagewriter.FORMAT_VERSION_MAX) -> ImageFile:
    """The image of the tree at `source`; with a digest_store, files over 64 bytes are
    copied into it, named by digest (the basedir a mount of the image needs)."""
    store = None
    if digest_store is not None:
        os.makedirs(digest_store, exist_ok=True)
        store = ObjectStore(digest_store)
    root, _ = scan(source, store=store)
    return _write(root, dest, min_version, max_version)


def from_dumpfile(data: bytes, dest: str, *, strict: bool = True, min_version: int = 0,
                  max_version: int = imagewriter.FORMAT_VERSION_MAX) -> ImageFile:
    """The image of the tree a dumpfile describes (lenient parsing if not strict)."""
    return _write(dumpfile.parse(data, strict=strict), dest, min_version, max_version)


def _write(root: Inode, dest: str, min_version: int, max_version: int) -> ImageFile:
    built = imagewriter.build(root, min_version=min_version, max_version=max_version)
    atomic_write_bytes(dest, built.image)
    return ImageFile(dest, digest_bytes(built.image), built.version)
