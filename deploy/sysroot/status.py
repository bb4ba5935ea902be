"""What `status` shows of an os: its deployments in boot order, what booted and how it
is checked, the staged deployment, the records that failed their checks, and what
was repaired.  to_json() is the document of `status --json` (docs/json.md)."""

from __future__ import annotations

from dataclasses import dataclass

from ..boot.bootloader import BootEntry, Damaged, Repair
from .booted import BootVerity, boot_verity
from .entries import repair
from .layout import DeploymentStatus, StagedStatus, Sysroot, staged_status, status_rows
from .locking import NO_WAIT, LockPolicy

SCHEMA = 1  # of status --json: raised by a change of a key's name, type or meaning


@dataclass(frozen=True)
class BrokenEntry:
    """An entry that parses but names no usable deployment: it cannot boot."""
    entry: BootEntry
    message: str

    def to_json(self) -> dict[str, object]:
        return {"entry": self.entry.filename, "message": self.message}


@dataclass(frozen=True)
class DamagedRecord:
    record: Damaged
    # The deployments and kernel directories its bytes name, which stay while it exists.
    keeps: list[str]

    def to_json(self) -> dict[str, object]:
        return {"kind": self.record.kind.value, "path": self.record.path, "message": self.record.reason,
                "keeps": self.keeps}


@dataclass(frozen=True)
class Status:
    os: str
    deployments: list[DeploymentStatus]
    # None unless the machine runs a deployment of this os.
    booted_verity: BootVerity | None
    staged: StagedStatus | None
    broken_entries: list[BrokenEntry]
    damaged: list[DamagedRecord]
    repairs: list[Repair]

    def to_json(self) -> dict[str, object]:
        return {"schema": SCHEMA, "os": self.os, "deployments": [r.to_json() for r in self.deployments],
                "booted_verity": self.booted_verity.to_json() if self.booted_verity else None,
                "staged": self.staged.to_json() if self.staged else None,
                "broken_entries": [b.to_json() for b in self.broken_entries],
                "damaged": [d.to_json() for d in self.damaged],
                "repairs": [r.to_json() for r in self.repairs]}


def status(sysroot: Sysroot, os_name: str, *, lock: LockPolicy = NO_WAIT) -> Status:
    """The os's status, after repairing what an interrupted run left (which takes the
    lock only then)."""
    repair(sysroot, lock=lock)
    state = sysroot.state(os_name)
    present = sysroot.directories(os_name)
    return Status(os_name, status_rows(state),
                  boot_verity(sysroot.cmdline()) if state.booted is not None else None,
                  staged_status(sysroot, os_name),
                  [BrokenEntry(e, why) for e, why in state.broken],
                  [DamagedRecord(d, sorted(d.mentions(present))) for d in state.damaged],
                  list(sysroot.repairs))
