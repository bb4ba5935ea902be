"""Synthetic dumpfiles shaped like a real OS tree, for benchmarks."""

from __future__ import annotations

import hashlib
import random


def synthetic_dump(entries: int, seed: int = 1) -> bytes:
    """About `entries` lines: nested directories of ~25 entries, regular files with
    digests (some inline), symlinks, SELinux labels on everything, spread mtimes."""
    rng = random.Random(seed)
    labels = [b"system_u:object_r:%s_t:s0\\x00" % t for t in (b"usr", b"bin", b"lib", b"etc")]
    out = [b"/ 4096 40755 2 0 0 0 1700000000.0 - - - security.selinux=" + labels[0] + b"\n"]
    dirs = [b""]
    n = 1
    while n < entries:
        # Mostly recent directories, as a real tree is filled, but no deeper than 8.
        parent = dirs[-rng.randrange(1, min(len(dirs), 50) + 1)]
        if parent.count(b"/") >= 8:
            parent = dirs[rng.randrange(len(dirs))]
            if parent.count(b"/") >= 8:
                parent = b""
        for _ in range(25):
            if n >= entries:
                break
            name = b"%s/e%06d" % (parent, n)
            mtime = 1700000000 + rng.randrange(3) * 86400
            label = labels[rng.randrange(len(labels))]
            kind = rng.random()
            if kind < 0.12:
                out.append(b"%s 4096 40755 2 0 0 0 %d.0 - - - security.selinux=%s\n" % (name, mtime, label))
                dirs.append(name)
            elif kind < 0.22:
                out.append(b"%s 11 120777 1 0 0 0 %d.0 ../lib/x.so - - security.selinux=%s\n"
                           % (name, mtime, label))
            elif kind < 0.32:
                out.append(b"%s 5 100644 1 0 0 0 %d.0 - hello - security.selinux=%s\n" % (name, mtime, label))
            else:
                digest = hashlib.sha256(name).hexdigest().encode()
                size = rng.randrange(65, 4 << 20)
                out.append(b"%s %d 100755 1 0 0 0 %d.0 %s/%s - %s security.selinux=%s\n"
                           % (name, size, mtime, digest[:2], digest[2:], digest, label))
            n += 1
    return b"".join(out)
