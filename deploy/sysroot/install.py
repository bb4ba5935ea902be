"""Install a machine: a disk (or image file) partitioned, formatted and holding a
sysroot with one deployment, or a sysroot laid into filesystems already made.

to-disk writes a GPT with the Discoverable Partitions Specification types: an ESP
with systemd-boot and a root partition.  The ESP is never mounted: it is built in a
sparse file with mkfs.vfat and filled with mtools (this host may lack vfat), then
copied into its partition.  The root filesystem is made on a loop device over the
root partition's range, so a block device and an image file take the same path,
and mounted to lay the sysroot out.  See docs/architecture.md, "Installing".
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

from ..boot import kargs as kargs_
from ..composefs.mounts import attach_loop
from ..remote import remotes
from ..remote.pull import PullOptions, pull
from ..repo.repository import Repository, sealed_of
from ..util.errors import BusyError, CfsError, CommandHostError, HostError, UsageError
from ..util.fsutil import syncfs
from ..util.run import package_of, run, which
from .deploy import DeployResult, deploy
from .layout import Sysroot, check_os_name, deployment_json
from .lint import Finding, has_errors, lint_commit

MIB = 1024 * 1024
# Partitions start on MiB boundaries; the GPT's backup at the end takes the last one.
ALIGN = MIB
DEFAULT_ESP_SIZE = 512 * MIB
MIN_ROOT_SIZE = 256 * MIB
# FAT32 needs 65525 clusters; with 512-byte ones (mkfs.vfat's choice here) 33 MiB
MIN_ESP_SIZE = 64 * MIB
ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"


@dataclass(frozen=True)
class Arch:
    """What depends on the host's architecture: the DPS root type and the EFI names."""
    root_type: str
    efi: str


ARCHES = {
    "x86_64": Arch("4f68bce3-e8cd-4db1-96e7-fbcaf984b709", "x64"),
    "aarch64": Arch("b921b045-1df0-41c3-af44-4c6f280d3fae", "aa64"),
}
SYSTEMD_BOOT_DIR = "/usr/lib/systemd/boot/efi"
LOADER_CONF = b"timeout 3\neditor no\n"
# The remote an installed machine follows for upgrades
REMOTE = "origin"
# Where the installed machine mounts its ESP, and so the sysroot's boot directory
BOOT_DIR = "/boot"


class InstallError(CfsError):
    """The target, the source or the options do not allow an install."""


class InstallUsageError(InstallError, UsageError):
    pass


class InstallBusyError(InstallError, BusyError):
    pass


class InstallHostError(InstallError, HostError):
    pass


class LintFailedError(InstallError):
    def __init__(self, rev: str, findings: list[Finding]) -> None:
        errors = [f for f in findings if has_errors([f])]
        first = errors[0]
        where = f"{first.path}: " if first.path else ""
        count = f"{len(errors)} error{'s' if len(errors) > 1 else ''}"
        super().__init__(f"{rev}: fails lint, {count}, first {where}{first.rule.value}",
                         hint="see `cfsdeploy lint`")
        self.findings = findings


class FsType(Enum):
    EXT4 = "ext4"
    XFS = "xfs"


@dataclass(frozen=True)
class Source:
    """Where the commit comes from: a URL (file://REPO for a local repository) and
    the branch to deploy; key_files trusted (none: unsigned commits accepted)."""
    url: str
    branch: str
    key_files: tuple[str, ...] = ()
    # the local repository, linted before anything is written
    local_repo: str | None = None


@dataclass(frozen=True)
class Options:
    os_name: str
    update_url: str | None = None
    esp_size: int = DEFAULT_ESP_SIZE
    fs: FsType = FsType.EXT4
    kargs: tuple[str, ...] = ()
    console: str | None = None
    by_label: bool = False
    tries: int = 0
    verity: str | None = None


@dataclass(frozen=True)
class Phase:
    """A step of to_disk and its wall time: check, partition, mkfs (with the loop
    device and the mount), pull (sysroot init, remote, the commit brought in), deploy
    (until the root is unmounted), esp, sync; together the whole install."""
    name: str
    seconds: float

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "seconds": round(self.seconds, 3)}


class _Clock:
    """Phases, each timed from the end of the one before."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []
        self._since = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.phases.append(Phase(name, now - self._since))
        self._since = now


@dataclass(frozen=True)
class DiskResult:
    target: str
    esp_uuid: str
    root_uuid: str
    kargs: tuple[str, ...]
    deployed: DeployResult
    phases: tuple[Phase, ...]

    def to_json(self) -> dict[str, object]:
        return {"target": self.target, "esp_uuid": self.esp_uuid, "root_uuid": self.root_uuid,
                "kargs": list(self.kargs), "deployment": deployment_json(self.deployed.deployment),
                "phases": [p.to_json() for p in self.phases]}


@dataclass(frozen=True)
class FilesystemResult:
    root: str
    kargs: tuple[str, ...]
    deployed: DeployResult


ROOT_LABEL = "root"


def host_arch() -> Arch:
    machine = platform.machine()
    if machine not in ARCHES:
        raise InstallHostError(f"no Discoverable Partitions root type known for {machine}")
    return ARCHES[machine]


def _need(commands: Sequence[str]) -> None:
    """Every command the install runs, checked before anything is written."""
    for name in commands:
        if which(name) is None:
            package = package_of(name)
            raise CommandHostError(f"{name}: command not found",
                                   hint=f"install package {package}?" if package else None)


def _mkfs(fs: FsType) -> list[str]:
    if fs == FsType.XFS:
        return ["mkfs.xfs", "-q", "-L", ROOT_LABEL]
    # fs-verity needs the block size to be the page size
    return ["mkfs.ext4", "-q", "-O", "verity", "-b", "4096", "-L", ROOT_LABEL]


def _in_use(target: str, st: os.stat_result) -> str | None:
    """Why target cannot be written now, or None."""
    if stat.S_ISBLK(st.st_mode):
        try:
            # O_EXCL on a block device fails while it or a partition is mounted or held
            os.close(os.open(target, os.O_RDONLY | os.O_EXCL))
        except OSError:
            return "is mounted or in use"
        return None
    held = run(["losetup", "--noheadings", "--output", "NAME", "--associated", target], capture=True).stdout
    if held.strip():
        return f"is in use by {held.decode(errors='replace').split()[0]}"
    return None


def _signatures(target: str) -> list[str]:
    out = run(["wipefs", "--noheadings", "--output", "TYPE", target], capture=True).stdout
    return [line.strip() for line in out.decode(errors="replace").splitlines() if line.strip()]


def _size(target: str, st: os.stat_result) -> int:
    if stat.S_ISBLK(st.st_mode):
        with open(target, "rb") as f:
            return f.seek(0, os.SEEK_END)
    return st.st_size


@contextlib.contextmanager
def _mounted(dev: str, fs: FsType) -> Iterator[str]:
    mnt = tempfile.mkdtemp(prefix="cfsdeploy-install.")
    try:
        try:
            run(["mount", "-t", fs.value, dev, mnt], capture=True)
        except CfsError as e:
            raise HostError(f"cannot mount the new {fs.value} root filesystem: {e}",
                            hint=f"this kernel needs {fs.value} support to install onto it") from None
        try:
            yield mnt
        finally:
            run(["umount", mnt])
    finally:
        os.rmdir(mnt)


def _mtools(*argv: str) -> None:
    # the image has no partition table or geometry mtools would check
    run(argv, env=dict(os.environ, MTOOLS_SKIP_CHECK="1"), capture=True)


def _populate(sysroot_path: str, boot_dir: str, staging: str, source: Source, opts: Options,
              kargs: list[str], say: Callable[[str], None],
              lap: Callable[[str], None] = lambda _: None) -> tuple[DeployResult, bytes | None]:
    """sysroot init (boot_dir: where the machine mounts its ESP), the remote the
    machine follows, the commit brought in (then lap("pull")), deployed with its
    entry and kernel written to staging (the ESP as the host has it).  With the
    deployment, a sealed commit's boot loader: firmware under Secure Boot starts
    only what the release's key signed, not this host's systemd-boot."""
    Sysroot.init(sysroot_path, opts.os_name, boot_dir=boot_dir, karg_list=kargs, tries=opts.tries)
    s = Sysroot(sysroot_path, boot_dir=staging)
    repo = s.repo
    remotes.add(repo, REMOTE, opts.update_url or source.url, key_files=source.key_files,
                gpg_verify=bool(source.key_files), branch=source.branch)
    say(f"pulling {source.branch} from {source.url}")
    r = pull(repo, REMOTE, source.branch, options=PullOptions(), url=source.url)
    rev = f"{REMOTE}/{source.branch}"
    if source.local_repo is None:
        # a local repository was linted before anything was written
        _lint(repo, rev)
    lap("pull")
    say(f"deploying {r.commit[:12]}")
    deployed = deploy(s, rev, os_name=opts.os_name, tries=opts.tries or None, verity=opts.verity)
    sealed = sealed_of(repo.resolve(r.commit))
    if sealed is None:
        return deployed, None
    with open(repo.objects.path_of(sealed.loader), "rb") as f:
        return deployed, f.read()


def _lint(repo: Repository, rev: str) -> None:
    findings = lint_commit(repo, rev)
    if has_errors(findings):
        raise LintFailedError(rev, findings)


def _cmdline(root: str, opts: Options) -> list[str]:
    """The first entry's kernel arguments, checked (with the os name) before
    anything is written."""
    check_os_name(opts.os_name)
    args = [root, "rw", *([f"console={opts.console}"] if opts.console else []), *opts.kargs]
    return kargs_.check_line([kargs_.check(a) for a in args])


def to_disk(target: str, source: Source, opts: Options, *, size: int | None = None, wipe: bool = False,
            say: Callable[[str], None] = lambda _: None) -> DiskResult:
    """Partition, format and install target (a block device, or an image file,
    created sparse of `size` bytes when it does not exist)."""
    clock = _Clock()
    # absolute: never read as an option by the commands it is given to
    target = os.path.abspath(target)
    arch = host_arch()
    tools = ["sfdisk", "wipefs", "losetup", "mkfs.vfat", "mcopy", "dd", "fallocate", "sync", "mount", "umount",
             _mkfs(opts.fs)[0]]
    _need(tools)
    systemd_boot = _systemd_boot(arch)
    if source.local_repo is not None:
        _lint(Repository(source.local_repo), source.branch)

    created = False
    try:
        st = os.stat(target)
    except FileNotFoundError:
        if size is None:
            raise InstallUsageError(f"{target}: no such file",
                                    hint="give a size (--size) to create an image file") from None
        st = None
    if st is not None:
        if size is not None:
            raise InstallUsageError(f"{target}: exists, and a size is only for a new image file")
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise InstallUsageError(f"{target}: neither a block device nor an image file")
        if why := _in_use(target, st):
            raise InstallBusyError(f"{target}: {why}")
        if (found := _signatures(target)) and not wipe:
            raise InstallUsageError(f"{target}: holds {', '.join(found)}", hint="--wipe to overwrite it")
        total = _size(target, st)
    else:
        assert size is not None
        total = size
    if opts.esp_size < MIN_ESP_SIZE or opts.esp_size % ALIGN:
        raise InstallUsageError(f"ESP size {opts.esp_size // MIB} MiB: must be whole MiB, at least "
                                f"{MIN_ESP_SIZE // MIB} MiB (FAT32)")
    esp_start = ALIGN
    root_start = esp_start + opts.esp_size
    root_size = (total - ALIGN - root_start) // ALIGN * ALIGN
    if root_size < MIN_ROOT_SIZE:
        need = (root_start + MIN_ROOT_SIZE + ALIGN) // MIB
        raise InstallUsageError(f"{target}: too small: {total // MIB} MiB, needs at least {need} MiB")

    block = st is not None and stat.S_ISBLK(st.st_mode)
    esp_uuid, root_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    kargs = _cmdline(f"root=LABEL={ROOT_LABEL}" if opts.by_label else f"root=PARTUUID={root_uuid}", opts)

    clock.lap("check")
    if st is None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        created = True
        try:
            os.ftruncate(fd, total)
        finally:
            os.close(fd)
    partitioned = False
    try:
        if wipe:
            run(["wipefs", "--all", "--force", "--quiet", target])
        # from here the partition table on target may be this one
        partitioned = True
        # in MiB, which sfdisk reads as bytes whatever the device's sector size
        run(["sfdisk", "--quiet", "--wipe", "always", target], input=(
            "label: gpt\n"
            f"start={esp_start // MIB}MiB, size={opts.esp_size // MIB}MiB, type={ESP_TYPE}, uuid={esp_uuid}, "
            "name=esp\n"
            f"start={root_start // MIB}MiB, size={root_size // MIB}MiB, type={arch.root_type}, uuid={root_uuid}, "
            f"name={ROOT_LABEL}\n").encode(), capture=True)
        clock.lap("partition")
        with tempfile.TemporaryDirectory(prefix="cfsdeploy-install.") as work:
            staging = os.path.join(work, "boot")
            os.mkdir(staging)
            # 512-byte sectors, as the disk has them; detached once unmounted and closed
            with attach_loop(target, read_only=False, block_size=512, offset=root_start,
                             size_limit=root_size) as loop:
                dev = loop.path
                say(f"making the {opts.fs.value} root filesystem")
                run([*_mkfs(opts.fs), dev], capture=True)
                with _mounted(dev, opts.fs) as mnt:
                    clock.lap("mkfs")
                    deployed, loader = _populate(mnt, BOOT_DIR, staging, source, opts, kargs, say, clock.lap)
            clock.lap("deploy")
            say("writing the ESP")
            _boot_files(staging, loader or _read(systemd_boot), arch)
            if not created and not block:
                # what was there before reads as zeros, as the sparse copy needs
                run(["fallocate", "--punch-hole", "--offset", str(esp_start), "--length", str(opts.esp_size),
                     target])
            _write_esp(target, esp_start, opts.esp_size, staging, os.path.join(work, "esp.img"), sparse=not block)
        clock.lap("esp")
        run(["sync"])
        clock.lap("sync")
        return DiskResult(target, esp_uuid, root_uuid, tuple(kargs), deployed, tuple(clock.phases))
    except BaseException:
        # nothing half-written: an image made here goes, a partition table made here is wiped
        if created:
            os.unlink(target)
        elif partitioned:
            run(["wipefs", "--all", "--force", "--quiet", target], check=False)
        raise


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _boot_files(boot: str, systemd_boot: bytes, arch: Arch) -> None:
    """systemd-boot (where firmware looks by itself, and as bootctl puts it) and
    loader.conf, where the boot directory does not have them yet."""
    for rel in (os.path.join("EFI", "BOOT", f"BOOT{arch.efi.upper()}.EFI"),
                os.path.join("EFI", "systemd", f"systemd-boot{arch.efi}.efi")):
        dest = os.path.join(boot, rel)
        if not os.path.exists(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "xb") as f:
                f.write(systemd_boot)
    loader = os.path.join(boot, "loader", "loader.conf")
    if not os.path.exists(loader):
        os.makedirs(os.path.dirname(loader), exist_ok=True)
        with open(loader, "wb") as f:
            f.write(LOADER_CONF)
    # a mounted ESP (to-filesystem) has them on the disk before install returns
    syncfs(boot)


def _systemd_boot(arch: Arch) -> str:
    path = os.path.join(SYSTEMD_BOOT_DIR, f"systemd-boot{arch.efi}.efi")
    if not os.path.isfile(path):
        raise CommandHostError(f"{path}: not found", hint="install package systemd-boot-efi?")
    return path


def _write_esp(target: str, start: int, size: int, staging: str, image: str, *, sparse: bool) -> None:
    """A FAT32 ESP holding staging's files, made in a file with mtools (no vfat
    mount needed) and copied into its partition; sparse (zeros skipped) only where
    the partition reads as zeros already, else the old FAT's entries would stay."""
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    run(["mkfs.vfat", "-F", "32", "-n", "ESP", image], capture=True)
    _mtools("mcopy", "-s", "-i", image, *sorted(os.path.join(staging, n) for n in os.listdir(staging)), "::/")
    run(["dd", f"if={image}", f"of={target}", "bs=1M", f"seek={start // MIB}",
         "conv=notrunc,sparse" if sparse else "conv=notrunc", "status=none"])


def to_filesystem(root: str, boot_dir: str, source: Source, opts: Options, *, root_karg: str | None = None,
                  say: Callable[[str], None] = lambda _: None) -> FilesystemResult:
    """Install into an already mounted root with the ESP mounted at boot_dir (layouts
    the builder made: LVM, LUKS, RAID); root= from findmnt unless root_karg is given."""
    arch = host_arch()
    systemd_boot = _systemd_boot(arch)
    for path in (root, boot_dir):
        if not os.path.isdir(path):
            raise InstallUsageError(f"{path}: not a directory")
    if os.path.exists(os.path.join(root, "cfsdeploy")):
        raise InstallUsageError(f"{root}: holds a sysroot already")
    if source.local_repo is not None:
        _lint(Repository(source.local_repo), source.branch)
    if root_karg is None:
        _need(["findmnt"])
        out = run(["findmnt", "--noheadings", "--output", "SOURCE", "--mountpoint", os.path.abspath(root)],
                  capture=True, check=False).stdout.decode(errors="replace").split()
        if not out:
            raise InstallUsageError(f"{root}: not a mount point", hint="name the root with --root-karg")
        # a btrfs subvolume shows as DEVICE[/SUBVOL]; root= names the device
        root_karg = f"root={out[0].split('[', 1)[0]}"
    kargs = _cmdline(root_karg, opts)
    # the machine mounts the ESP where it is below root now, else on /boot
    rel = os.path.relpath(os.path.abspath(boot_dir), os.path.abspath(root))
    machine_boot = BOOT_DIR if rel.startswith("..") else "/" + rel
    try:
        deployed, loader = _populate(root, machine_boot, boot_dir, source, opts, kargs, say)
    except BaseException:
        # nothing half-written: the sysroot was not there before (checked above)
        shutil.rmtree(os.path.join(root, "cfsdeploy"), ignore_errors=True)
        raise
    _boot_files(boot_dir, loader or _read(systemd_boot), arch)
    return FilesystemResult(root, tuple(kargs), deployed)

