"""Sealing a commit as it is made: its signed Unified Kernel Image and boot loader.

A sealed commit (docs/architecture.md, "Sealed releases") names two objects beside its
image, in trailers its signature covers:

    Cfsdeploy-Sealed-UKI     the tree's systemd-stub with
                               .osrel    the tree's os-release
                               .cmdline  root=LABEL=root rw cfsdeploy.digest=<image hex>
                                         cfsdeploy.verity=require [the vendor's arguments]
                               .uname    the kernel's version
                               .initrd   the commit's initramfs
                               .linux    the commit's kernel
                             signed with the vendor's Secure Boot key (sbsign)
    Cfsdeploy-Sealed-Loader  the tree's systemd-boot, signed with the same key

The command line names the commit's image, which the UKI is not part of (no file can
hold its own digest), and no deployment (no cfsdeploy=): the boot finds that through
SYSROOT/cfsdeploy/by-digest/<image hex>.  Nothing of the build machine is stored: the
key and certificate are only read, by sbsign.

make_sealer() checks what it can before the (slow) commit starts: the key and
certificate files, the vendor's arguments, the kernel version asked for.  The tree is
read from the manifest the commit's scan made and the objects it stored (some still
staged in the commit's transaction), each checked against its digest.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Sequence

import pygit2

from ..boot import bootloader, kargs, uki
from ..composefs import fsverity
from ..composefs.fsverity import Digest
from ..composefs.tree import Inode, lookup, resolve
from ..repo.repository import Repository, Sealed, Sealer, image_digest_of, sealed_of
from ..util.errors import CfsError, IntegrityError, NotFoundError, UsageError
from .commit import cmdline_problem, kernels_of, newest, searched, version_key

EFI_DIR = "/usr/lib/systemd/boot/efi"
# systemd's names of the UEFI architectures; a tree's stub is taken in this order.
EFI_ARCHS = ("x64", "aa64", "ia32", "arm", "riscv64", "loongarch64")
STUB = EFI_DIR + "/linux{arch}.efi.stub"
LOADER = EFI_DIR + "/systemd-boot{arch}.efi"
OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")  # os-release(5)'s order
# The root file system install labels `root`; a vendor's root= takes its place.
DEFAULT_ROOT = "root=LABEL=root"
MAX_SYMLINKS = 8  # the kernel's 40 is for whole paths; os-release needs one
MAX_PEM = 1 << 20


class SealError(CfsError):
    pass


class SealUsageError(SealError, UsageError):
    """What a commit is to be sealed with, or its tree, cannot make a sealed release."""


class SealNotFoundError(SealError, NotFoundError):
    """The key or certificate file is not there."""


class SealIntegrityError(SealError, IntegrityError):
    """What seals a commit is missing, corrupt, or does not seal the commit's image."""


def check_kargs(extra: Sequence[str]) -> list[str]:
    """The vendor's arguments for a sealed command line, checked: each a plain kernel
    argument, none of cfsdeploy's (any cfsdeploy* key: the hook reads a second one
    as an attempt to override), all of them fitting beside cfsdeploy's own."""
    for arg in extra:
        # However the quotes are read (see kargs.check), no piece may be cfsdeploy's.
        if any(piece.partition("=")[0].startswith(kargs.DEPLOYMENT) for piece in arg.replace('"', " ").split()):
            raise SealUsageError(f"sealed kernel argument {arg!r}: the cfsdeploy arguments of a sealed "
                                 "UKI are cfsdeploy's own")
        try:
            kargs.check(arg)
        except kargs.KargsError as e:
            raise SealUsageError(f"sealed kernel argument: {e}") from None
    try:
        return kargs.check_line(list(extra))
    except kargs.KargsError as e:
        raise SealUsageError(f"sealed kernel arguments: {e}") from None


def sealed_cmdline(image: Digest, extra: Sequence[str] = ()) -> str:
    """The command line of the UKI that seals `image`: root= (the vendor's, if given,
    in the default's place), rw, cfsdeploy's two, then the vendor's others in order."""
    roots = [a for a in extra if kargs.key(a) == "root"] or [DEFAULT_ROOT]
    rest = [a for a in extra if kargs.key(a) != "root"]
    return " ".join([*roots, "rw", f"{kargs.DIGEST}={image.hex()}", f"{kargs.VERITY}=require", *rest])


def uki_problem(path: str, image: Digest) -> str | None:
    """Why the UKI at path does not seal `image` (see cmdline_problem), or None."""
    try:
        return cmdline_problem(uki.cmdline_of(path), image)
    except uki.UkiError as e:
        return str(e)


def _pem(path: str, what: str, marker: bytes) -> None:
    """A readable regular file holding a PEM block with `marker` (a certificate and key
    given the wrong way round fail here, not after the commit's scan)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SealNotFoundError(f"Secure Boot {what} {path}: no such file") from None
    except OSError as e:
        raise SealUsageError(f"Secure Boot {what} {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SealUsageError(f"Secure Boot {what} {path}: not a regular file")
        head = os.read(fd, MAX_PEM)
    except OSError as e:
        raise SealUsageError(f"Secure Boot {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if marker not in head:
        raise SealUsageError(f"Secure Boot {what} {path}: no PEM {what} in it")


def make_sealer(repo: Repository, key: str, cert: str, *, kargs: Sequence[str] = (),
                kver: str | None = None) -> Sealer:
    """A sealer for Repository.commit: it makes, signs with key and cert (PEM files)
    and stores the commit's UKI (kernel `kver`, default the newest) and loader."""
    _pem(key, "key", b"PRIVATE KEY-----")
    _pem(cert, "certificate", b"-----BEGIN CERTIFICATE-----")
    extra = check_kargs(kargs)
    if kver is not None:
        try:
            bootloader.check_kver(kver)
        except bootloader.BootError as e:
            raise SealUsageError(f"kernel to seal: {e}") from None
    key, cert = os.path.abspath(key), os.path.abspath(cert)

    def seal(root: Inode, image: Digest) -> Sealed:
        return _Seal(repo, root).make(image, key, cert, extra, kver)

    return seal


class _Seal:
    """The files of one tree a seal is made of, read from its manifest and objects."""

    def __init__(self, repo: Repository, root: Inode) -> None:
        self.repo = repo
        self.root = root

    def make(self, image: Digest, key: str, cert: str, extra: list[str], kver: str | None) -> Sealed:
        stub, loader = self._boot_files()
        kver, kernel, initrd = self._kernel(kver)
        os_release = self._os_release()
        with tempfile.TemporaryDirectory(prefix="seal-", dir=os.path.join(self.repo.path, "tmp")) as scratch:
            def path(where: str, node: Inode) -> str:
                if node.content is None and node.size:
                    return self._object(where, node)
                inline = os.path.join(scratch, os.path.basename(where))  # (64 bytes at most)
                with open(inline, "wb") as f:
                    f.write(node.content or b"")
                return inline

            made = os.path.join(scratch, "uki.efi")
            uki.build(path(*stub), path(*kernel), path(*initrd), sealed_cmdline(image, extra), os_release,
                      made, uname=kver)
            signed_uki, signed_loader = os.path.join(scratch, "uki.signed"), os.path.join(scratch, "loader.signed")
            uki.sign(made, key, cert, signed_uki)
            os.unlink(made)  # a kernel and initramfs less on the disk
            uki.sign(path(*loader), key, cert, signed_loader)
            return Sealed(self._store(signed_uki), self._store(signed_loader))

    def _regular(self, path: str) -> Inode | None:
        e = lookup(self.root, path.encode())
        node = resolve(e) if e is not None else None
        return node if node is not None and node.is_reg() else None

    def _boot_files(self) -> tuple[tuple[str, Inode], tuple[str, Inode]]:
        """The tree's systemd-stub and the systemd-boot of the same architecture."""
        for arch in EFI_ARCHS:
            stub_path = STUB.format(arch=arch)
            if (stub := self._regular(stub_path)) is None:
                continue
            loader_path = LOADER.format(arch=arch)
            if (loader := self._regular(loader_path)) is None:
                raise SealUsageError(f"the tree has {stub_path} but no boot loader {loader_path} "
                                     "(systemd-boot) to seal")
            return (stub_path, stub), (loader_path, loader)
        raise SealUsageError(f"the tree has no systemd-stub to make a UKI of (searched "
                             f"{STUB.format(arch='{' + ','.join(EFI_ARCHS) + '}')})")

    def _kernel(self, kver: str | None) -> tuple[str, tuple[str, Inode], tuple[str, Inode]]:
        """The kernel deploy would boot (sysroot/commit.py's search), or kernel kver."""
        k = kernels_of(self.root)
        chosen = kver if kver is not None else newest(k)
        if chosen is None or chosen not in k.found:
            which = f"kernel {kver}" if kver is not None else "kernel"
            others = f"; it has {', '.join(sorted(k.found, key=version_key))}" if k.found else ""
            raise SealUsageError(f"the tree has no {which} with an initramfs to seal "
                                 f"(searched {', '.join(searched(kver or '<kver>'))}){others}")
        pair = k.found[chosen]
        kernel_path = next(p for p in searched(chosen) if self._regular(p) is pair.kernel)
        return chosen, (kernel_path, pair.kernel), (pair.initramfs_path.decode(), pair.initramfs)

    def _os_release(self) -> bytes:
        """The tree's os-release, symlinks followed inside the tree only: an absolute
        target from its root, `..` stopping there, as in a chroot."""
        for start in OS_RELEASE:
            path = start.encode()
            for _ in range(MAX_SYMLINKS + 1):
                e = lookup(self.root, path)
                node = resolve(e) if e is not None else None
                if node is None or not node.is_symlink():
                    break
                path = os.path.normpath(os.path.join(os.path.dirname(path), node.payload or b""))
            if node is None or not node.is_reg():
                continue
            if not 0 < node.size <= uki.MAX_OSREL:
                raise SealUsageError(f"{start}: {node.size} bytes of os-release (1 to {uki.MAX_OSREL})")
            if node.content is not None:
                return node.content
            with open(self._object(start, node), "rb") as f:
                return f.read(uki.MAX_OSREL)
        raise SealUsageError(f"the tree has no os-release for the UKI (searched {', '.join(OS_RELEASE)})")

    def _object(self, where: str, node: Inode) -> str:
        """The object of the tree's regular file `where` (staged or stored), checked
        against its digest."""
        found = self.repo.objects.find(node.digest) if node.digest is not None else None
        if node.digest is None or found is None:
            raise SealIntegrityError(f"{where}: the object of this file is missing")
        if fsverity.digest_file(found) != node.digest:
            raise SealIntegrityError(f"{where}: object {node.digest.hex()} is corrupt", hint="run fsck")
        return found

    def _store(self, path: str) -> Digest:
        with open(path, "rb") as f:
            return self.repo.objects.add_stream(f.read, os.fstat(f.fileno()).st_size)


def verify_seal(repo: Repository, commit: pygit2.Commit, *, cert: str | None = None) -> Sealed | None:
    """Check what seals a commit (None if it is not sealed): both objects present with
    their digests, the UKI's command line sealing the commit's image, and with cert
    (PEM), both signed by it (and a commit not sealed refused).  Damaged seal trailers
    raise TrailerError."""
    sealed = sealed_of(commit)
    cid = str(commit.id)[:12]
    if sealed is None:
        if cert is not None:  # asked whether it is sealed with cert: it is not
            raise SealIntegrityError(f"commit {cid} is not sealed")
        return None
    for what, digest in (("UKI", sealed.uki), ("loader", sealed.loader)):
        path = repo.objects.path_of(digest)
        if not os.path.exists(path):
            raise SealIntegrityError(f"commit {cid}: its sealed {what} (object {digest.hex()}) is missing",
                                     hint="pull it again")
        if fsverity.digest_file(path) != digest:
            raise SealIntegrityError(f"commit {cid}: its sealed {what} (object {digest.hex()}) is corrupt",
                                     hint="run fsck")
        if cert is not None and not uki.verify(path, cert):
            raise SealIntegrityError(f"commit {cid}: its sealed {what} is not signed by {cert}")
    why = uki_problem(repo.objects.path_of(sealed.uki), image_digest_of(commit))
    if why is not None:
        raise SealIntegrityError(f"commit {cid}: its sealed UKI does not seal its image: {why}")
    return sealed
