"""Reading a commit for deploying: the paths deploying uses, its kernel, its image."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pygit2

from ..boot import bootloader
from ..composefs import dumpfile, fsverity, imagewriter
from ..composefs.tree import Inode, lookup, resolve
from ..repo.repository import (
    MANIFEST,
    TRAILER_FORMAT,
    TRAILER_VERSION,
    Repository,
    image_digest_of,
    read_content,
    trailers,
)
from ..util.errors import CfsError, HostError, IntegrityError, UsageError
from .deployment import Origin


class DeployError(CfsError):
    pass


class DeployUsageError(DeployError, UsageError):
    pass


class DeployIntegrityError(DeployError, IntegrityError):
    pass


class DeployHostError(DeployError, HostError):
    pass


# What deploying reads of a manifest; the rest is never parsed (see load_commit).
DEPLOY_PATHS = (rb"/(?:etc|var)(?:/[^ \n]*)?|/sysroot|/usr/lib/os-release"
                rb"|/usr/lib/modules/[^/ \n]+/(?:vmlinuz|initramfs\.img)")
ETC_PATHS = rb"/etc(?:/[^ \n]*)?"


@dataclass
class Commit:
    """What deploying needs to know about a commit."""
    id: str
    manifest: bytes
    # A partial tree: DEPLOY_PATHS and their ancestors only.
    root: Inode
    image_digest: bytes
    image_format: int
    version: str | None
    kver: str
    kernel: Inode
    initramfs: Inode


def load_commit(repo: Repository, rev: str) -> Commit:
    """Read a commit for deploying.  Only the paths deploying uses are parsed, so
    the time taken hardly grows with the size of the tree."""
    c = repo.resolve(rev)
    cid = str(c.id)
    data = manifest_of_commit(c)
    root = dumpfile.parse_paths(data, DEPLOY_PATHS)
    for d in (b"/etc", b"/var", b"/sysroot"):
        e = lookup(root, d)
        if not isinstance(e, Inode) or not e.is_dir():
            raise DeployUsageError(f"commit {cid[:12]} has no {d.decode()} directory (a root filesystem needs it)")
    kver, kernel, initramfs = find_kernel(root, cid)
    t = trailers(c.message)
    fmt = t.get(TRAILER_FORMAT, "0")
    # The version is text of the commit that goes into records and titles: one plain line.
    version = bootloader.clean_title(t[TRAILER_VERSION]) or None if TRAILER_VERSION in t else None
    return Commit(cid, data, root, image_digest_of(c), int(fmt) if fmt.isdigit() else 0,
                  version, kver, kernel, initramfs)


def manifest_data(repo: Repository, rev: str) -> bytes:
    """The manifest of a commit, unparsed."""
    return manifest_of_commit(repo.resolve(rev))


def manifest_of_commit(c: pygit2.Commit) -> bytes:
    try:
        blob = c.tree[MANIFEST]
    except KeyError:
        raise DeployIntegrityError(f"commit {c.id} has no {MANIFEST}") from None
    if not isinstance(blob, pygit2.Blob):
        raise DeployIntegrityError(f"commit {c.id}: {MANIFEST} is not a file")
    return blob.data


def origin_of(repo: Repository, rev: str) -> Origin | None:
    """The branch a revision names, which upgrades then follow; None for a commit id."""
    if f"refs/heads/{rev}" in repo.git.references:
        return Origin(rev)
    remote, sep, branch = rev.partition("/")
    if sep and f"refs/remotes/{rev}" in repo.git.references:
        return Origin(branch, remote)
    return None


def find_kernel(root: Inode, cid: str) -> tuple[str, Inode, Inode]:
    """The first /usr/lib/modules/<kver>/ with a vmlinuz, and its initramfs.img."""
    modules = lookup(root, b"/usr/lib/modules")
    if isinstance(modules, Inode) and modules.children:
        for kver in sorted(modules.children):
            d = modules.children[kver]
            if not isinstance(d, Inode) or d.children is None or b"vmlinuz" not in d.children:
                continue
            kernel = resolve(d.children[b"vmlinuz"])
            initrd = d.children.get(b"initramfs.img")
            if not kernel.is_reg():
                continue
            # The name becomes a directory of the boot directory and a line of the entry.
            try:
                name = bootloader.check_kver(kver.decode("ascii", errors="replace"))
            except bootloader.BootError as e:
                raise DeployUsageError(f"commit {cid[:12]}, /usr/lib/modules: {e}") from None
            if initrd is None or not resolve(initrd).is_reg():
                raise DeployUsageError(f"commit {cid[:12]} has a kernel {name} but no "
                                       f"/usr/lib/modules/{name}/initramfs.img")
            return name, kernel, resolve(initrd)
    raise DeployUsageError(f"commit {cid[:12]} has no kernel (/usr/lib/modules/<version>/vmlinuz)")


def check_objects(repo: Repository, c: Commit) -> None:
    missing = sorted(d.hex() for d in repo.objects.missing(dumpfile.external_digests(c.manifest)))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DeployIntegrityError(f"commit {c.id[:12]} misses {len(missing)} objects: {shown}",
                                   hint="run `cfsdeploy fsck`, or pull again")


def ensure_image(repo: Repository, c: Commit) -> bool:
    """Make sure the commit's image object exists and is the image of its manifest;
    True if it had to be built.

    A commit whose manifest was built into its image here before (at commit, pull or
    an earlier deploy) needs only the image object's digest checked.  Any other is
    built from its whole manifest and refused unless that gives the digest it names."""
    path = repo.objects.path_of(c.image_digest)
    if repo.is_verified(c.id, c.image_digest) and os.path.exists(path):
        if fsverity.digest_file(path) != c.image_digest:
            raise DeployIntegrityError(f"image object {c.image_digest.hex()} is corrupt", hint="run `cfsdeploy fsck`")
        return False
    built = imagewriter.build(dumpfile.parse(c.manifest), min_version=c.image_format,
                              max_version=c.image_format).image
    if fsverity.digest_bytes(built) != c.image_digest:
        raise DeployIntegrityError(f"commit {c.id[:12]}: its manifest does not give the image its "
                                   "Composefs-Digest names; refusing to deploy it")
    with repo.lock(wait=60):
        if os.path.exists(path):
            with open(path, "rb") as f:
                if f.read() != built:
                    raise DeployIntegrityError(f"image object {c.image_digest.hex()} is corrupt",
                                               hint="run `cfsdeploy fsck`")
        else:
            repo.objects.add_bytes(built)
        repo.mark_verified(c.id, c.image_digest)
    return True


def os_release(repo: Repository, root: Inode) -> dict[str, str]:
    for path in (b"/etc/os-release", b"/usr/lib/os-release"):
        e = lookup(root, path)
        if e is None:
            continue
        node = resolve(e)
        if node.is_symlink():
            target = node.payload or b""
            base = path.rsplit(b"/", 1)[0]
            e = lookup(root, target if target.startswith(b"/") else os.path.normpath(base + b"/" + target))
            node = resolve(e) if e is not None else node
        if node.is_reg():
            out = {}
            for line in read_content(repo, node, os.fsdecode(path)).decode(errors="replace").splitlines():
                k, sep, v = line.partition("=")
                if sep:
                    out[k.strip()] = v.strip().strip("\"'")
            return out
    return {}
