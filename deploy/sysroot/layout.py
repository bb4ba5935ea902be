"""A machine's sysroot: its repository, the deployments of each os, their shared /var,
the boot directory, settings and lock.

    SYSROOT/cfsdeploy/config.toml                 settings (TOML, for humans)
    SYSROOT/cfsdeploy/lock                        flock()ed by whoever changes deployments
    SYSROOT/cfsdeploy/staged.json                 the staged deployment, if any (see staged.py)
    SYSROOT/cfsdeploy/verity-pending              the objects await fs-verity (see Sysroot.init)
    SYSROOT/cfsdeploy/repo/                       the repository
    SYSROOT/cfsdeploy/deploy/<os>/var/            the os's shared /var
    SYSROOT/cfsdeploy/deploy/<os>/<deployment>/   deployment.json and etc/

The boot entries are the truth about which deployments exist and in what order; a
deployment directory no entry (nor the staged record) names is what an interrupted
deploy left, and goes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..boot import bootloader, kargs
from ..boot.bootloader import BootEntry, Damaged, Kind
from ..composefs import fsverity
from ..repo.repository import Repository
from ..util import lockfile, tomlfile
from ..util.errors import CfsError, NotFoundError, UsageError
from ..util.fsutil import atomic_write_bytes, fsync_dir, remove_tree
from . import bydigest, deployment, staged
from .deployment import Deployment
from .staged import Staged

TOP = "cfsdeploy"
# Damaged records set aside (see Sysroot.set_aside).
ASIDE = "aside"
CMDLINE_ENV = "CFSDEPLOY_CMDLINE"
# Written where `sysroot init` finds no fs-verity: the boot hook enables it on every
# object at a boot with cfsdeploy.verity=require (then removes it), as does
# `cfsdeploy verity enable`.
VERITY_PENDING = "verity-pending"
_VERITY_PENDING_TEXT = (b"fs-verity is not enabled on the objects yet: the next boot with cfsdeploy.verity=require "
                        b"enables it (hooks/cfsdeploy-prepare-root), or `cfsdeploy verity enable` does\n")


def default_path() -> str:
    """The sysroot of the running machine: in a booted deployment / is the composed
    image and the physical root is at /sysroot."""
    return "/sysroot" if os.path.isdir("/sysroot/cfsdeploy") else "/"


class SysrootError(CfsError):
    pass


class SysrootUsageError(SysrootError, UsageError):
    pass


class SysrootNotFoundError(SysrootError, NotFoundError):
    pass


@dataclass
class Config:
    """SYSROOT/cfsdeploy/config.toml."""
    default_os: str | None = None
    # The boot directory: relative to the sysroot, or absolute.
    boot_dir: str = "boot"
    # Kernel arguments of a first deployment (later ones inherit their predecessor's).
    kargs: list[str] = field(default_factory=list)
    verity: str = "require"
    # systemd-boot boot counting: tries of a new entry (0: off).
    tries: int = 0
    keep_rollback: bool = True
    # How many more older deployments a deploy keeps beyond new, booted, rollback, pinned.
    keep_extra: int = 0

    def render(self) -> str:
        sysroot: dict[str, object] = {"default-os": self.default_os} if self.default_os else {}
        sysroot["boot-dir"] = self.boot_dir
        doc = {"sysroot": sysroot,
               "boot": {"kargs": self.kargs, "verity": self.verity, "tries": self.tries},
               "deploy": {"keep-rollback": self.keep_rollback, "keep-extra": self.keep_extra}}
        return tomlfile.dumps(doc, header="cfsdeploy sysroot settings", comments={
            "sysroot.boot-dir": "relative to the sysroot, or absolute",
            "boot.kargs": "kernel arguments of a first deployment; later ones inherit theirs",
            "boot.verity": "require | try | off",
            "boot.tries": "boot counting tries of new entries (0: off)",
            "deploy.keep-extra": "older deployments kept beyond the rollback"})

    @classmethod
    def parse(cls, data: bytes, where: str) -> Config:
        try:
            doc = tomllib.loads(data.decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise SysrootError(f"{where}: {e}") from None
        s, b, d = (_table(doc, name, where) for name in ("sysroot", "boot", "deploy"))
        c = cls(default_os=s.get("default-os"), boot_dir=s.get("boot-dir", "boot"),
                kargs=b.get("kargs", []), verity=b.get("verity", "require"), tries=b.get("tries", 0),
                keep_rollback=d.get("keep-rollback", True), keep_extra=d.get("keep-extra", 0))
        c.check(where)
        return c

    def check(self, where: str) -> None:
        """Refuse a value of the wrong type or out of range, naming the key and the
        file: the file is edited by hand, and a deploy acts on every key."""
        def bad(key: str, want: str) -> SysrootError:
            return SysrootError(f"{where}: {key} must be {want}")

        if self.default_os is not None and not (isinstance(self.default_os, str)
                                                and bootloader.OS_NAME.fullmatch(self.default_os)):
            raise bad("sysroot.default-os", "an os name (letters, digits, '_' and '.')")
        if not isinstance(self.boot_dir, str) or not self.boot_dir or "\0" in self.boot_dir:
            raise bad("sysroot.boot-dir", "a path (a non-empty string)")
        if not isinstance(self.kargs, list) or not all(isinstance(a, str) for a in self.kargs):
            raise bad("boot.kargs", "a list of strings")
        for a in self.kargs:
            try:
                kargs.check(a)
            except kargs.KargsError as e:
                raise SysrootError(f"{where}: boot.kargs: {e}") from None
        if self.verity not in kargs.VERITY_MODES:
            raise bad("boot.verity", " or ".join(kargs.VERITY_MODES))
        check_tries(self.tries, f"{where}: boot.tries")
        if not isinstance(self.keep_rollback, bool):
            raise bad("deploy.keep-rollback", "true or false")
        if type(self.keep_extra) is not int or self.keep_extra < 0:
            raise bad("deploy.keep-extra", "a number >= 0")


def _table(doc: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    t = doc.get(name, {})
    if not isinstance(t, dict):
        raise SysrootError(f"{where}: [{name}] must be a table")
    return t


def check_tries(tries: object, what: str) -> int:
    """Boot counting tries: 0 (off) to what systemd-boot's entry names can carry."""
    if type(tries) is not int or not 0 <= tries <= bootloader.MAX_TRIES:
        raise SysrootError(f"{what} must be 0..{bootloader.MAX_TRIES}")
    return tries


def _verity_works(directory: str) -> bool:
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        os.write(fd, b"probe")
        os.close(fd)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return fsverity.try_enable_verity(fd)
    finally:
        os.close(fd)
        os.unlink(path)


def check_os_name(name: str) -> str:
    if not isinstance(name, str) or not bootloader.OS_NAME.fullmatch(name):
        raise SysrootUsageError(f"invalid os name {name!r} (letters, digits, '_' and '.')")
    return name


@dataclass
class State:
    """An os's deployments in boot order (default first) with their entries."""
    os: str
    deployments: list[Deployment]
    entries: list[BootEntry]
    booted: Deployment | None
    # Entries that name no usable deployment, and why: they cannot boot, and the next
    # change of entries drops them.
    broken: list[tuple[BootEntry, str]] = field(default_factory=list)
    # Records that failed their checks: the os's entries, the staged record, what was
    # set aside, by-digest links.  Whatever deployment or kernel they might name stays.
    damaged: list[Damaged] = field(default_factory=list)
    # Deployment directories a broken sealed entry might name (its text names only its
    # UKI): those whose record is damaged, or that claim its UKI together.
    suspects: set[str] = field(default_factory=set)

    @property
    def default(self) -> Deployment | None:
        return self.deployments[0] if self.deployments else None

    @property
    def rollback(self) -> Deployment | None:
        return self.deployments[1] if len(self.deployments) > 1 else None

    def entry_of(self, dep: Deployment) -> BootEntry:
        return self.entries[self.deployments.index(dep)]

    def kept_by(self, names: Iterable[str]) -> set[str]:
        """Which of `names` (deployment or kernel directories) a damaged record, or an
        entry naming no usable deployment, might name: never deleted while it exists."""
        names = list(names)
        kept = {n for d in self.damaged for n in d.mentions(names)} | (self.suspects & set(names))
        return kept | {n for e, _ in self.broken for n in names if n.encode() in e.render()}

    def find(self, index: int) -> Deployment:
        if not 0 <= index < len(self.deployments):
            raise SysrootNotFoundError(f"no deployment {index} (there are {len(self.deployments)})")
        return self.deployments[index]


class Sysroot:
    def __init__(self, path: str, *, boot_dir: str | None = None, cmdline: str | None = None) -> None:
        self.path = os.path.abspath(path)
        self.top = os.path.join(self.path, TOP)
        config_path = os.path.join(self.top, "config.toml")
        try:
            with open(config_path, "rb") as f:
                self.config = Config.parse(f.read(), config_path)
        except FileNotFoundError:
            raise SysrootNotFoundError(f"not a cfsdeploy sysroot: {self.path}",
                                       hint="run `cfsdeploy sysroot init`") from None
        self.boot = os.path.join(self.path, boot_dir or self.config.boot_dir)
        self._cmdline = cmdline
        self._repo: Repository | None = None
        # What commands found broken and repaired (bootloader.recover), for the CLI to tell.
        self.repairs: list[bootloader.Repair] = []

    @property
    def switch_record(self) -> str:
        """Where a switch of the boot entries is recorded while it runs."""
        return os.path.join(self.top, "boot-switch.json")

    def verity_done(self) -> None:
        """Every object has fs-verity now: drop the marker that says they await it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.top, VERITY_PENDING))
            fsync_dir(self.top)

    def save_config(self) -> None:
        where = os.path.join(self.top, "config.toml")
        self.config.check(where)
        atomic_write_bytes(where, self.config.render().encode())

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = Repository(os.path.join(self.top, "repo"))
        return self._repo

    @classmethod
    def init(cls, path: str, os_name: str, *, boot_dir: str | None = None,
             karg_list: list[str] | None = None, tries: int = 0) -> Sysroot:
        """Lay out a sysroot, or add an os to an existing one."""
        check_os_name(os_name)
        top = os.path.join(os.path.abspath(path), TOP)
        config_path = os.path.join(top, "config.toml")
        if os.path.exists(config_path):
            with open(config_path, "rb") as f:
                config = Config.parse(f.read(), config_path)
            if boot_dir is not None and boot_dir != config.boot_dir:
                raise SysrootUsageError(f"the sysroot's boot directory is already {config.boot_dir}")
        else:
            config = Config(default_os=os_name, boot_dir=boot_dir or "boot",
                            kargs=kargs.check_line([kargs.check(a) for a in karg_list or []]),
                            tries=check_tries(tries, "tries"))
            os.makedirs(top, exist_ok=True)
            if not os.path.exists(os.path.join(top, "repo")):
                Repository.init(os.path.join(top, "repo"))
            # Where this kernel cannot give objects fs-verity, deployments start out
            # with cfsdeploy.verity=try; `cfsdeploy verity enable` moves them on, and
            # so does a sealed release's first boot (verity=require), under the marker.
            if not _verity_works(os.path.join(top, "repo", "tmp")):
                config.verity = "try"
                atomic_write_bytes(os.path.join(top, VERITY_PENDING), _VERITY_PENDING_TEXT)
            lockfile.create(os.path.join(top, "lock"))
            config.check(config_path)
            atomic_write_bytes(config_path, config.render().encode())
        os.makedirs(os.path.join(top, "deploy", os_name, "var"), exist_ok=True)
        fsync_dir(os.path.join(top, "deploy"))
        return cls(path)

    # --- paths, lock -------------------------------------------------------------------

    def os_dir(self, os_name: str) -> str:
        return os.path.join(self.top, "deploy", check_os_name(os_name))

    def dir_of(self, dep: Deployment) -> str:
        return os.path.join(self.os_dir(dep.os), dep.name)

    def var_dir(self, os_name: str) -> str:
        return os.path.join(self.os_dir(os_name), "var")

    def directories(self, os_name: str) -> list[str]:
        """The names of the os's deployment and kernel directories."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            out += [n for n in os.listdir(self.os_dir(os_name)) if deployment.is_name(n)]
        with contextlib.suppress(FileNotFoundError):
            out += [n for n in os.listdir(os.path.join(self.boot, "cfsdeploy", os_name))
                    if bootloader.KERNEL_DIR.fullmatch(n)]
        return out

    def os_names(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(n for n in os.listdir(os.path.join(self.top, "deploy"))
                          if bootloader.OS_NAME.fullmatch(n))
        return []

    def pick_os(self, os_name: str | None) -> str:
        """The os a command means: as given, else the booted one, else the configured one."""
        if os_name is None:
            booted = self.booted_path()
            if booted is not None and booted.startswith("/cfsdeploy/deploy/"):
                # A mangled command line names no os: the configured one is meant then.
                os_name = booted.split("/")[3] if bootloader.OS_NAME.fullmatch(booted.split("/")[3]) else None
        os_name = os_name or self.config.default_os
        if os_name is None:
            raise SysrootUsageError("which os?", hint="give --os")
        if os_name not in self.os_names():
            raise SysrootNotFoundError(f"no os {os_name!r} in {self.path}",
                                       hint=f"run `cfsdeploy sysroot init --os {os_name}`")
        return os_name

    def lock(self, *, wait: float = 0.0, on_wait: Callable[[], None] | None = None
             ) -> contextlib.AbstractContextManager[None]:
        return lockfile.hold(os.path.join(self.top, "lock"),
                             f"sysroot {self.path} is locked by another cfsdeploy process",
                             wait=wait, on_wait=on_wait)

    # --- state -------------------------------------------------------------------------

    def cmdline(self) -> list[str]:
        """The running kernel's command line, in words (none if it cannot be read)."""
        text = self._cmdline
        if text is None:
            source = os.environ.get(CMDLINE_ENV, "/proc/cmdline")
            try:
                # Not UTF-8 (a boot loader's garbage, an attacker's edit): the
                # undecodable bytes name no deployment, and must not stop a command.
                with open(source, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
            except OSError:
                return []
        return kargs.split(text)

    def booted_path(self) -> str | None:
        """The deployment the running system booted: its cfsdeploy= argument, or in a
        sealed boot (none) the by-digest link of its cfsdeploy.digest=, as the boot hook
        reads it."""
        args = self.cmdline()
        path = kargs.value(args, kargs.DEPLOYMENT)
        digest = kargs.value(args, kargs.DIGEST)
        if path is not None or digest is None:
            return path
        try:
            link = bydigest.read(self.top, digest)
        except bydigest.LinkError:
            return None
        return link.path if link is not None else None

    def set_aside(self, d: Damaged, *, move: bool = False) -> str:
        """Keep a damaged record (a copy, or itself moved) in SYSROOT/cfsdeploy/aside/
        <name>.<12 hex of sha256>, out of the way of every command; what it names stays
        while it is there, and status says so."""
        aside = os.path.join(self.top, ASIDE)
        os.makedirs(aside, exist_ok=True)
        path = os.path.join(aside, f"{os.path.basename(d.path)}.{hashlib.sha256(d.data).hexdigest()[:12]}")
        if move:
            os.replace(d.path, path)
            fsync_dir(os.path.dirname(d.path))
        else:
            atomic_write_bytes(path, d.data)
        fsync_dir(aside)
        return path

    def damaged_staged(self) -> Damaged | None:
        """The staged record, if it is damaged."""
        path = os.path.join(self.top, staged.RECORD)
        try:
            staged.load(self.top)
        except staged.StagedError as e:
            return Damaged(Kind.STAGED, path, str(e).removeprefix(f"{path}: "), _read_or_nothing(path))
        return None

    def _damaged_records(self) -> list[Damaged]:
        """The staged record if damaged, and the records set aside."""
        rec = self.damaged_staged()
        out = [rec] if rec is not None else []
        aside = os.path.join(self.top, ASIDE)
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(aside)):
                p = os.path.join(aside, name)
                out.append(Damaged(Kind.ASIDE, p, "a damaged record set aside: what it names is kept until it "
                                   "is deleted", _read_or_nothing(p)))
        return out + bydigest.damaged(self.top)

    def state(self, os_name: str) -> State:
        deps, entries, broken = [], [], []
        suspects: set[str] = set()
        prefix = f"/cfsdeploy/deploy/{os_name}/"
        good, damaged = bootloader.scan_entries(self.boot, os_name)
        sealed: _SealedRecords | None = None
        for e in good:
            if e.sealed:
                sealed = sealed or self._sealed_records(os_name)
                k = bootloader.kernel_of(e)
                claims = sealed.by_kernel.get(k.dirname, []) if k is not None else []
                if len(claims) != 1:
                    broken.append((e, f"{len(claims)} sealed deployments of os {os_name!r} name its UKI"))
                    suspects |= {d.name for d in claims} | sealed.unreadable
                    continue
                deps.append(claims[0])
                entries.append(e)
                continue
            path = e.option(kargs.DEPLOYMENT)
            if path is None or not path.startswith(prefix) or not deployment.is_name(path[len(prefix):]):
                broken.append((e, f"names no deployment of os {os_name!r}"))
                continue
            try:
                dep = deployment.load(os.path.join(self.os_dir(os_name), path[len(prefix):]))
            except deployment.DeploymentError as err:
                broken.append((e, str(err)))
                continue
            if dep.sealed is not None:
                broken.append((e, f"names sealed deployment {dep.name}, but not its UKI"))
                continue
            # The entry is what boots: its options are the deployment's kernel arguments.
            deps.append(dep.with_(kargs=[a for a in kargs.split(e.options or "") if kargs.key(a) not in kargs.OWN]))
            entries.append(e)
        booted = self.booted_path()
        return State(os_name, deps, entries, next((d for d in deps if d.path == booted), None), broken,
                     damaged + self._damaged_records(), suspects)

    def _sealed_records(self, os_name: str) -> _SealedRecords:
        """The os's sealed deployments by the kernel directory of their UKI: a sealed
        entry names its UKI, and the deployment is the one whose record names it."""
        out = _SealedRecords({}, set())
        for name in self.directories(os_name):
            if not deployment.is_name(name):
                continue
            try:
                dep = deployment.load(os.path.join(self.os_dir(os_name), name))
            except deployment.DeploymentError:
                out.unreadable.add(name)
                continue
            if dep.sealed is not None:
                out.by_kernel.setdefault(dep.sealed.kernel, []).append(dep)
        return out

    def remove_strays(self, state: State, staged: str | None = None) -> list[str]:
        """Delete deployment directories no entry names, but the staged one: leftovers
        of an interrupted deploy, or of an undeploy (call under the lock, with the os's
        current state)."""
        top = self.os_dir(state.os)
        names = sorted(os.listdir(top))
        keep = {d.name for d in state.deployments} | {"var", staged} | state.kept_by(names)
        removed = []
        for name in names:
            if name not in keep:
                remove_tree(os.path.join(top, name))
                removed.append(name)
        if removed:
            fsync_dir(top)
        return removed


@dataclass
class _SealedRecords:
    by_kernel: dict[str, list[Deployment]]
    unreadable: set[str]             # deployment directories whose record is damaged


class BootCounting(Enum):
    """What systemd-boot's counter in an entry's name says."""
    TRIAL = "trial"          # tries left: blessed when a boot completes
    LAST_TRY = "last_try"    # booted on its last try: blessed if this boot completes
    FAILED = "failed"        # every try used without a boot completing: the loader boots the next entry


def deployment_json(dep: Deployment) -> dict[str, object]:
    """A deployment as the JSON of status lists it (docs/json.md)."""
    return {"os": dep.os, "name": dep.name, "commit": dep.commit, "image_digest": dep.image_digest,
            "kernel_version": dep.kernel_version, "kargs": list(dep.kargs),
            "origin": {"branch": dep.origin.branch, "remote": dep.origin.remote} if dep.origin else None,
            "version": dep.version, "pinned": dep.pinned, "created": dep.created or None,
            "sealed": {"uki": dep.sealed.uki, "efi": bootloader.Kernel(dep.os, dep.sealed.kernel).efi}
            if dep.sealed else None}


@dataclass(frozen=True)
class DeploymentStatus:
    index: int
    deployment: Deployment
    entry: BootEntry
    booted: bool

    @property
    def default(self) -> bool:
        return self.index == 0

    @property
    def rollback(self) -> bool:
        return self.index == 1

    @property
    def boot_failed(self) -> bool:
        """The loader used up the entry's tries and no boot of it is running."""
        return self.entry.failed and not self.booted

    @property
    def boot_counting(self) -> BootCounting | None:
        if self.entry.tries_left is None:
            return None
        if self.entry.tries_left > 0:
            return BootCounting.TRIAL
        return BootCounting.LAST_TRY if self.booted else BootCounting.FAILED

    def to_json(self) -> dict[str, object]:
        counting = self.boot_counting
        return {"index": self.index, **deployment_json(self.deployment), "booted": self.booted,
                "default": self.default, "rollback": self.rollback, "entry": self.entry.filename,
                "tries_left": self.entry.tries_left, "tries_done": self.entry.tries_done,
                "boot_failed": self.boot_failed, "boot_counting": counting.value if counting else None}


def status_rows(state: State) -> list[DeploymentStatus]:
    return [DeploymentStatus(i, d, e, d == state.booted)
            for i, (d, e) in enumerate(zip(state.deployments, state.entries, strict=True))]


class StagedState(Enum):
    PENDING = "pending"      # finalized at shutdown
    STALE = "stale"          # staged during an earlier boot that ended without finalizing it: discarded next
    GONE = "gone"            # its deployment directory is gone: finalizing discards the record


@dataclass(frozen=True)
class StagedStatus:
    record: Staged
    # None: its directory is gone, and finalizing discards the record.
    deployment: Deployment | None

    @property
    def state(self) -> StagedState:
        if self.record.stale:
            return StagedState.STALE
        return StagedState.GONE if self.deployment is None else StagedState.PENDING

    def to_json(self) -> dict[str, object]:
        return {"os": self.record.os, "name": self.record.name, "state": self.state.value,
                "becomes_default": self.record.default, "merge_from": self.record.merge_from,
                "tries": self.record.tries, "verity": self.record.verity,
                "deployment": deployment_json(self.deployment) if self.deployment else None}


def staged_status(sysroot: Sysroot, os_name: str) -> StagedStatus | None:
    """The os's staged deployment, if one is (a damaged record is in State.damaged)."""
    try:
        rec = staged.load(sysroot.top)
    except staged.StagedError:
        return None
    if rec is None or rec.os != os_name:
        return None
    return StagedStatus(rec, staged_deployment(sysroot, rec))


def staged_deployment(sysroot: Sysroot, rec: Staged) -> Deployment | None:
    """The deployment a staged record names; None if its directory is gone."""
    try:
        return deployment.load(os.path.join(sysroot.os_dir(rec.os), rec.name))
    except deployment.DeploymentError:
        return None


def _read_or_nothing(path: str) -> bytes:
    try:
        return bootloader.read_record(path)
    except bootloader.BootError:
        return b""
