#!/usr/bin/python3
"""The check that runs inside the test VM at boot (installed by tests/vm.py as
/usr/libexec/cfsdeploy-vm/check, started by cfsdeploy-vm-check.service once
multi-user.target is reached).

It looks at the composed root from inside, prints one `CFSDEPLOY-RESULT key=<json>`
line per fact on the console and runs the shell command lines the host passed for
this boot (QEMU fw_cfg opt/cfsdeploy/steps: a JSON list of strings); then the unit
powers the machine off, or reboots it if a step ran `reboot`.
Plain Python 3 with no imports beyond the standard library: the host reads the facts
and decides what is right.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from typing import Any

MARK = "CFSDEPLOY-RESULT"
OUTPUT = "CFSDEPLOY-OUTPUT"
STEPS = "/sys/firmware/qemu_fw_cfg/by_name/opt/cfsdeploy/steps/raw"
CANARIES = "/usr/share/cfsdeploy-vm"
# What releases change (tests/vm.py set_release), read back as text
FILES = ("/usr/share/cfsdeploy-vm/release", "/etc/cfsdeploy-vm/release.conf", "/etc/cfsdeploy-vm/local.conf",
         "/etc/cfsdeploy-vm/after-staging.conf")
# The steps' `reboot` (see tests/vm.py REBOOT_SHIM)
SHIMS = "/usr/libexec/cfsdeploy-vm/bin"
LOADER_ENTRY = "/sys/firmware/efi/efivars/LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"


def say(key: str, value: Any) -> None:
    print(f"{MARK} {key}={json.dumps(value)}", flush=True)


def show(text: str) -> None:
    for line in text.splitlines():
        print(f"{OUTPUT} {line}", flush=True)


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True)


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def cmdline() -> dict[str, str]:
    with open("/proc/cmdline") as f:
        return dict(w.partition("=")[::2] for w in f.read().split())


def mounts() -> dict[str, dict[str, str]]:
    """/proc/self/mountinfo by mount point, the topmost where they stack."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            _, _, _, root, target, options, *_ = fields.split()
            fstype, source, super_options = rest.split()
            out[target] = {"root": root, "options": options, "fstype": fstype, "source": source,
                           "super": super_options}
    return out


def writable(path: str) -> str:
    probe = os.path.join(path, ".cfsdeploy-vm-probe")
    try:
        with open(probe, "w") as f:
            f.write("x")
        os.unlink(probe)
        return "yes"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))


def read_text(path: str) -> str:
    """A file's text, or the errno name reading it gave."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))


def read_digest(path: str) -> str:
    """sha256 of a file's content, or the errno name reading it gave."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))


def check_root(m: dict[str, dict[str, str]]) -> None:
    root = m["/"]
    say("root.fstype", root["fstype"])
    say("root.source", root["source"])
    say("root.readonly", "ro" in root["options"].split(","))
    opts = dict(o.partition("=")[::2] for o in root["super"].split(","))
    say("root.lowerdir", opts.get("lowerdir", ""))
    say("root.metacopy", opts.get("metacopy", ""))
    say("root.redirect_dir", opts.get("redirect_dir", ""))
    say("root.verity", opts.get("verity", ""))
    for d in ("/etc", "/var", "/sysroot", "/boot"):
        mi = m.get(d)
        say(f"mount.{d}", {"fstype": mi["fstype"], "root": mi["root"], "source": mi["source"]} if mi else None)
    for d in ("/etc", "/var", "/usr", "/sysroot", "/boot"):
        say(f"writable.{d}", writable(d))


def check_image(args: dict[str, str]) -> None:
    digest = args.get("cfsdeploy.digest", "")
    image = f"/sysroot/cfsdeploy/repo/objects/{digest[:2]}/{digest[2:]}"
    say("image.path", image)
    st = os.stat(image)
    # The loop device the erofs image is mounted from: the one whose backing file is
    # the image object (the name it was opened by is gone with its bind mount).
    loops = json.loads(sh("losetup", "--json", "--list", "-O", "NAME,BACK-INO,BACK-MAJ:MIN,RO").stdout
                       or '{"loopdevices": []}')["loopdevices"]
    found = []
    for lo in loops:
        maj, _, mi = str(lo["back-maj:min"]).partition(":")
        if int(lo["back-ino"]) == st.st_ino and os.makedev(int(maj), int(mi)) == st.st_dev:
            name = os.path.basename(lo["name"])
            found.append({"loop": name, "ro": bool(lo["ro"]),
                          "erofs": os.path.isdir(f"/sys/fs/erofs/{name}")})
    say("image.loops", found)
    r = sh("fsverity", "measure", image)
    say("image.measured", r.stdout.split()[0].removeprefix("sha256:") if r.returncode == 0
        else "none: " + r.stderr.strip())


def check_status() -> None:
    r = sh("cfsdeploy", "status", "--json")
    say("status.rc", r.returncode)
    if r.returncode != 0:
        show(r.stderr)
        return
    status = json.loads(r.stdout)
    say("status.deployments", [{k: d.get(k) for k in ("name", "commit", "version", "booted", "default", "image_digest",
                                                       "entry", "tries_left", "tries_done", "boot_failed", "sealed")}
                               for d in status["deployments"]])
    r = sh("cfsdeploy", "status")
    say("status.text", r.stdout + r.stderr)


def check_loader() -> None:
    """The entry systemd-boot says it booted (a UTF-16 EFI variable after 4 bytes of
    attributes)."""
    try:
        with open(LOADER_ENTRY, "rb") as f:
            say("loader.entry", f.read()[4:].decode("utf-16-le").rstrip("\0"))
    except OSError as e:
        say("loader.entry", errno.errorcode.get(e.errno or 0, str(e)))


def check_times() -> None:
    """What systemd measured of this boot, in seconds: from the kernel's start until
    systemd started on the real root (kernel and initramfs: initramfs-tools runs no
    systemd, so systemd cannot split the two), and from then until multi-user.target."""
    started = sh("systemctl", "show", "--property=UserspaceTimestampMonotonic", "--value").stdout
    reached = sh("systemctl", "show", "--property=ActiveEnterTimestampMonotonic", "--value", "multi-user.target")
    say("times", {"kernel+initramfs": round(int(started) / 1e6, 2),
                  "userspace": round((int(reached.stdout) - int(started)) / 1e6, 2)})


def check_systemd() -> None:
    say("systemd.multi_user", sh("systemctl", "is-active", "multi-user.target").stdout.strip())
    say("systemd.boot_complete", sh("systemctl", "is-active", "boot-complete.target").stdout.strip())
    failed = sh("systemctl", "list-units", "--state=failed", "--plain", "--no-legend", "--no-pager").stdout
    units = [line.split()[0] for line in failed.splitlines() if line.strip()]
    say("systemd.failed", units)
    for unit in units:
        show(sh("journalctl", "-b", "-u", unit, "-n", "15", "--no-pager").stdout)


def run_steps() -> None:
    sh("modprobe", "-q", "qemu_fw_cfg")
    try:
        with open(STEPS) as f:
            steps = json.load(f)
    except FileNotFoundError:
        steps = []
    env = dict(os.environ, PATH=f"{SHIMS}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}")
    for i, cmd in enumerate(steps):
        started = uptime()
        r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, env=env)
        show(f"$ {cmd}\n{r.stdout}{r.stderr}")
        say(f"step.{i}", {"cmd": cmd, "rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr,
                          "seconds": round(uptime() - started, 1)})


def main() -> None:
    say("check.start", uptime())
    args = cmdline()
    say("cmdline", {k: v for k, v in args.items() if k.startswith("cfsdeploy")})
    with open("/proc/cmdline") as f:
        say("cmdline.raw", f.read().strip())
    m = mounts()
    checks = [lambda: check_root(m), check_loader, check_times, check_systemd,
              lambda: say("files", {p: read_text(p) for p in FILES}),
              lambda: say("canaries", {n: read_digest(os.path.join(CANARIES, n))
                                       for n in sorted(os.listdir(CANARIES)) if n.startswith("canary")})]
    # a sealed boot names only its image; the plain ext4 boot the times are compared with, neither
    if "cfsdeploy" in args or "cfsdeploy.digest" in args:
        checks[1:1] = [lambda: check_image(args), check_status]
    for check in [*checks, run_steps]:
        try:
            check()
        except Exception as e:  # one broken check must not hide the others
            say("error", f"{type(e).__name__}: {e}")
    say("check.done", uptime())
    sys.stdout.flush()
    os.sync()


if __name__ == "__main__":
    main()
