"""Check a repository: commits, manifests, images and objects.

Quick mode checks that everything the history needs exists; the full check also
verifies every object's fs-verity digest against its name, rebuilds each commit's
image from its manifest and compares the digest with the commit's trailer, and
runs `git fsck` on the history.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pygit2

from ..composefs import dumpfile, fsverity, imagewriter
from ..util.errors import CfsError
from ..util.run import run
from .repository import (
    MANIFEST,
    ROOT_REFS,
    TRAILER_FORMAT,
    Repository,
    image_digest_of,
    objects_of,
    reachable_commits,
    trailers,
)


@dataclass
class FsckReport:
    commits: int = 0
    # Commits kept for their history only, without their objects.
    history_only: int = 0
    objects_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def fsck(repo: Repository, *, quick: bool = False) -> FsckReport:
    report = FsckReport()
    needed: dict[bytes, str] = {}
    tips = {repo.git.references[name].peel(pygit2.Commit).id for name in repo.git.references
            if name.startswith(ROOT_REFS)}
    for commit in reachable_commits(repo):
        report.commits += 1
        cid = str(commit.id)[:12]
        try:
            root = dumpfile.parse(commit.tree[MANIFEST].data)
            image_digest = image_digest_of(commit)
        except (KeyError, CfsError) as e:
            report.problems.append(f"commit {cid}: bad manifest or trailers: {e}")
            continue
        # An older commit pulled for its history alone (its image was never built
        # here) has metadata but no objects, and that is no fault.
        if commit.id not in tips and not repo.objects.has(image_digest):
            report.history_only += 1
            continue
        needed.setdefault(image_digest, f"image of commit {cid}")
        for digest in objects_of(root):
            needed.setdefault(digest, f"commit {cid}")
        if not quick:
            fmt = int(trailers(commit.message).get(TRAILER_FORMAT, "0") or 0)
            rebuilt = imagewriter.build(root, min_version=fmt, max_version=fmt).image
            if fsverity.digest_bytes(rebuilt) != image_digest:
                report.problems.append(f"commit {cid}: manifest does not give the image named by its trailer")
    for digest, user in sorted(needed.items()):
        if not repo.objects.has(digest):
            report.problems.append(f"missing object {digest.hex()} (needed by {user})")
    if not quick:
        for sub in sorted(os.listdir(repo.objects.path)):
            subdir = os.path.join(repo.objects.path, sub)
            if len(sub) != 2 or not os.path.isdir(subdir):
                continue
            for name in sorted(os.listdir(subdir)):
                report.objects_checked += 1
                if fsverity.digest_file(os.path.join(subdir, name)).hex() != sub + name:
                    report.problems.append(f"corrupt object {sub}{name}")
        result = run(["git", "--git-dir", os.path.join(repo.path, "git"), "fsck", "--strict"],
                     check=False, capture=True)
        if result.returncode != 0:
            report.problems.append("git fsck: " + result.stderr.decode(errors="replace").strip().splitlines()[-1])
    return report
