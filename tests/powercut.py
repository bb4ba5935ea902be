"""Power cuts of a real machine while cfsdeploy changes its boot directory, for
tests/test_powercut.py.

The machine (tests/vm.py's disk: a vfat ESP with systemd-boot, an ext4 sysroot)
boots straight into tests/vm_cut.py as PID 1, which runs the commands that change
the boot entries, round after round, with idle pauses.  At random moments the host
stops the machine (QMP `stop`: no vCPU runs and the disk's in-flight requests
complete), copies its disk image in O(1) (a reflink on a scratch XFS), and lets
it go on: each copy is exactly what a power cut at that instant leaves, for the
guest's page cache is lost with it, as with a real cut.  At the end the machine
is killed outright (SIGKILL of QEMU) during its last command, a cut of the plain
kind.

Each cut is then inspected from the host, without the guest's kernel:
  - the ESP with `fsck.vfat -n` and mtools: every entry parses, names its kernel
    and initramfs, whose content hashes to the name of their directory;
  - the root with `e2fsck -p` (journal replay and nothing more), then mounted:
    every deployment an entry names is there with its image object;
  - the entries (deployment and options, in boot order) equal those the guest
    reported after the last command that returned before the cut, or after the
    command in flight.
A sample of cut disks is then booted with OVMF and systemd-boot to multi-user.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cfsdeploy.composefs.mounts import attach_loop
from cfsdeploy.util.errors import CommandError
from cfsdeploy.util.run import run

from . import vm

MARK = "CFSDEPLOY-CUT"
_EVENT = re.compile(rf"^{MARK} (\w+) (.*?)\r?$", re.M)
RUNNER = "/usr/libexec/cfsdeploy-vm/cut-runner"
ENTRY_NAME = re.compile(rf"cfsdeploy-{vm.OS_NAME}-(\d+)(?:\+\d+(?:-\d+)?)?\.conf")

# fsck.vfat's words for what a cut leaves on a FAT that was mounted, and that is no
# damage: the "mounted" flag (the dirty bit, byte 65 of the boot sector, so its
# backup differs there), the free-cluster count (FSInfo, which the FAT specification
# makes a hint readers must not trust) and lost clusters (allocated, named by no
# file: the end of a long chain a cut caught while its clusters were being freed).
FSCK_BENIGN = (
    re.compile(r"^fsck\.fat \d"),
    re.compile(r": \d+ files, \d+/\d+ clusters$"),
    re.compile(r"^Dirty bit is set\. Fs was not properly unmounted"),
    re.compile(r"^ *Automatically removing dirty bit\.$"),
    re.compile(r"^There are differences between boot sector and its backup\.$"),
    re.compile(r"^This is mostly harmless\. Differences: \(offset:original/backup\)$"),
    re.compile(r"^ *65:01/00$"),
    re.compile(r"^ *Not automatically fixing this\.$"),
    re.compile(r"^Free cluster summary wrong \(\d+ vs\. really \d+\)$"),
    re.compile(r"^Reclaimed \d+ unused clusters? \(\d+ bytes\)\.$"),
    re.compile(r"^ *Auto-correcting\.$"),
    re.compile(r"^Leaving filesystem unchanged\.$"),
    re.compile(r"^$"),
)
# ... of which these are more than the dirty bit, counted for the report
FSCK_MORE = {"free count": "Free cluster summary wrong", "lost clusters": "Reclaimed "}


@contextlib.contextmanager
def scratch_xfs(work: Path, size: str = "48G") -> Iterator[Path]:
    """An XFS mounted from a sparse file: disk images copied there share their
    blocks (FICLONE), so a copy of the whole disk takes milliseconds."""
    img, mnt = work / "scratch.xfs", work / "scratch"
    run(["truncate", "-s", size, img])
    run(["mkfs.xfs", "-q", "-m", "reflink=1", img])
    mnt.mkdir()
    run(["mount", "-o", "loop", img, mnt])
    try:
        yield mnt
    finally:
        run(["umount", mnt])
        img.unlink()


def reflink(src: Path, dst: Path) -> None:
    run(["cp", "--reflink=always", src, dst])


class QMP:
    """QEMU's machine protocol over a unix socket: just stop and cont."""

    def __init__(self, path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.file = self.sock.makefile("rw")
        self._read()  # the greeting
        self.call("qmp_capabilities")

    def _read(self) -> dict[str, object]:
        while True:
            line = self.file.readline()
            if not line:
                raise vm.VMError("QEMU closed its QMP socket")
            msg: dict[str, object] = json.loads(line)
            if "event" not in msg:
                return msg

    def call(self, command: str) -> None:
        self.file.write(json.dumps({"execute": command}) + "\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise vm.VMError(f"QMP {command}: {reply['error']}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@dataclass
class Cut:
    """The disk as a power cut at one moment left it."""
    number: int
    path: Path
    seconds: float               # since the machine started
    done: int                    # how many commands had returned (their `end` seen)
    in_flight: int | None        # the command running then, if one was
    killed: bool = False         # a real kill of QEMU, not a stop and copy


@dataclass
class Run:
    events: list[tuple[str, dict[str, object]]]
    cuts: list[Cut]
    log: str
    seconds: float

    def ends(self) -> dict[int, dict[str, object]]:
        return {int(e["i"]): e for k, e in self.events if k == "end"}  # type: ignore[call-overload]

    def commands(self) -> dict[int, str]:
        return {int(e["i"]): str(e["cmd"]) for k, e in self.events if k == "begin"}  # type: ignore[call-overload]

    def ready_entries(self) -> list[list[str]]:
        return next(e["entries"] for k, e in self.events if k == "ready")  # type: ignore[return-value]

    def expected(self, cut: Cut) -> list[list[list[str]]]:
        """The entry sets a cut may leave: after the last command that returned (or
        as the machine started), or after the command in flight."""
        ends = self.ends()
        before = ends[cut.done]["entries"] if cut.done else self.ready_entries()
        sets = [before]
        if cut.in_flight is not None and cut.in_flight in ends:
            sets.append(ends[cut.in_flight]["entries"])
        return sets  # type: ignore[return-value]


def parse_events(text: str) -> list[tuple[str, dict[str, object]]]:
    return [(m[1], json.loads(m[2])) for m in _EVENT.finditer(text)]


def default_entry(disk: Path) -> tuple[str, str, str]:
    """The ESP's default entry: its linux, initrd and options."""
    esp = vm.extract_esp(disk, disk.with_suffix(".esp"))
    try:
        entries = read_entries(esp)
        if not entries:
            raise vm.VMError(f"{disk}: no boot entry")
        e = entries[0]
        return e.linux, e.initrd, e.options
    finally:
        esp.unlink()


def boot_runner(disk: Path, updates: Path, work: Path, *, seed: int, rounds: int, cuts_dir: Path,
                spacing: tuple[float, float] = (1.5, 8.0), timeout: float = 2400, log: vm.Log = print) -> Run:
    """Boot the disk straight into the cut runner (the kernel and initramfs of its
    default entry, no firmware) and cut at random moments until it is done."""
    linux, initrd, options = default_entry(disk)
    kernel, initramfs = work / "cut.vmlinuz", work / "cut.initramfs"
    esp = vm.extract_esp(disk, work / "boot.esp")
    mtools_get(esp, linux, kernel)
    mtools_get(esp, initrd, initramfs)
    esp.unlink()
    serial, qmp_path = work / "cut.serial", work / "cut.qmp"
    serial.unlink(missing_ok=True)
    how = "tcg,thread=single" if vm.accel() == "tcg" else vm.accel()
    argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", how, "-cpu", "max", "-smp", "2", "-m", "2048",
            "-kernel", str(kernel), "-initrd", str(initramfs),
            "-append", f"{options} init={RUNNER} cfsdeploy.cutseed={seed} cfsdeploy.cutrounds={rounds}",
            "-drive", f"if=virtio,format=raw,cache=none,file={disk}",
            "-drive", f"if=virtio,format=raw,readonly=on,file={updates}",
            "-nic", "none", "-display", "none", "-monitor", "none", "-serial", f"file:{serial}",
            "-qmp", f"unix:{qmp_path},server=on,wait=off", "-no-reboot"]
    rng = random.Random(seed)
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    qmp = QMP(qmp_path)
    cuts: list[Cut] = []
    events: list[tuple[str, dict[str, object]]] = []
    total = rounds * 9
    next_cut = time.monotonic() + rng.uniform(*spacing)
    kill_at: float | None = None
    seen_begun = 0
    try:
        while True:
            if proc.poll() is not None:
                raise vm.VMError(f"QEMU ended ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}"
                                 f"\nserial log ends:\n{vm.tail(serial.read_text(errors='replace'))}")
            text = serial.read_text(errors="replace") if serial.exists() else ""
            events = parse_events(text[:text.rfind("\n") + 1])  # whole lines only
            kinds = [k for k, _ in events]
            if "error" in kinds:
                raise vm.VMError(f"the cut runner failed: {events[kinds.index('error')][1]}")
            done = sum(1 for k in kinds if k == "end")
            begun = sum(1 for k in kinds if k == "begin")
            in_flight = begun if begun > done else None
            now = time.monotonic()
            if time.monotonic() - started > timeout:
                raise vm.VMError(f"the cut runner did not finish in {timeout} s:\n{vm.tail(text)}")
            if begun > seen_begun:  # most of a command's writes come in its first seconds
                seen_begun = begun
                next_cut = min(next_cut, now + rng.uniform(0.2, 3.0))
            if kill_at is None and begun == total:
                kill_at = now + rng.uniform(0, 30)
            if kill_at is not None and (now >= kill_at or "done" in kinds):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                path = cuts_dir / f"cut{len(cuts) + 1:02d}.img"
                reflink(disk, path)
                cuts.append(Cut(len(cuts) + 1, path, now - started, done, in_flight, killed=True))
                log(f"cut {len(cuts)}: QEMU killed at {now - started:.0f} s, {done} commands returned")
                break
            if "ready" in kinds and now >= next_cut:
                qmp.call("stop")
                path = cuts_dir / f"cut{len(cuts) + 1:02d}.img"
                reflink(disk, path)
                qmp.call("cont")
                cuts.append(Cut(len(cuts) + 1, path, now - started, done, in_flight))
                next_cut = time.monotonic() + rng.uniform(*spacing)
            time.sleep(0.2)
    finally:
        qmp.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = serial.read_text(errors="replace")
    return Run(parse_events(text), cuts, text, time.monotonic() - started)


# --- inspection ------------------------------------------------------------------------------

def mtools_get(esp: Path, path: str, dest: Path) -> None:
    vm.mtools("mcopy", "-n", "-i", esp, f"::{path}", dest)


@dataclass
class Entry:
    file: str
    number: int
    linux: str
    initrd: str
    options: str

    @property
    def deployment(self) -> str:
        return next((w[len("cfsdeploy="):] for w in self.options.split() if w.startswith("cfsdeploy=")), "")


def read_entries(esp: Path) -> list[Entry]:
    """The os's entries on an ESP image, default first; raises on one that does not parse."""
    out = []
    try:
        listing = vm.mtools("mdir", "-b", "-i", esp, "::/loader/entries")
    except CommandError:
        return []
    for line in listing.splitlines():
        name = line.strip().rsplit("/", 1)[-1]
        m = ENTRY_NAME.fullmatch(name)
        if m is None:
            continue
        text = vm.mtools("mtype", "-i", esp, f"::/loader/entries/{name}")
        fields = dict(line.strip().partition(" ")[::2] for line in text.splitlines() if line.strip())
        missing = [k for k in ("linux", "initrd", "options") if k not in fields]
        if missing:
            raise vm.VMError(f"entry {name} lacks {', '.join(missing)}: {text!r}")
        out.append(Entry(name, int(m[1]), fields["linux"].strip(), fields["initrd"].strip(), fields["options"].strip()))
    return sorted(out, key=lambda e: e.number, reverse=True)


@dataclass
class Inspection:
    cut: Cut
    fsck_vfat: str
    fsck_vfat_ok: bool
    entries: list[Entry]
    problems: list[str] = field(default_factory=list)

    @property
    def fsck_notes(self) -> list[str]:
        """What fsck.vfat found beyond the dirty bit that is no damage."""
        return [k for k, words in FSCK_MORE.items() if words in self.fsck_vfat]

    @property
    def state(self) -> list[list[str]]:
        return [[e.deployment, e.options] for e in self.entries]


def fsck_vfat(esp: Path) -> tuple[bool, str]:
    r = subprocess.run(["fsck.vfat", "-n", str(esp)], capture_output=True, text=True)
    out = r.stdout + r.stderr
    bad = [line for line in out.splitlines() if not any(p.search(line) for p in FSCK_BENIGN)]
    return r.returncode in (0, 1) and not bad, out


def inspect(cut: Cut, work: Path) -> Inspection:
    """What a cut left, from the host."""
    esp = vm.extract_esp(cut.path, work / f"cut{cut.number:02d}.esp")
    problems: list[str] = []
    ok, fsck_out = fsck_vfat(esp)
    if not ok:
        problems.append(f"fsck.vfat -n: {fsck_out.strip()}")
    try:
        entries = read_entries(esp)
    except Exception as e:  # noqa: BLE001 -- any failure to read is what we report
        entries = []
        problems.append(f"entries unreadable: {e}")
    if not entries:
        problems.append("no boot entry")
    for e in entries:
        m = re.fullmatch(r"/cfsdeploy/[^/]+/[^/]+-([0-9a-f]{12})/vmlinuz", e.linux)
        if m is None or e.initrd != e.linux.rsplit("/", 1)[0] + "/initramfs.img":
            problems.append(f"{e.file}: unexpected kernel paths {e.linux} {e.initrd}")
            continue
        h = hashlib.sha256()
        try:
            for p in (e.linux, e.initrd):
                dest = work / "kernel.part"
                mtools_get(esp, p, dest)
                h.update(dest.read_bytes())
                dest.unlink()
        except Exception as err:  # noqa: BLE001
            problems.append(f"{e.file}: {err}")
            continue
        if h.hexdigest()[:12] != m[1]:
            problems.append(f"{e.file}: kernel and initramfs do not hash to {m[1]}")
    esp.unlink()
    root = vm.partitions(cut.path)["root"]
    with attach_loop(cut.path, read_only=False, block_size=512, offset=root.start, size_limit=root.size) as lo:
        dev = lo.path
        r = subprocess.run(["e2fsck", "-fp", dev], capture_output=True, text=True)
        if r.returncode not in (0, 1):
            problems.append(f"e2fsck -fp: exit {r.returncode}: {(r.stdout + r.stderr).strip()}")
        else:
            mnt = Path(tempfile.mkdtemp(prefix="cfsdeploy-cut."))
            run(["mount", "-o", "ro", dev, mnt])
            try:
                for e in entries:
                    dep = mnt / e.deployment.lstrip("/")
                    if not (dep / "deployment.json").is_file() or not (dep / "etc").is_dir():
                        problems.append(f"{e.file}: deployment {e.deployment} missing or incomplete")
                    digest = next((w.split("=", 1)[1] for w in e.options.split()
                                   if w.startswith("cfsdeploy.digest=")), "")
                    obj = mnt / vm.object_path(digest).lstrip("/")
                    if not obj.is_file() or obj.stat().st_size == 0:
                        problems.append(f"{e.file}: image object {digest} missing")
            finally:
                run(["umount", mnt])
                mnt.rmdir()
    return Inspection(cut, fsck_out, ok, entries, problems)


def lost(run_: Run, i: Inspection) -> str | None:
    """Why the cut's entries are neither the state before nor after the command in
    flight, or None."""
    allowed = run_.expected(i.cut)
    if i.state in allowed:
        return None
    return (f"entries {json.dumps(i.state)} are none of the states allowed at that moment: "
            f"{json.dumps(allowed)}")


def boot_sample(cut: Cut, disk: vm.Disk, work: Path, name: str) -> vm.Boot:
    """Boot a cut disk with OVMF and systemd-boot, as the machine would at power-on."""
    vars_ = cut.path.with_suffix(".vars")
    shutil.copyfile(disk.vars, vars_)
    return vm.boot(vm.Disk(cut.path, vars_, disk.tree, {}), work, name=name)


def boot_samples(samples: list[Cut], disk: vm.Disk, work: Path) -> list[vm.Boot]:
    """The samples booted at once, each QEMU on its own core."""
    boots: list[vm.Boot | BaseException | None] = [None] * len(samples)

    def one(k: int) -> None:
        try:
            boots[k] = boot_sample(samples[k], disk, work, f"cut{samples[k].number:02d}-boot")
        except BaseException as e:  # noqa: BLE001 -- raised in the caller's thread
            boots[k] = e

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(samples))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for b in boots:
        if isinstance(b, BaseException):
            raise b
    return boots  # type: ignore[return-value]
