"""Check a repository: commits, manifests, images and objects.

Quick mode checks that everything the history needs exists; the full check also
verifies every object's fs-verity digest against its name, rebuilds each commit's
image from its manifest and compares the digest with the commit's trailer, and
runs `git fsck` on the history.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

import pygit2

from ..composefs import dumpfile, fsverity, imagewriter
from ..composefs.fsverity import Digest
from ..util.errors import CfsError
from ..util.run import run
from .repository import (
    ROOT_REFS,
    TRAILER_FORMAT,
    Repository,
    image_digest_of,
    manifest_data,
    objects_of,
    reachable_commits,
    trailers,
)


class ProblemKind(enum.Enum):
    BAD_COMMIT = "bad_commit"  # its manifest or trailers do not parse
    IMAGE_MISMATCH = "image_mismatch"  # its manifest does not give the image its trailer names
    MISSING_OBJECT = "missing_object"
    CORRUPT_OBJECT = "corrupt_object"  # its content does not have the digest it is named by
    GIT_FSCK = "git_fsck"  # `git fsck` found the history damaged


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    commit: str | None = None  # the commit concerned, or that needs the object
    object: str | None = None  # the object's name (a digest in hex, unless the file is stray)
    image: bool = False  # the missing object is the commit's image
    detail: str | None = None  # the parse error, or git fsck's last line


@dataclass
class FsckReport:
    commits: int = 0
    # Commits kept for their history only, without their objects.
    history_only: int = 0
    objects_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def fsck(repo: Repository, *, quick: bool = False) -> FsckReport:
    report = FsckReport()
    problems = report.problems
    needed: dict[Digest, tuple[str, bool]] = {}  # digest -> (commit, whether as its image)
    tips = {repo.git.references[name].peel(pygit2.Commit).id for name in repo.git.references
            if name.startswith(ROOT_REFS)}
    for commit in reachable_commits(repo):
        report.commits += 1
        cid = str(commit.id)
        try:
            root = dumpfile.parse(manifest_data(commit))
            image_digest = image_digest_of(commit)
        except CfsError as e:
            problems.append(Problem(ProblemKind.BAD_COMMIT, commit=cid, detail=str(e)))
            continue
        # An older commit pulled for its history alone (its image was never built
        # here) has metadata but no objects, and that is no fault.
        if commit.id not in tips and not repo.objects.has(image_digest):
            report.history_only += 1
            continue
        needed.setdefault(image_digest, (cid, True))
        for digest in objects_of(root):
            needed.setdefault(digest, (cid, False))
        if not quick:
            fmt = trailers(commit.message).get(TRAILER_FORMAT, "0")
            if not fmt.isdigit() or int(fmt) > imagewriter.FORMAT_VERSION_MAX:
                problems.append(Problem(ProblemKind.BAD_COMMIT, commit=cid, detail=f"{TRAILER_FORMAT}: {fmt}"))
                continue
            try:
                rebuilt = imagewriter.build(root, min_version=int(fmt), max_version=int(fmt)).image
            except CfsError as e:  # a manifest no image can be built from
                problems.append(Problem(ProblemKind.BAD_COMMIT, commit=cid, detail=str(e)))
                continue
            if fsverity.digest_bytes(rebuilt) != image_digest:
                problems.append(Problem(ProblemKind.IMAGE_MISMATCH, commit=cid))
    for digest, (cid, is_image) in sorted(needed.items()):
        if not repo.objects.has(digest):
            problems.append(Problem(ProblemKind.MISSING_OBJECT, commit=cid, object=digest.hex(), image=is_image))
    if not quick:
        for sub in sorted(os.listdir(repo.objects.path)):
            subdir = os.path.join(repo.objects.path, sub)
            if len(sub) != 2 or not os.path.isdir(subdir):
                continue
            for name in sorted(os.listdir(subdir)):
                report.objects_checked += 1
                if fsverity.digest_file(os.path.join(subdir, name)).hex() != sub + name:
                    problems.append(Problem(ProblemKind.CORRUPT_OBJECT, object=sub + name))
        result = run(["git", "--git-dir", os.path.join(repo.path, "git"), "fsck", "--strict"],
                     check=False, capture=True)
        if result.returncode != 0:
            problems.append(Problem(ProblemKind.GIT_FSCK,
                                    detail=result.stderr.decode(errors="replace").strip().splitlines()[-1]))
    return report
