"""Keeping a repository servable by a plain static HTTP server.

Clients need only GETs (git's "dumb HTTP" layout): git/info/refs lists every ref
with its commit, git/objects/info/packs lists the packs, and the objects are files
at their names.  Like `git update-server-info`, and byte for byte the same output:
call update_server_info() under the repository lock after any ref changes.
"""

from __future__ import annotations

import os

import pygit2

from .fsutil import atomic_write_bytes
from .repository import Repository

INFO_REFS = "info/refs"
INFO_PACKS = "objects/info/packs"


def info_refs(repo: Repository) -> bytes:
    """`<id>\\t<ref>` per ref, sorted by name; annotated tags add the commit they tag as `<ref>^{}`."""
    lines = []
    for name in sorted(repo.git.references):
        try:
            ref = repo.git.references[name].resolve()
            obj = repo.git[ref.target]
        except (KeyError, pygit2.GitError):
            continue  # a dangling ref is nothing a client can fetch
        lines.append(f"{obj.id}\t{name}\n")
        if obj.type == pygit2.enums.ObjectType.TAG:
            lines.append(f"{obj.peel(None).id}\t{name}^{{}}\n")
    return "".join(lines).encode()


def info_packs(repo: Repository) -> bytes:
    pack_dir = os.path.join(repo.path, "git", "objects", "pack")
    names = sorted(n for n in os.listdir(pack_dir) if n.endswith(".pack")) if os.path.isdir(pack_dir) else []
    return "".join(f"P {n}\n" for n in names).encode() + b"\n"


def update_server_info(repo: Repository) -> None:
    """Rewrite git/info/refs and git/objects/info/packs atomically (call under the lock)."""
    for rel, data in ((INFO_REFS, info_refs(repo)), (INFO_PACKS, info_packs(repo))):
        path = os.path.join(repo.path, "git", rel)
        try:
            with open(path, "rb") as f:
                if f.read() == data:
                    continue
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        # Staged in tmp/, which the lock clears, so a crash leaves no stray temp file.
        atomic_write_bytes(path, data, tmpdir=os.path.join(repo.path, "tmp"))
