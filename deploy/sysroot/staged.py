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
import re
from dataclasses import asdict, dataclass, fields

from ..boot import bootloader, kargs
from ..util import run
from ..util.errors import IntegrityError
from ..util.fsutil import atomic_write_bytes, fsync_dir
from . import deployment

RECORD = "staged.json"
FINALIZE_UNIT = "cfsdeploy-finalize-staged.service"
SYSTEMD_RUNNING = "/run/systemd/system"  # exists when systemd is PID 1 (sd_booted())
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class StagedError(IntegrityError):
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


_BOOT_ID_TEXT = re.compile(r"[0-9A-Za-z-]{1,64}")


def load(top: str) -> Staged | None:
    """The staged record, checked field by field (its names become paths that cleanup
    keeps or removes); StagedError for a damaged one, which the caller sets aside."""
    path = os.path.join(top, RECORD)
    if not os.path.lexists(path):
        return None
    try:
        d = json.loads(bootloader.read_record(path))
    except (bootloader.BootError, ValueError) as e:
        raise StagedError(f"{path}: malformed ({e})") from None
    why = _invalid(d)
    if why is not None:
        raise StagedError(f"{path}: malformed ({why})")
    return Staged(**d)


def _invalid(d: object) -> str | None:
    keys = {f.name for f in fields(Staged)}
    if not isinstance(d, dict) or set(d) != keys:
        return f"not an object with the keys {', '.join(sorted(keys))}"
    tries = d["tries"]
    checks = {
        "os": isinstance(d["os"], str) and bool(bootloader.OS_NAME.fullmatch(d["os"])),
        "name": isinstance(d["name"], str) and deployment.is_name(d["name"]),
        "kernel": isinstance(d["kernel"], str) and bool(bootloader.KERNEL_DIR.fullmatch(d["kernel"])),
        "title": (deployment.is_text(d["title"], bootloader.MAX_TITLE)
                  and d["title"] == bootloader.clean_title(d["title"])),
        "verity": d["verity"] in kargs.VERITY_MODES,
        "tries": tries is None or (type(tries) is int and 1 <= tries <= bootloader.MAX_TRIES),
        "default": isinstance(d["default"], bool),
        "merge_from": d["merge_from"] is None or (isinstance(d["merge_from"], str)
                                                  and deployment.is_name(d["merge_from"])),
        "boot_id": d["boot_id"] is None or (isinstance(d["boot_id"], str)
                                            and bool(_BOOT_ID_TEXT.fullmatch(d["boot_id"]))),
    }
    bad = [k for k, ok in checks.items() if not ok]
    return f"bad {', '.join(bad)}" if bad else None


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
