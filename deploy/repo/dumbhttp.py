"""Keeping a repository servable by a plain static HTTP server.

Clients need only GETs (git's "dumb HTTP" layout): git/info/refs lists every ref
with its commit, git/objects/info/packs lists the packs, and the objects are files
at their names.  Like `git update-server-info`, and byte for byte the same output:
the repository's own operations call update_server_info() under the lock after
any ref change (commit, tag, pull, remote removal).

Compression is the server's business, as HTTP content encoding: clients ask for
gzip (except for git objects, which are deflated already) and count what arrives.
Measured on a Debian 12 rootfs (13.5k files, 878 MB; benchmarks/bench_pull.py), a
full pull moves 878 MB uncompressed, 408 MB with nginx `gzip on; gzip_types *;` at
its default level 1, 386 MB at level 6 (ostree pull from an archive repository: 387
MB), 385 MB with gzip -9 copies made ahead for `gzip_static on`.  Level 1 costs the
server least CPU per byte and keeps the repository servable as it is, so:

    gzip on; gzip_types *; gzip_min_length 256;    # gzip_comp_level 1 (the default)

Precompressed copies (gzip_static) suit a mirror that serves many clients, but
belong in a published copy of the repository, not beside the objects.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pygit2

from ..util.fsutil import atomic_write_bytes

if TYPE_CHECKING:  # repository.py calls update_server_info() after every ref change
    from .repository import Repository

INFO_REFS = "info/refs"
INFO_PACKS = "objects/info/packs"


def info_refs(git: pygit2.Repository) -> bytes:
    """`<id>\\t<ref>` per ref, sorted by name; annotated tags add the commit they tag as `<ref>^{}`."""
    lines = []
    for name in sorted(git.references):
        try:
            ref = git.references[name].resolve()
            obj = git[ref.target]
        except (KeyError, pygit2.GitError):
            continue  # a dangling ref is nothing a client can fetch
        lines.append(f"{obj.id}\t{name}\n")
        if obj.type == pygit2.enums.ObjectType.TAG:
            lines.append(f"{obj.peel(None).id}\t{name}^{{}}\n")
    return "".join(lines).encode()


def info_packs(git_dir: str) -> bytes:
    pack_dir = os.path.join(git_dir, "objects", "pack")
    names = sorted(n for n in os.listdir(pack_dir) if n.endswith(".pack")) if os.path.isdir(pack_dir) else []
    return "".join(f"P {n}\n" for n in names).encode() + b"\n"


def update_server_info(repo: Repository) -> None:
    """Rewrite git/info/refs and git/objects/info/packs atomically (under the lock)."""
    write_server_info(repo.path, repo.git)


def write_server_info(repo_path: str, git: pygit2.Repository | None = None) -> None:
    """update_server_info() of the repository at repo_path (also one being created)."""
    git_dir = os.path.join(repo_path, "git")
    git = git or pygit2.Repository(git_dir)
    for rel, data in ((INFO_REFS, info_refs(git)), (INFO_PACKS, info_packs(git_dir))):
        path = os.path.join(git_dir, rel)
        try:
            with open(path, "rb") as f:
                if f.read() == data:
                    continue
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        # Staged in tmp/, which the lock clears, so a crash leaves no stray temp file.
        atomic_write_bytes(path, data, tmpdir=os.path.join(repo_path, "tmp"))
