"""Reading a commit for deploying: the paths deploying uses, its kernel, its image."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pygit2

from ..boot import bootloader, kargs, uki
from ..composefs import dumpfile, fsverity, imagewriter
from ..composefs.tree import Inode, lookup, resolve
from ..repo.repository import (
    MANIFEST,
    TRAILER_FORMAT,
    TRAILER_VERSION,
    Repository,
    Sealed,
    image_digest_of,
    read_content,
    sealed_of,
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
                rb"|/usr/lib/modules/[^/ \n]+/(?:vmlinuz|initramfs\.img)"
                rb"|/boot/(?:vmlinuz-|initrd\.img-|initramfs-)[^/ \n]+")
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
    # A sealed release: what boots is its UKI, not the kernel and initramfs above.
    sealed: Sealed | None = None


def load_commit(repo: Repository, rev: str, kver: str | None = None) -> Commit:
    """Read a commit for deploying, with its newest kernel or kernel `kver` (see
    find_kernel); a sealed commit's is its UKI's by default.  Only the paths deploying
    uses are parsed, so the time taken hardly grows with the size of the tree."""
    c = repo.resolve(rev)
    cid = str(c.id)
    sealed = sealed_of(c)
    if sealed is not None and kver is None:
        kver = uname_of(repo, sealed, cid)
    data = manifest_of_commit(c)
    root = dumpfile.parse_paths(data, DEPLOY_PATHS)
    for d in (b"/etc", b"/var", b"/sysroot"):
        e = lookup(root, d)
        if not isinstance(e, Inode) or not e.is_dir():
            raise DeployUsageError(f"commit {cid[:12]} has no {d.decode()} directory (a root filesystem needs it)")
    kver, kernel, initramfs = find_kernel(root, cid, kver)
    t = trailers(c.message)
    fmt = t.get(TRAILER_FORMAT, "0")
    # The version is text of the commit that goes into records and titles: one plain line.
    version = bootloader.clean_title(t[TRAILER_VERSION]) or None if TRAILER_VERSION in t else None
    return Commit(cid, data, root, image_digest_of(c), int(fmt) if fmt.isdigit() else 0,
                  version, kver, kernel, initramfs, sealed)


def sealed_uki(repo: Repository, sealed: Sealed, cid: str) -> str:
    """Where a sealed commit's UKI object is; an integrity error if it is missing."""
    path = repo.objects.path_of(sealed.uki)
    if not os.path.isfile(path):
        raise DeployIntegrityError(f"commit {cid[:12]}: its sealed UKI {sealed.uki.hex()} is missing",
                                   hint="pull it again, or run `cfsdeploy fsck`")
    return path


def uname_of(repo: Repository, sealed: Sealed, cid: str) -> str:
    """The kernel version a sealed commit's UKI names (.uname), checked as a kver."""
    path = sealed_uki(repo, sealed, cid)
    raw = uki.sections(path, [uki.UNAME]).get(uki.UNAME)
    try:
        return bootloader.check_kver(raw.decode("ascii") if raw else "")
    except (UnicodeDecodeError, bootloader.BootError):
        raise DeployIntegrityError(f"commit {cid[:12]}: its sealed UKI names no plain kernel version "
                                   f"(.uname {raw!r})") from None


def cmdline_problem(cmdline: str, image: bytes) -> str | None:
    """Why a UKI's command line does not seal `image`, or None: it must name it in
    exactly one cfsdeploy.digest=, require verity, and name no deployment."""
    words = kargs.split(cmdline)
    values = {own: [v for w in words for k, v in [kargs.param(w)] if k == own] for own in kargs.OWN}
    if values[kargs.DEPLOYMENT]:
        return f"its command line names a deployment ({kargs.DEPLOYMENT}=)"
    if values[kargs.DIGEST] != [image.hex()]:
        named = ", ".join(str(v) for v in values[kargs.DIGEST]) or "none"
        return f"its command line names image {named}, not the commit's {image.hex()}"
    if values[kargs.VERITY] != ["require"]:
        return f"its command line does not say {kargs.VERITY}=require"
    return None


def check_seal(c: Commit, path: str) -> None:
    """Refuse a sealed commit's UKI (at `path`) unless its command line boots this
    commit's image, sealed: cfsdeploy.digest= its image and cfsdeploy.verity=require once
    each, no cfsdeploy= (whose absence makes the boot sealed), and its .uname the kernel
    deployed.  A seal that does not match its commit is never installed."""
    cmdline = uki.cmdline_of(path)
    if cmdline_problem(cmdline, c.image_digest) is not None:
        words = kargs.split(cmdline)
        raise DeployIntegrityError(f"commit {c.id[:12]}: its sealed UKI's command line does not seal its "
                                   f"image {c.image_digest.hex()} with {kargs.VERITY}=require (it has "
                                   f"{', '.join(w for w in words if kargs.key(w) in kargs.OWN) or 'none'}); "
                                   "refusing to install it")
    raw = uki.sections(path, [uki.UNAME]).get(uki.UNAME)
    if raw != c.kver.encode():
        raise DeployUsageError(f"commit {c.id[:12]}: its sealed UKI boots kernel "
                               f"{(raw or b'').decode('ascii', 'replace')}, not {c.kver}")


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


@dataclass(frozen=True)
class KernelSource:
    """Where one layout puts a kernel of version {kver} and its initramfs; the first
    initramfs name that exists is the kernel's."""
    directory: bytes
    kernel: bytes
    initramfs: tuple[bytes, ...]


# The search order (docs/architecture.md, "Kernels"): a kernel version found in
# several layouts is taken from the first that has both files.
KERNEL_SOURCES = (
    KernelSource(b"/usr/lib/modules", b"/usr/lib/modules/{kver}/vmlinuz",  # Fedora, Arch, bootc images
                 (b"/usr/lib/modules/{kver}/initramfs.img",)),
    KernelSource(b"/boot", b"/boot/vmlinuz-{kver}",
                 (b"/boot/initrd.img-{kver}",                               # Debian, Ubuntu
                  b"/boot/initramfs-{kver}.img")),                          # dracut's default name
)


def version_key(kver: str) -> tuple[tuple[tuple[int, int, str], ...], str]:
    """Kernel versions in natural order, as `sort -V` mostly does: runs of digits compare as
    numbers, other runs character by character, a version before its own extensions
    (6.12.9 < 6.12.10 < 6.12.10-rt); the whole string breaks the ties (01 and 1)."""
    runs = tuple((0, int(r), "") if r.isdigit() else (1, 0, r) for r in re.findall(r"\d+|\D+", kver))
    return runs, kver


def _file(root: Inode, path: bytes) -> Inode | None:
    e = lookup(root, path)
    node = resolve(e) if e is not None else None
    return node if node is not None and node.is_reg() else None


def _kernel_versions(root: Inode, src: KernelSource) -> list[bytes]:
    """The versions whose kernel file this layout's directory names."""
    d = lookup(root, src.directory)
    if not isinstance(d, Inode) or not d.children:
        return []
    prefix, _, suffix = src.kernel.rpartition(b"/")[2].partition(b"{kver}")
    if src.kernel.endswith(b"/vmlinuz"):  # one directory per version
        return [name for name in d.children if _file(root, src.kernel.replace(b"{kver}", name))]
    return [name[len(prefix):len(name) - len(suffix)] for name in d.children
            if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix)
            and _file(root, src.directory + b"/" + name)]


@dataclass(frozen=True)
class KernelPair:
    kernel: Inode
    initramfs: Inode
    initramfs_path: bytes


@dataclass
class Kernels:
    """The kernels a tree holds, by version (see find_kernel)."""
    found: dict[str, KernelPair]
    lonely: set[str]                       # kernels with no initramfs in their layout
    invalid: list[tuple[str, str]]         # path and version of kernels whose version is no plain version


def kernels_of(root: Inode) -> Kernels:
    """Every kernel of KERNEL_SOURCES in a tree, paired with its initramfs."""
    out = Kernels({}, set(), [])
    for src in KERNEL_SOURCES:
        for raw in _kernel_versions(root, src):
            name = raw.decode("ascii", errors="replace")
            # The name becomes a directory of the boot directory and a line of the entry.
            if not bootloader.KVER.fullmatch(name) or ".." in name:
                out.invalid.append((src.kernel.replace(b"{kver}", raw).decode(errors="replace"), name))
                continue
            if name in out.found:
                continue
            initrd = next(((path, n) for p in src.initramfs
                           if (n := _file(root, path := p.replace(b"{kver}", raw)))), None)
            kernel = _file(root, src.kernel.replace(b"{kver}", raw))
            if initrd is None or kernel is None:  # (the kernel is a file: _kernel_versions)
                out.lonely.add(name)
                continue
            out.found[name] = KernelPair(kernel, initrd[1], initrd[0])
    out.lonely -= set(out.found)
    return out


def searched(kver: str = "<kver>") -> list[str]:
    """The paths find_kernel looks at, in its order."""
    return [p.decode().replace("{kver}", kver) for s in KERNEL_SOURCES for p in (s.kernel, *s.initramfs)]


def newest(k: Kernels) -> str | None:
    return max(k.found, key=version_key, default=None)


def find_kernel(root: Inode, cid: str, kver: str | None = None) -> tuple[str, Inode, Inode]:
    """The kernel to boot and its initramfs: the newest version (version_key) that has
    both in one layout of KERNEL_SOURCES, or version `kver`."""
    if kver is not None:
        try:
            bootloader.check_kver(kver)
        except bootloader.BootError as e:
            raise DeployUsageError(f"--kver: {e}") from None
    k = kernels_of(root)
    for path, name in k.invalid:
        try:
            bootloader.check_kver(name)
        except bootloader.BootError as e:
            raise DeployUsageError(f"commit {cid[:12]}, {path}: {e}") from None
    chosen = kver if kver is not None else newest(k)
    if chosen is None or chosen not in k.found:
        which = f"kernel {kver}" if kver is not None else "kernel"
        without = f"; without an initramfs: {', '.join(sorted(k.lonely, key=version_key))}" if k.lonely else ""
        others = f"; it has {', '.join(sorted(k.found, key=version_key))}" if k.found else ""
        raise DeployUsageError(f"commit {cid[:12]} has no {which} with an initramfs "
                               f"(searched {', '.join(searched(kver or '<kver>'))}){without}{others}")
    return chosen, k.found[chosen].kernel, k.found[chosen].initramfs


def check_objects(repo: Repository, c: Commit) -> None:
    needed = dumpfile.external_digests(c.manifest) | ({c.sealed.uki} if c.sealed else set())
    missing = sorted(d.hex() for d in repo.objects.missing(needed))
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
