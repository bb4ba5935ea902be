#!/usr/bin/python3
"""PID 1 of the power-cut VM test (installed by tests/vm.py as
/usr/libexec/cfsdeploy-vm/cut-runner, started with `init=` instead of systemd).

It mounts the ESP at /boot and the updates disk at /mnt, then runs cfsdeploy's
commands that change the boot directory, round after round, each followed by an
idle pause of up to IDLE seconds (the kernel writes dirty data back on its own in
that time, so a command that returned but did not make its writes durable is
caught there too).  The host pauses the machine at random moments, copies its
disk (what a power cut at that instant would leave) and lets it go on; it learns
from the console which commands had returned, and what the entries were then:

    CFSDEPLOY-CUT begin {"i": 3, "cmd": "..."}
    CFSDEPLOY-CUT end {"i": 3, "rc": 0, "seconds": 4.2, "entries": [[cfsdeploy=, options], ...]}

`entries` lists the os's entries, default first, as this kernel sees them.
Plain Python 3 with only the standard library.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time

MARK = "CFSDEPLOY-CUT"
IDLE = 25.0
BRANCH_REF = "origin/debian/13/x86_64/vmtest"  # the remote `install to-disk` adds
ENTRIES = "/boot/loader/entries"
ENTRY = re.compile(r"cfsdeploy-debian-(\d+)(?:\+\d+(?:-\d+)?)?\.conf")
COMMANDS = (
    "cfsdeploy kargs --append cfsdeploy.cuttest=1",
    "cfsdeploy upgrade",
    "cfsdeploy rollback",
    "cfsdeploy kargs --delete cfsdeploy.cuttest=1",
    f"cfsdeploy deploy {BRANCH_REF}",
    "undeploy",  # the last deployment that is not the booted one (see undeploy())
    "cfsdeploy cleanup",
    f"cfsdeploy deploy --stage {BRANCH_REF}",
    "cfsdeploy finalize-staged",   # what the shutdown unit runs
)


def say(kind: str, **fields: object) -> None:
    print(f"{MARK} {kind} {json.dumps(fields)}", flush=True)


def sh(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True)


def entries() -> list[list[str]]:
    """The os's entries as (cfsdeploy=, options), default first."""
    found = []
    for name in os.listdir(ENTRIES):
        m = ENTRY.fullmatch(name)
        if m is None:
            continue
        with open(os.path.join(ENTRIES, name), errors="replace") as f:
            text = f.read()
        options = next((line[len("options "):].strip() for line in text.splitlines()
                        if line.startswith("options ")), "")
        path = next((w[len("cfsdeploy="):] for w in options.split() if w.startswith("cfsdeploy=")), "")
        found.append((int(m[1]), [path, options]))
    return [e for _, e in sorted(found, reverse=True)]


def undeploy() -> str:
    """undeploy INDEX for the last deployment that is not the booted one."""
    out = sh("cfsdeploy status --json")
    rows = json.loads(out.stdout)["deployments"] if out.returncode == 0 else []
    choices = [r["index"] for r in rows if not r["booted"]]
    return f"cfsdeploy undeploy {choices[-1]}" if len(rows) > 1 and choices else "true"


def setup() -> None:
    os.environ["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    # What systemd would have mounted: /dev/shm (multiprocessing's semaphores) and /tmp
    os.makedirs("/dev/shm", exist_ok=True)
    for argv in (["mount", "-t", "tmpfs", "tmpfs", "/dev/shm"], ["mount", "-t", "tmpfs", "tmpfs", "/tmp"],
                 ["mount", "-t", "vfat", "-o", "umask=0077", "/dev/vda1", "/boot"],
                 ["mount", "-o", "ro", "/dev/vdb", "/mnt"]):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            say("error", what=" ".join(argv), stderr=r.stderr)


def main() -> None:
    setup()
    with open("/proc/cmdline") as f:
        args = dict(w.partition("=")[::2] for w in f.read().split())
    rng = random.Random(args.get("cfsdeploy.cutseed", "0"))
    rounds = int(args.get("cfsdeploy.cutrounds", "1"))
    say("ready", entries=entries())
    i = 0
    for _ in range(rounds):
        for cmd in COMMANDS:
            i += 1
            cmd = undeploy() if cmd == "undeploy" else cmd
            say("begin", i=i, cmd=cmd)
            t = time.monotonic()
            r = sh(cmd)
            say("end", i=i, rc=r.returncode, seconds=round(time.monotonic() - t, 1), entries=entries(),
                output=(r.stdout + r.stderr)[-2000:])
            time.sleep(rng.uniform(0, IDLE))
    say("done")
    while True:  # PID 1 must not exit; the host ends the machine
        time.sleep(3600)


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:  # PID 1 dying panics the kernel: say why, then wait
        say("error", what=repr(e))
        while True:
            time.sleep(3600)
