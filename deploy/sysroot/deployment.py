"""A deployment's record: deploy/<os>/<name>/deployment.json (see docs/architecture.md, "Sysroot")."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace

from ..boot import bootloader
from ..util.errors import IntegrityError
from ..util.fsutil import atomic_write_bytes

RECORD = "deployment.json"
_NAME = re.compile(r"(?P<commit>[0-9a-f]{12})\.(?P<serial>\d{1,9})")
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


class DeploymentError(IntegrityError):
    pass


@dataclass(frozen=True)
class Origin:
    """Where upgrades of a deployment come from: a branch, of a remote or local."""
    branch: str
    remote: str | None = None

    @property
    def refspec(self) -> str:
        return f"{self.remote}:{self.branch}" if self.remote else self.branch


@dataclass(frozen=True)
class Seal:
    """What boots a sealed deployment: its commit's signed UKI (the object), installed
    as the kernel directory BOOT/cfsdeploy/<os>/<kernel>/uki.efi."""
    uki: str
    kernel: str


@dataclass(frozen=True)
class Deployment:
    os: str
    name: str                      # <first 12 hex of commit>.<serial>
    commit: str
    image_digest: str
    kernel_version: str
    kargs: list[str] = field(default_factory=list)
    origin: Origin | None = None
    version: str | None = None
    pinned: bool = False
    created: str = ""
    # A sealed release: its command line is the UKI's, so kargs is empty.
    sealed: Seal | None = None

    @property
    def path(self) -> str:
        """The deployment's path relative to the sysroot: what cfsdeploy= names."""
        return f"/cfsdeploy/deploy/{self.os}/{self.name}"

    def with_(self, **changes: object) -> Deployment:
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["origin"] = asdict(self.origin) if self.origin else None
        if self.sealed is None:  # the record of an unsealed deployment stays as older versions read it
            del d["sealed"]
        return d


def is_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def next_name(commit: str, existing: list[str]) -> str:
    serials = [int(m["serial"]) for n in existing if (m := _NAME.fullmatch(n)) and m["commit"] == commit[:12]]
    return f"{commit[:12]}.{max(serials, default=-1) + 1}"


def load(directory: str) -> Deployment:
    """The record of deploy/<os>/<name>, checked field by field against its place."""
    path = os.path.join(directory, RECORD)
    if not os.path.lexists(path):
        raise DeploymentError(f"deployment {directory} is missing its {RECORD}")
    try:
        d = json.loads(bootloader.read_record(path))
    except (bootloader.BootError, ValueError) as e:
        raise DeploymentError(f"{path}: malformed ({e})") from None
    why = _invalid(d, os.path.basename(os.path.dirname(directory)), os.path.basename(directory))
    if why is not None:
        raise DeploymentError(f"{path}: malformed ({why})")
    origin, sealed = d.pop("origin"), d.pop("sealed", None)
    return Deployment(origin=Origin(**origin) if origin else None, sealed=Seal(**sealed) if sealed else None, **d)


def is_text(v: object, limit: int = 1024) -> bool:
    """One line of text, as a record may hold it (bootloader's rule for entry lines)."""
    return isinstance(v, str) and len(v) <= limit and not bootloader.NOT_TEXT.search(v)


def _invalid(d: object, os_name: str, name: str) -> str | None:
    """What is wrong with a deployment record found at deploy/<os_name>/<name>, if anything."""
    keys = {f.name for f in fields(Deployment)}
    if not isinstance(d, dict) or set(d) not in (keys, keys - {"sealed"}):
        return f"not an object with the keys {', '.join(sorted(keys))}"
    o, sealed = d["origin"], d.get("sealed")
    checks = {
        "os": d["os"] == os_name,
        "name": d["name"] == name and is_name(name),
        "commit": isinstance(d["commit"], str) and bool(_COMMIT.fullmatch(d["commit"])),
        "image_digest": isinstance(d["image_digest"], str) and bool(_DIGEST.fullmatch(d["image_digest"])),
        "kernel_version": isinstance(d["kernel_version"], str) and bool(bootloader.KVER.fullmatch(d["kernel_version"])),
        "kargs": isinstance(d["kargs"], list) and all(is_text(a) for a in d["kargs"]),
        "origin": o is None or (isinstance(o, dict) and set(o) == {"branch", "remote"} and is_text(o["branch"])
                                and bool(o["branch"]) and (o["remote"] is None or is_text(o["remote"]))),
        "version": d["version"] is None or is_text(d["version"]),
        "pinned": isinstance(d["pinned"], bool),
        "created": is_text(d["created"], 64),
        # (present only in a sealed deployment's record)
        "sealed": "sealed" not in d or (isinstance(sealed, dict) and set(sealed) == {"uki", "kernel"}
                                        and isinstance(sealed["uki"], str) and bool(_DIGEST.fullmatch(sealed["uki"]))
                                        and isinstance(sealed["kernel"], str)
                                        and bool(bootloader.KERNEL_DIR.fullmatch(sealed["kernel"]))
                                        and ".." not in sealed["kernel"] and d["kargs"] == []),
    }
    bad = [k for k, ok in checks.items() if not ok]
    return f"bad {', '.join(bad)}" if bad else None


def save(directory: str, dep: Deployment) -> None:
    atomic_write_bytes(os.path.join(directory, RECORD),
                       (json.dumps(dep.to_json(), indent=2, sort_keys=True) + "\n").encode())
