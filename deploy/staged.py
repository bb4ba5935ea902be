"""The staged deployment: written like any deployment, but not yet in the boot entries.

    SYSROOT/cfsdeploy/staged.json

OSTree's `deploy --stage`: everything is written while the machine runs, and the last
step (merging /etc again, so edits made after staging are kept, then switching the
entries) is left to `cfsdeploy finalize-staged`, which a systemd unit runs at
shutdown.  At most one deployment of a sysroot is staged.  The record names what the
entry needs; while it exists, cleanup keeps the deployment's directory, kernel and
ref.  A record written during an earlier boot is stale: that boot ended without
finalizing it (a crash, a power cut), and, as OSTree's staged deployment in /run
does, it is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass

from . import deployment, run
from .errors import CfsError
from .fsutil import atomic_write_bytes, fsync_dir

RECORD = "staged.json"
FINALIZE_UNIT = "cfsdeploy-finalize-staged.service"
SYSTEMD_RUNNING = "/run/systemd/system"  # exists when systemd is PID 1 (sd_booted())
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class StagedError(CfsError):
    pass


@dataclass(frozen=True)
class Staged:
    os: str
    name: str                   # the deployment directory deploy/<os>/<name>
    kernel: str                 # its kernel directory: BOOT/cfsdeploy/<os>/<kernel>
    title: str
    verity: str
    tries: int | None           # boot counting tries of its entry (None: off)
    default: bool               # becomes the default (else goes after it)
    merge_from: str | None      # the deployment whose /etc is merged in again
    boot_id: str | None         # the boot it was staged in

    @property
    def stale(self) -> bool:
        return self.boot_id != current_boot_id()


def current_boot_id() -> str | None:
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return None


def load(top: str) -> Staged | None:
    path = os.path.join(top, RECORD)
    try:
        with open(path, "rb") as f:
            rec = Staged(**json.load(f))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        raise StagedError(f"{path}: malformed ({e}); remove it to discard the staged deployment") from None
    # The names become paths that cleanup removes: nothing but plain names.
    if not deployment.is_name(rec.name) or "/" in rec.kernel or rec.kernel.startswith("."):
        raise StagedError(f"{path}: names no deployment; remove it to discard the staged deployment")
    return rec


def save(top: str, rec: Staged) -> None:
    atomic_write_bytes(os.path.join(top, RECORD), (json.dumps(asdict(rec), indent=2) + "\n").encode())


def remove(top: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(top, RECORD))
        fsync_dir(top)


def start_finalize_unit(systemd_running: str = SYSTEMD_RUNNING) -> bool:
    """Start the unit whose stop (at shutdown) finalizes the staged deployment; False
    where systemd is not PID 1, so someone must run `cfsdeploy finalize-staged`."""
    if not os.path.isdir(systemd_running):
        return False
    run.run(["systemctl", "start", FINALIZE_UNIT])
    return True
