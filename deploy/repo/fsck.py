"""Check a repository: commits, manifests, images and objects.

Quick mode checks that everything the history needs exists (a sealed commit's UKI
and loader too); the full check also verifies every object's fs-verity digest
against its name, rebuilds each commit's image from its manifest and compares the
digest with the commit's trailer, checks that a sealed commit's UKI seals that image
(with the seal_check given: reading a UKI is the boot layer's), and runs `git fsck`
on the history.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
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
    TrailerError,
    image_digest_of,
    manifest_data,
    objects_of,
    reachable_commits,
    sealed_of,
    trailers,
)

# Why the UKI at a path does not seal an image (its command line), or None.
SealCheck = Callable[[str, Digest], str | None]


class ProblemKind(enum.Enum):
    BAD_COMMIT = "bad_commit"  # its manifest or trailers do not parse
    IMAGE_MISMATCH = "image_mismatch"  # its manifest does not give the image its trailer names
    MISSING_OBJECT = "missing_object"
    CORRUPT_OBJECT = "corrupt_object"  # its content does not have the digest it is named by
    GIT_FSCK = "git_fsck"  # `git fsck` found the history damaged
    BAD_SEAL = "bad_seal"  # its Cfsdeploy-Sealed-* trailers are damaged
    SEAL_MISMATCH = "seal_mismatch"  # its sealed UKI does not seal its image


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    commit: str | None = None  # the commit concerned, or that needs the object
    object: str | None = None  # the object's name (a digest in hex, unless the file is stray)
    image: bool = False  # the missing object is the commit's image
    detail: str | None = None  # the parse error, git fsck's last line, what a seal lacks
    sealed: str | None = None  # the missing object seals the commit: "uki" or "loader"


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


def fsck(repo: Repository, *, quick: bool = False, seal_check: SealCheck | None = None) -> FsckReport:
    report = FsckReport()
    problems = report.problems
    # digest -> (commit, whether as its image, what of its seal it is)
    needed: dict[Digest, tuple[str, bool, str | None]] = {}
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
        try:
            sealed = sealed_of(commit)
        except TrailerError as e:
            problems.append(Problem(ProblemKind.BAD_SEAL, commit=cid, detail=str(e)))
            sealed = None
        # An older commit pulled for its history alone (its image was never built
        # here) has metadata but no objects, and that is no fault.
        if commit.id not in tips and not repo.objects.has(image_digest):
            report.history_only += 1
            continue
        needed.setdefault(image_digest, (cid, True, None))
        if sealed is not None:
            needed.setdefault(sealed.uki, (cid, False, "uki"))
            needed.setdefault(sealed.loader, (cid, False, "loader"))
        for digest in objects_of(root):
            needed.setdefault(digest, (cid, False, None))
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
            if sealed is not None and seal_check is not None and repo.objects.has(sealed.uki):
                why = seal_check(repo.objects.path_of(sealed.uki), image_digest)
                if why is not None:
                    problems.append(Problem(ProblemKind.SEAL_MISMATCH, commit=cid, object=sealed.uki.hex(),
                                            detail=why))
    for digest, (cid, is_image, seal) in sorted(needed.items()):
        if not repo.objects.has(digest):
            problems.append(Problem(ProblemKind.MISSING_OBJECT, commit=cid, object=digest.hex(), image=is_image,
                                    sealed=seal))
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
