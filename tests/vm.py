"""Virtual machines that boot cfsdeploy deployments, for tests/test_vm.py,
examples/debian/run.sh and benchmarks/bench_boot.py.

    rootfs()        a Debian 13 root filesystem (debootstrap), built once and cached
    package()       cfsdeploy's Debian package, built from this checkout once
    make_tree()     a copy of the rootfs with the package installed by apt (its
                    initramfs hooks in a fresh initramfs) and the check unit
    builder()       the vendor: a signed repository the releases are committed to,
                    offered to the machine on a second disk (make_updates_disk)
    make_disk()     `cfsdeploy install to-disk`: a GPT disk with an ESP (systemd-boot,
                    the boot entries) and an ext4 root (fs-verity capable) holding a
                    sysroot with the vendor's release pulled and deployed
    boot()          QEMU with OVMF, no network, the serial console in a log; the check
                    unit in the guest prints `CFSDEPLOY-RESULT key=value` lines, runs
                    the boot's steps, and powers off or reboots
    Machine         a machine's life, boot after boot (first_boot ... fallback_boot)

Run as root: `python -m tests.vm demo [WORKDIR]` does it all and tells what it sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cfsdeploy.composefs import fsverity
from cfsdeploy.util import lockfile
from cfsdeploy.util.errors import CommandError
from cfsdeploy.util.run import run, which

from .pullkit import Key, drop_key, make_key

Log = Callable[[str], None]
HERE = Path(__file__).resolve().parent
TOP = HERE.parent
CACHE = Path(os.environ.get("CFSDEPLOY_VM_CACHE", "/var/tmp/cfsdeploy-vm"))
# The Debian example's steps, which the VM's tree is made with
EXAMPLE = TOP / "examples/debian"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
# OVMF built to enforce Secure Boot (with SMM), for machines whose variables enroll keys
OVMF_CODE_SECBOOT = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
HOST_TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "debootstrap": "debootstrap",
              "sfdisk": "fdisk", "mkfs.vfat": "dosfstools", "mcopy": "mtools",
              "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs",
              "fsck.vfat": "dosfstools", "mkfs.xfs": "xfsprogs"}


def missing_requirements() -> str | None:
    """Why this host cannot build and boot the VM, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, loop mounts)"
    for tool, package in HOST_TOOLS.items():
        if which(tool) is None:
            return f"{tool} missing (Debian package {package})"
    for f, package in ((OVMF_CODE, "ovmf"), (OVMF_VARS, "ovmf"), (SYSTEMD_BOOT, "systemd-boot-efi")):
        if not f.exists():
            return f"{f} missing (Debian package {package})"
    return None


def mirror() -> str:
    """The Debian mirror: $CFSDEPLOY_VM_MIRROR, else the one apt uses here."""
    if env := os.environ.get("CFSDEPLOY_VM_MIRROR"):
        return env
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for m in re.finditer(r"^URIs:\s*(\S+)", f.read_text(), re.M):
            if m[1].rstrip("/").endswith("/debian"):
                return m[1]
    return "http://deb.debian.org/debian"


# --- the cached root filesystem ------------------------------------------------------


def remove_tree(path: Path) -> None:
    """rm -rf path, after unmounting whatever an interrupted chroot left mounted below
    it (deleting through a mounted /proc or /dev is not what anyone wants)."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        below = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    for target in sorted(below, reverse=True):
        run(["umount", "-l", target], check=False)
    shutil.rmtree(path, ignore_errors=True)


def rootfs(log: Log = print) -> Path:
    """examples/debian/bootstrap.sh's Debian 13 root filesystem, built once (about 2
    minutes) into CACHE and reused while the script stays the same."""
    CACHE.mkdir(parents=True, exist_ok=True)
    script = EXAMPLE / "bootstrap.sh"
    dest = CACHE / f"rootfs-{hashlib.sha256(script.read_bytes()).hexdigest()[:12]}"
    with lockfile.hold(str(CACHE / "lock"), f"{CACHE} is locked", wait=1800):
        if dest.is_dir():
            return dest
        for stale in CACHE.glob(".rootfs-*.building"):  # what interrupted builds left
            remove_tree(stale)
        building = CACHE / f".{dest.name}.building"
        log(f"{script.relative_to(TOP)} from {mirror()} into {dest} (once; about 2 minutes)")
        run(["bash", script, building, mirror()], capture=True)
        os.rename(building, dest)
        return dest


# --- the Debian package ------------------------------------------------------------------

# What packaging/build-deb.sh builds the package from
PACKAGE_SOURCES = ("deploy", "hooks", "packaging", "pyproject.toml", "README.md")


def package(log: Log = print) -> Path:
    """cfsdeploy's Debian package built from this checkout by packaging/build-deb.sh,
    once per state of the files it is built from (cached in CACHE)."""
    h = hashlib.sha256()
    for top in PACKAGE_SOURCES:
        paths = [TOP / top] if (TOP / top).is_file() else sorted((TOP / top).rglob("*"))
        for p in paths:
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(f"{p.relative_to(TOP)}\0{p.stat().st_mode & 0o111}\0".encode())
                h.update(hashlib.sha256(p.read_bytes()).digest())
    CACHE.mkdir(parents=True, exist_ok=True)
    dest = CACHE / f"deb-{h.hexdigest()[:12]}"
    with lockfile.hold(str(CACHE / "lock"), f"{CACHE} is locked", wait=1800):
        if not dest.is_dir():
            for old in CACHE.glob("deb-*"):
                shutil.rmtree(old)
            log(f"building the Debian package into {dest}")
            building = CACHE / ".deb.building"
            shutil.rmtree(building, ignore_errors=True)
            run(["bash", TOP / "packaging/build-deb.sh", building], capture=True)
            os.rename(building, dest)
    (deb,) = dest.glob("cfsdeploy_*_all.deb")
    return deb


# --- the image tree ----------------------------------------------------------------------

CHECK_UNIT = """\
[Unit]
Description=cfsdeploy VM test: check the composed root from inside, then power off or reboot
# After systemd-bless-boot (only there on a counted boot) has blessed the entry, or not
After=multi-user.target systemd-bless-boot.service

[Service]
Type=oneshot
ExecStart=/usr/libexec/cfsdeploy-vm/check
ExecStopPost=/usr/libexec/cfsdeploy-vm/finish
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=900

[Install]
WantedBy=multi-user.target
"""
# The steps the host passes run with this directory first in PATH: their `reboot`
# only asks for one, which the unit does once the check has reported everything.
REBOOT_SHIM = b"""#!/bin/sh
# cfsdeploy VM test: reboot once the check is done (see finish)
: >/run/cfsdeploy-vm-reboot
"""
FINISH = b"""#!/bin/sh
# cfsdeploy VM test: end the boot as the steps asked (QEMU runs with -no-reboot, so
# a reboot ends the QEMU process too, and the host starts the machine again)
if [ -e /run/cfsdeploy-vm-reboot ]; then
	exec systemctl --no-block reboot
fi
exec systemctl --no-block poweroff
"""
# A release whose userspace never reaches boot-complete.target (what marks a boot
# good for boot counting): a unit boot-complete.target requires fails.
NEVER_COMPLETES = """\
[Unit]
Description=cfsdeploy VM test: this release never completes a boot
Before=boot-complete.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo "this release is broken on purpose" >&2; exit 1'
"""
# Read from inside by the check: one object each, found by content; the host
# corrupts one of them on the disk to see fs-verity refuse it.
CANARIES = ("canary-a", "canary-b")


@dataclass
class Tree:
    path: Path
    kver: str
    release: int
    # sha256 of each canary file's content, and the object that holds it
    canaries: dict[str, str]
    canary_objects: dict[str, str]


def put(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a new file (unlinking first, so no other link to the old inode changes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    path.write_bytes(data)
    path.chmod(mode)


def make_tree(dest: Path, log: Log = print) -> Tree:
    """The OS tree to commit, made as examples/debian makes one: the cached rootfs
    with cfsdeploy's Debian package installed by apt (which rebuilds the initramfs
    with its hooks; the kernel stays in /boot, where Debian puts it) and the rest of
    add-cfsdeploy.sh; plus what the tests add: the check unit and canaries."""
    base = rootfs(log)
    # A full copy, not cp -l: links into the cache would give every file a link
    # count of 2, which the manifest records.
    run(["cp", "-a", base, dest])
    (kver,) = [p.name for p in (dest / "usr/lib/modules").iterdir()]
    deb = package(log)
    log(f"add-cfsdeploy.sh: apt install {deb.name} into the tree (a new initramfs with cfsdeploy's hooks)")
    run(["bash", EXAMPLE / "add-cfsdeploy.sh", dest, deb], capture=True)
    put(dest / "usr/libexec/cfsdeploy-vm/check", (HERE / "vm_check.py").read_bytes(), 0o755)
    put(dest / "usr/libexec/cfsdeploy-vm/finish", FINISH, 0o755)
    put(dest / "usr/libexec/cfsdeploy-vm/cut-runner", (HERE / "vm_cut.py").read_bytes(), 0o755)
    put(dest / "usr/libexec/cfsdeploy-vm/bin/reboot", REBOOT_SHIM, 0o755)
    put(dest / "usr/lib/systemd/system/cfsdeploy-vm-check.service", CHECK_UNIT.encode())
    wants = dest / "etc/systemd/system/multi-user.target.wants/cfsdeploy-vm-check.service"
    wants.parent.mkdir(parents=True, exist_ok=True)
    wants.symlink_to("/usr/lib/systemd/system/cfsdeploy-vm-check.service")
    put(dest / "etc/hostname", b"cfsdeploy-vm\n")
    canaries, objects = {}, {}
    for name in CANARIES:
        data = os.urandom(65536)
        put(dest / "usr/share/cfsdeploy-vm" / name, data)
        canaries[name] = hashlib.sha256(data).hexdigest()
        objects[name] = fsverity.digest_bytes(data).hex()
    tree = Tree(dest, kver, 0, canaries, objects)
    set_release(tree, 1)
    return tree


# What each release changes, and what the guest reports back (vm_check.FILES)
RELEASE_FILE = "usr/share/cfsdeploy-vm/release"
ETC_DEFAULT = "etc/cfsdeploy-vm/release.conf"   # changes upstream in every release
ETC_EDITED = "etc/cfsdeploy-vm/local.conf"      # also edited on the machine
ETC_AFTER_STAGING = "etc/cfsdeploy-vm/after-staging.conf"  # made on the machine once an upgrade is staged
NEVER_COMPLETES_UNIT = "usr/lib/systemd/system/cfsdeploy-vm-never-completes.service"


def set_release(tree: Tree, n: int, *, boot_completes: bool = True) -> None:
    """Make the tree release n: its release file and /etc defaults say n; a release
    that does not complete its boots has a unit boot-complete.target requires fail."""
    put(tree.path / RELEASE_FILE, f"{n}\n".encode())
    put(tree.path / ETC_DEFAULT, f"release={n}\n".encode())
    put(tree.path / ETC_EDITED, f"setting=upstream-{n}\n".encode())
    unit = tree.path / NEVER_COMPLETES_UNIT
    link = tree.path / "usr/lib/systemd/system/boot-complete.target.requires" / unit.name
    for p in (unit, link):
        if p.is_symlink() or p.exists():
            p.unlink()
    if not boot_completes:
        put(unit, NEVER_COMPLETES.encode())
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"../{unit.name}")
    tree.release = n


# --- the disk ----------------------------------------------------------------------------

MIB = 1 << 20
DISK_SIZE = "4G"
OS_NAME = "debian"
BRANCH = "debian/13/x86_64/vmtest"


@dataclass
class Builder:
    """The OS vendor's build machine: a signed repository every release is committed
    to, offered to the guest as a second disk (a `file://` remote: no network)."""
    top: Path                    # what the updates disk holds: repo/ and the public key
    key: Key
    # commit's arguments that seal every release (none: releases are not sealed)
    seal: tuple[str, ...] = ()

    @property
    def repo(self) -> Path:
        return self.top / "repo"

    def commit(self, tree: Tree) -> str:
        out = cfsdeploy("commit", "--repo", self.repo, "--tree", tree.path, "--branch", BRANCH,
                        "-m", f"Debian 13 for the cfsdeploy VM test, release {tree.release}",
                        "--version", f"13.vm{tree.release}", "--sign-key", self.key.email,
                        "--gpg-homedir", self.key.home, "--lint", *self.seal)
        return out.split()[-1]


@contextlib.contextmanager
def builder(work: Path, seal: tuple[str, ...] = ()) -> Iterator[Builder]:
    key = make_key("cfsdeploy VM test builder")
    try:
        top = work / "updates"
        top.mkdir()
        cfsdeploy("init", "--repo", top / "repo")
        shutil.copyfile(key.public, top / "builder.asc")
        yield Builder(top, key, seal)
    finally:
        drop_key(key)


UPDATES_LABEL = "updates"
# Where the guest mounts the updates disk, and so the remote's URL there
UPDATES_MOUNT = "/mnt"


def make_updates_disk(b: Builder, work: Path) -> Path:
    """An ext4 disk image holding the builder's repository as it is now (made from
    the directory, without mounting)."""
    path = work / "updates.img"
    path.unlink(missing_ok=True)
    used = int(run(["du", "-sb", b.top], capture=True).stdout.split()[0])
    with open(path, "wb") as f:
        f.truncate(used * 3 // 2 + 128 * MIB)
    run(["mkfs.ext4", "-q", "-b", "4096", "-L", UPDATES_LABEL, "-d", b.top, path])
    return path


@dataclass(frozen=True)
class Part:
    """A partition's place on its disk, in bytes."""
    start: int
    size: int


def partitions(disk: Path) -> dict[str, Part]:
    """The disk's GPT partitions by name (`install to-disk` names them esp and root)."""
    table = json.loads(run(["sfdisk", "--json", disk], capture=True).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    return {p["name"]: Part(p["start"] * sector, p["size"] * sector) for p in table["partitions"]}


@dataclass
class Disk:
    path: Path
    # OVMF's variables: this machine's NVRAM, kept from boot to boot
    vars: Path
    tree: Tree | None  # None: a bare ESP (tests/secureboot.py)
    # the deployment made on the host: its deployment.json, with its os and name
    deployment: dict[str, object]
    # its firmware enforces Secure Boot with the keys its variables enroll
    secure_boot: bool = False

    @property
    def deployment_path(self) -> str:
        """What cfsdeploy= names."""
        return f"/cfsdeploy/deploy/{self.deployment['os']}/{self.deployment['name']}"


def mtools(*argv: str | Path) -> str:
    """An mtools command on a FAT image (no partition table or geometry for it to
    check); its output."""
    return run(argv, env=dict(os.environ, MTOOLS_SKIP_CHECK="1"), capture=True).stdout.decode(errors="replace")


def extract_esp(disk: Path, dest: Path) -> Path:
    """The disk's ESP copied out as a FAT image, for mtools."""
    esp = partitions(disk)["esp"]
    run(["dd", f"if={disk}", f"of={dest}", "bs=1M", f"skip={esp.start // MIB}", f"count={esp.size // MIB}",
         "conv=sparse", "status=none"])
    return dest


def replace_esp(disk: Path, image: Path) -> None:
    """Write a FAT image (extract_esp's, edited) back over the disk's ESP."""
    esp = partitions(disk)["esp"]
    assert image.stat().st_size == esp.size
    run(["dd", f"if={image}", f"of={disk}", "bs=1M", f"seek={esp.start // MIB}", "conv=notrunc", "status=none"])


def cfsdeploy(*args: str | Path) -> str:
    """The cfsdeploy command line, as a person runs it; its output."""
    return run([sys.executable, "-m", "cfsdeploy.cli", *args], capture=True).stdout.decode()


@contextlib.contextmanager
def mounted_root(disk: Path, *, readonly: bool = False) -> Iterator[Path]:
    """The disk's root partition mounted on the host (the VM must be off)."""
    root = partitions(disk)["root"]
    mnt = Path(tempfile.mkdtemp(prefix="cfsdeploy-vm-root."))
    run(["mount", "-o", f"loop,{'ro' if readonly else 'rw'},offset={root.start},sizelimit={root.size}", disk, mnt])
    try:
        yield mnt
    finally:
        run(["umount", mnt])
        mnt.rmdir()


def make_disk(tree: Tree, work: Path, b: Builder, *, verity: str | None = "try", log: Log = print) -> Disk:
    """A new machine's disk, made as its owner makes one: `cfsdeploy install to-disk`
    from the builder's repository, checked against the builder's key, following the
    updates remote where the machine will have it, with boot counting for every new
    deployment (a release that cannot complete a boot falls back by itself, without
    anyone at the console).  The host kernel may lack fs-verity, so the first entry
    gets cfsdeploy.verity=try (verity None: the sysroot's default, or a sealed
    release's require).  And a fresh OVMF variables file: its NVRAM."""
    disk = work / "disk.img"
    disk.unlink(missing_ok=True)
    t = time.monotonic()
    out = cfsdeploy("install", "to-disk", disk, "--size", DISK_SIZE, "--from", f"file://{b.repo}",
                    "--branch", BRANCH, "--gpg-import", b.key.public,
                    "--update-url", f"file://{UPDATES_MOUNT}/repo", "--os", OS_NAME, "--tries", str(TRIES),
                    *(["--verity", verity] if verity else []), "--console", "ttyS0", "--karg", "panic=10")
    for line in out.splitlines():
        log(f"  {line}")
    log(f"  install to-disk took {time.monotonic() - t:.1f} s")
    with mounted_root(disk, readonly=True) as mnt:
        (record,) = (mnt / "cfsdeploy/deploy" / OS_NAME).glob("*/deployment.json")
        deployment = {**json.loads(record.read_text()), "os": OS_NAME, "name": record.parent.name}
    vars_ = disk.with_suffix(".vars")
    shutil.copyfile(OVMF_VARS, vars_)
    return Disk(disk, vars_, tree, deployment)


def object_path(digest: str) -> str:
    """Where the object named digest lives, relative to the root partition."""
    return f"/cfsdeploy/repo/objects/{digest[:2]}/{digest[2:]}"


def corrupt(disk: Disk, path: str) -> None:
    """Flip one byte of the file at path (in the root partition) on the disk itself,
    under the filesystem, as a bad disk or an attacker with the disk would."""
    root = partitions(disk.path)["root"]
    out = run(["debugfs", "-R", f"bmap {path} 0", f"{disk.path}?offset={root.start}"], capture=True)
    block = int(out.stdout.split()[-1])
    with open(disk.path, "r+b") as f:
        f.seek(root.start + block * 4096)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


# --- QEMU --------------------------------------------------------------------------------

MARK = "CFSDEPLOY-RESULT"
_RESULT = re.compile(rf"{MARK} ([^=\s]+)=(.*?)\r?$", re.M)
_PREPARED = re.compile(r"cfsdeploy: root prepared in ([0-9.]+) s: (.*?)\r?$", re.M)


class VMError(Exception):
    pass


def tail(text: str, lines: int = 60) -> str:
    """The end of a serial log, for a failure's message."""
    return "\n".join(text.splitlines()[-lines:])


# What the serial console shows along the way, timed by the host from QEMU's start.
MILESTONES = {"kernel": b"Linux version ", "root prepared": b"cfsdeploy: root prepared in",
              "check unit": f"{MARK} check.start".encode()}


@dataclass
class Boot:
    name: str
    log: str
    results: dict[str, object]
    # wall-clock seconds from QEMU's start to its exit, and to each milestone seen
    seconds: float
    milestones: dict[str, float]
    # what the initramfs hook said composing the root took, and the rest of its line
    prepare_root: float | None = None
    prepared: str = ""
    steps: list[dict[str, object]] = field(default_factory=list)

    def __getitem__(self, key: str) -> object:
        try:
            return self.results[key]
        except KeyError:
            raise KeyError(f"the guest did not report {key}; serial log ends:\n{self.tail()}") from None

    def tail(self) -> str:
        return tail(self.log)

    def lines(self, prefix: str) -> list[str]:
        """The serial log's lines that say prefix (after the kernel's time stamp)."""
        out = []
        for line in self.log.splitlines():
            text = line.rstrip("\r").split("] ", 1)[1] if line.startswith("[") and "] " in line else line
            if text.startswith(prefix):
                out.append(text[len(prefix):].rstrip("\r"))
        return out

    @property
    def ended(self) -> str:
        """How the guest ended this boot: "reboot", "power off", or "?"."""
        # systemd-shutdown's words too: the kernel's last line can be lost when the
        # machine resets before its console is flushed
        if "reboot: Restarting system" in self.log or "systemd-shutdown[1]: Rebooting." in self.log:
            return "reboot"
        if "reboot: Power down" in self.log or "systemd-shutdown[1]: Powering off." in self.log:
            return "power off"
        return "?"

    @property
    def booted(self) -> dict[str, object] | None:
        """The booted deployment, as `cfsdeploy status --json` in the guest lists it."""
        rows = self.results.get("status.deployments") or []
        return next((d for d in rows if d["booted"]), None)  # type: ignore[union-attr,index]


def accel() -> str:
    """kvm if a short probe boot proves KVM runs a kernel here, else tcg
    ($CFSDEPLOY_VM_ACCEL decides without probing).  Remembered per host kernel."""
    if env := os.environ.get("CFSDEPLOY_VM_ACCEL"):
        return env
    CACHE.mkdir(parents=True, exist_ok=True)
    memo = CACHE / f"accel-{os.uname().release}"
    if memo.exists():
        return memo.read_text().strip()
    result = "tcg"
    kernels = sorted(rootfs().glob("boot/vmlinuz-*"))
    if kernels and os.access("/dev/kvm", os.R_OK | os.W_OK):
        with tempfile.TemporaryDirectory() as d:
            log = Path(d) / "serial"
            # The kernel panics at once for want of a root; under working KVM in seconds.
            with contextlib.suppress(CommandError):
                run(["qemu-system-x86_64", "-machine", "q35,accel=kvm", "-m", "512", "-nic", "none",
                     "-display", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{log}",
                     "-kernel", kernels[-1], "-append", "console=ttyS0 panic=-1"], timeout=20, capture=True)
            if log.exists() and b"Kernel panic" in log.read_bytes():
                result = "kvm"
    memo.write_text(result + "\n")
    return result


def firmware_argv(vars_: Path, *, secure_boot: bool = False) -> list[str]:
    """QEMU's machine and OVMF with vars_ as its NVRAM.  With secure_boot: OVMF's
    secboot build, SMM on and the variables' flash writable only from SMM, or the
    guest could rewrite db itself."""
    # Multi-threaded TCG sometimes loses the guest kernel's live patching of its own
    # code across vCPUs (an Oops on a stray int3 in early boot): one thread runs both.
    how = "tcg,thread=single" if accel() == "tcg" else accel()
    machine = ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on",
               "-global", "ICH9-LPC.disable_s3=1"] if secure_boot else ["-machine", "q35"]
    return [*machine, "-accel", how, "-cpu", "max",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE_SECBOOT if secure_boot else OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_}"]


# What OVMF prints once it has no boot option left (the loader gave up, e.g. on an
# image Secure Boot refuses), then waits for a key: the boot is over.
STUCK = b"BdsDxe: No bootable option"


def boot(disk: Disk, work: Path, *, steps: Sequence[str] = (), updates: Path | None = None,
         timeout: float = 900, name: str = "boot", extra: Sequence[str] = ()) -> Boot:
    """Power the machine on with OVMF (no network) and the updates disk, if any, as
    its second disk, and extra QEMU arguments; let the check unit run the steps
    (shell command lines) and power it off, or reboot it if a step ran `reboot`
    (QEMU then exits: -no-reboot).  A firmware STUCK without a bootable option is
    stopped.  The serial console's log and the facts the guest reported."""
    log, pidfile = work / f"{name}.serial", work / f"{name}.pid"
    for p in (log, pidfile):
        p.unlink(missing_ok=True)
    steps_file = work / f"{name}.steps.json"
    steps_file.write_text(json.dumps(list(steps)))
    argv = ["qemu-system-x86_64", *firmware_argv(disk.vars, secure_boot=disk.secure_boot), "-smp", "2", "-m", "2048",
            "-drive", f"if=virtio,format=raw,file={disk.path}",
            *(["-drive", f"if=virtio,format=raw,readonly=on,file={updates}"] if updates else []),
            "-fw_cfg", f"name=opt/cfsdeploy/steps,file={steps_file}",
            "-nic", "none", "-display", "none", "-monitor", "none", "-serial", f"file:{log}",
            "-pidfile", pidfile,
            # a guest's reboot can stall in the firmware: end, and relaunch instead
            "-no-reboot", *extra]
    seen: dict[str, float] = {}
    stop, stuck = threading.Event(), threading.Event()
    started = time.monotonic()

    def watch() -> None:
        while not stop.wait(0.2):
            with contextlib.suppress(FileNotFoundError, ValueError):
                text = log.read_bytes()
                for what, marker in MILESTONES.items():
                    if what not in seen and marker in text:
                        seen[what] = time.monotonic() - started
                if STUCK in text:
                    stuck.set()
                    os.kill(int(pidfile.read_text()), signal.SIGTERM)
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run(argv, timeout=timeout, capture=True)
    except CommandError as e:
        text = log.read_text(errors="replace") if log.exists() else ""
        if not stuck.is_set():
            raise VMError(f"{e}; serial log ends:\n{tail(text)}") from None
    finally:
        stop.set()
        watcher.join()
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    results = {m[1]: json.loads(m[2]) for m in _RESULT.finditer(text)}
    prepared = _PREPARED.search(text)
    steps_done = [v for k, v in sorted(results.items()) if k.startswith("step.")]
    return Boot(name, text, results, seconds, seen, float(prepared[1]) if prepared else None,
                prepared[2] if prepared else "", steps_done)  # type: ignore[arg-type]


# --- the journey -------------------------------------------------------------------------

CORRUPTED, INTACT = CANARIES
LOCAL_EDIT = "setting=local"
STAGED_EDIT = "made-after-staging"
MOUNT_UPDATES = f"mount -o ro LABEL={UPDATES_LABEL} {UPDATES_MOUNT}"
TRIES = 2


@dataclass
class Machine:
    """One machine's life, boot after boot: the disk, its vendor, the boots so far."""
    work: Path
    disk: Disk
    builder: Builder
    # the builder's commit of each release
    releases: dict[int, str]
    updates: Path | None = None
    boots: list[Boot] = field(default_factory=list)
    log: Log = print

    def boot(self, name: str, steps: Sequence[str] = ()) -> Boot:
        b = boot(self.disk, self.work, steps=steps, updates=self.updates, name=name)
        self.boots.append(b)
        return b

    def release(self, n: int, *, boot_completes: bool = True) -> None:
        """The vendor builds release n and offers it on the updates disk."""
        set_release(self.disk.tree, n, boot_completes=boot_completes)
        self.releases[n] = self.builder.commit(self.disk.tree)
        self.updates = make_updates_disk(self.builder, self.work)
        self.log(f"release {n}: commit {self.releases[n][:12]} offered on {self.updates}")


@contextlib.contextmanager
def machine(work: Path, log: Log = print, *, seal: tuple[str, ...] = (),
            secure_boot: Callable[[Path], object] | None = None) -> Iterator[Machine]:
    """Release 1 built by the vendor and installed on a new machine's disk.  With
    seal, the vendor's commit arguments that seal each release; with secure_boot,
    what enrolls the vendor's keys into the machine's variables file, whose
    firmware then enforces Secure Boot."""
    tree = make_tree(work / "tree", log)
    with builder(work, seal) as b:
        first = b.commit(tree)
        disk = make_disk(tree, work, b, verity=None if seal else "try", log=log)
        if secure_boot is not None:
            secure_boot(disk.vars)
            disk.secure_boot = True
        yield Machine(work, disk, b, {1: first}, log=log)
        remove_tree(tree.path)


def first_boot(m: Machine) -> Boot:
    """The deployment made on the host boots with cfsdeploy.verity=try; in it,
    fs-verity is enabled on the repository and a local /etc edit is made."""
    return m.boot("boot1-installed", ["cfsdeploy verity enable", f"echo {LOCAL_EDIT} >/{ETC_EDITED}",
                                      "cfsdeploy status"])


def upgrade_boot(m: Machine) -> Boot:
    """One object is corrupted on the disk and release 2 is offered; the machine
    boots with verity=require and runs `cfsdeploy upgrade && reboot`."""
    corrupt(m.disk, object_path(m.disk.tree.canary_objects[CORRUPTED]))
    m.release(2)
    return m.boot("boot2-upgrade", [f"{MOUNT_UPDATES} && cfsdeploy upgrade && reboot"])


def upgraded_boot(m: Machine) -> Boot:
    """The reboot lands in release 2, which completes its boot and is blessed;
    `cfsdeploy rollback && reboot`."""
    return m.boot("boot3-upgraded", ["cfsdeploy rollback && reboot"])


def rolled_back_boot(m: Machine) -> Boot:
    """Back in release 1; release 3, which never completes a boot, is offered and
    staged (finalized at shutdown), and /etc is edited after staging:
    `cfsdeploy upgrade --stage && echo ... >/etc/... && reboot`."""
    m.release(3, boot_completes=False)
    return m.boot("boot4-rolled-back", [f"{MOUNT_UPDATES} && cfsdeploy upgrade --stage && cfsdeploy status && "
                                        f"echo {STAGED_EDIT} >/{ETC_AFTER_STAGING} && reboot"])


def trial_boots(m: Machine) -> list[Boot]:
    """Release 3 boots on trial, once per try, and never reaches boot-complete."""
    return [m.boot(f"boot{5 + i}-trial{i + 1}", ["cfsdeploy status && reboot"]) for i in range(TRIES)]


def fallback_boot(m: Machine) -> Boot:
    """With its tries used up, the loader boots the previous deployment by itself."""
    return m.boot(f"boot{5 + TRIES}-fallback", ["cfsdeploy status"])


def describe(b: Boot, disk: Disk) -> str:
    """What the guest reported, for people."""
    r = b.results
    lines = [f"-- {b.name}: from QEMU's start: " + ", ".join(f"{k} {v:.1f} s" for k, v in b.milestones.items())
             + f", {b.ended} {b.seconds:.1f} s; prepare-root's own time {b.prepare_root} s",
             f"systemd's account (s): {r.get('times')}",
             f"systemd-boot booted entry {r.get('loader.entry')}"]
    cmd = r.get("cmdline", {})
    lines.append("kernel command line: " + " ".join(f"{k}={v}" for k, v in cmd.items()))  # type: ignore[union-attr]
    lines.append(f"/: {r.get('root.fstype')} from {r.get('root.source')!r}, "
                 f"{'read-only' if r.get('root.readonly') else 'WRITABLE'}; lowerdir={r.get('root.lowerdir')} "
                 f"metacopy={r.get('root.metacopy')} redirect_dir={r.get('root.redirect_dir')} "
                 f"verity={r.get('root.verity') or '(not set)'}")
    if cmd:
        digest = cmd.get("cfsdeploy.digest")  # type: ignore[union-attr]
        measured = r.get("image.measured")
        lines.append(f"image {r.get('image.path')} on {r.get('image.loops')}")
        lines.append(f"  fs-verity digest measured by the kernel: {measured}"
                     + (" (= cfsdeploy.digest)" if measured == digest else ""))
    for d in ("/etc", "/var", "/sysroot", "/boot"):
        lines.append(f"{d}: {r.get(f'mount.{d}')}; writable: {r.get(f'writable.{d}', '-')}")
    lines.append(f"/usr writable: {r.get('writable./usr')}")
    lines.append(f"systemd: multi-user.target {r.get('systemd.multi_user')}, boot-complete.target "
                 f"{r.get('systemd.boot_complete')}; failed units: {r.get('systemd.failed') or 'none'}")
    for path, text in (r.get("files") or {}).items():  # type: ignore[union-attr]
        lines.append(f"{path}: {str(text).strip()}")
    for name, got in (r.get("canaries") or {}).items():  # type: ignore[union-attr]
        lines.append(f"{name}: " + ("content as committed" if got == disk.tree.canaries[name] else got))
    if "status.text" in r:
        lines.append("$ cfsdeploy status")
        lines += ["  " + line for line in str(r["status.text"]).splitlines()]
    for s in b.steps:
        lines.append(f"$ {s['cmd']}  (exit status {s['rc']}, {s['seconds']} s)")
        lines += ["  " + line for line in (str(s["stdout"]) + str(s["stderr"])).splitlines()]
    if "error" in r:
        lines.append(f"CHECK ERROR: {r['error']}")
    return "\n".join(lines)


def demo(work: Path) -> None:
    """The whole journey, told as it goes."""
    if reason := missing_requirements():
        sys.exit(f"cannot run the VM demo here: {reason}")
    work.mkdir(parents=True, exist_ok=True)
    print(f"== working in {work} (accelerator: {accel()})")
    started = time.monotonic()
    with machine(work) as m:
        for what, step in (
                ("release 1 installed on the host with boot counting, verity=try; verity enable, a local /etc edit",
                 first_boot),
                (f"{CORRUPTED}'s object corrupted on the disk; release 2 offered: upgrade && reboot",
                 upgrade_boot),
                ("release 2, blessed, with the local /etc edit kept: rollback && reboot", upgraded_boot),
                ("back in release 1; release 3 (never completes a boot) offered: upgrade --stage, "
                 "edit /etc, reboot", rolled_back_boot)):
            print(f"== {what}")
            print(describe(step(m), m.disk))
        print(f"== release 3 on trial, {TRIES} tries")
        for b in trial_boots(m):
            print(describe(b, m.disk))
        print("== tries used up: the loader falls back by itself")
        print(describe(fallback_boot(m), m.disk))
    print(f"== {len(m.boots)} boots in {time.monotonic() - started:.0f} s; serial logs in {work}/*.serial")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] != "demo":
        sys.exit("usage: python -m tests.vm demo [WORKDIR]")
    demo(Path(sys.argv[2]) if len(sys.argv) == 3 else Path(tempfile.mkdtemp(prefix="cfsdeploy-vm-demo.")))
