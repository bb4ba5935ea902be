"""A deployment's record: deploy/<os>/<name>/deployment.json (see docs/architecture.md, "Sysroot")."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace

from .errors import CfsError
from .fsutil import atomic_write_bytes

RECORD = "deployment.json"
_NAME = re.compile(r"(?P<commit>[0-9a-f]{12})\.(?P<serial>\d+)")


class DeploymentError(CfsError):
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

    @property
    def path(self) -> str:
        """The deployment's path relative to the sysroot: what cfsdeploy= names."""
        return f"/cfsdeploy/deploy/{self.os}/{self.name}"

    def with_(self, **changes: object) -> Deployment:
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["origin"] = asdict(self.origin) if self.origin else None
        return d


def is_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def next_name(commit: str, existing: list[str]) -> str:
    serials = [int(m["serial"]) for n in existing if (m := _NAME.fullmatch(n)) and m["commit"] == commit[:12]]
    return f"{commit[:12]}.{max(serials, default=-1) + 1}"


def load(directory: str) -> Deployment:
    path = os.path.join(directory, RECORD)
    try:
        with open(path, "rb") as f:
            d = json.load(f)
        origin = d.pop("origin", None)
        return Deployment(origin=Origin(**origin) if origin else None, **d)
    except FileNotFoundError:
        raise DeploymentError(f"deployment {directory} is missing its {RECORD}") from None
    except (ValueError, TypeError) as e:
        raise DeploymentError(f"{path}: malformed ({e})") from None


def save(directory: str, dep: Deployment) -> None:
    atomic_write_bytes(os.path.join(directory, RECORD),
                       (json.dumps(dep.to_json(), indent=2, sort_keys=True) + "\n").encode())
