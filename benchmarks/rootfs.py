"""A real Debian root filesystem for benchmarks, built once and cached.

    python benchmarks/rootfs.py          # build if missing, print the path

The tree is `debootstrap --variant=minbase --include=linux-image-amd64,systemd,python3,perl
bookworm` from the mirror in /etc/apt/sources.list.d, /dev emptied (about 880 MB,
17k entries), at

    /var/tmp/cfsdeploy-bench/rootfs-bookworm

(or $CFSDEPLOY_BENCH_DIR/rootfs-bookworm).  It is built in a sibling directory and
renamed into place, so the path exists only once it is whole; a lock lets several
benchmarks ask for it at once.  Delete it to rebuild.  Needs root and debootstrap.
Treat it as read-only and commit a copy (cp -a) where timings matter: a hardlink
to its files (cp -al) changes their ctime and link count under a running scan.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import sys

from cfsdeploy.util.run import run

SUITE = "bookworm"
PACKAGES = "linux-image-amd64,systemd,python3,perl"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def cache_dir() -> str:
    return os.environ.get("CFSDEPLOY_BENCH_DIR", "/var/tmp/cfsdeploy-bench")


def rootfs_path() -> str:
    return os.path.join(cache_dir(), f"rootfs-{SUITE}")


def apt_mirror() -> str:
    """The first deb822 source serving the suite (the host's own mirror)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in open(path).read().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines()
                          if ":" in line and not line.startswith("#"))
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if SUITE in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                return fields["URIs"].split()[0]
    return DEFAULT_MIRROR


def ensure_rootfs(log=lambda m: print(m, file=sys.stderr)) -> str:
    """The cached tree's path, building it first if it is missing."""
    path = rootfs_path()
    os.makedirs(cache_dir(), exist_ok=True)
    with open(os.path.join(cache_dir(), "rootfs.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(path):
            return path
        partial = path + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        mirror = apt_mirror()
        log(f"building {path} with debootstrap from {mirror} (a few minutes)...")
        run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, partial, mirror])
        # An empty /dev, as image builders ship it (the booted system mounts devtmpfs
        # there), and because `ostree commit` refuses device nodes.
        dev = os.path.join(partial, "dev")
        for name in os.listdir(dev):
            entry = os.path.join(dev, name)
            if os.path.isdir(entry) and not os.path.islink(entry):
                shutil.rmtree(entry)
            else:
                os.unlink(entry)
        os.rename(partial, path)
    return path


if __name__ == "__main__":
    print(ensure_rootfs())
