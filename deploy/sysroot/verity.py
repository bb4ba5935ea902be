"""fs-verity on a sysroot's objects, and entries that require it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ..composefs import dumpfile, fsverity
from ..repo.repository import Repository
from ..util.errors import VerityError
from . import staged
from .commit import manifest_data
from .deployment import Deployment
from .entries import prepare, rewrite
from .layout import Sysroot, staged_status
from .locking import NO_WAIT, LockPolicy, locked


def has_verity(path: str, digest: bytes) -> bool:
    """Whether the kernel holds fs-verity for the object, with the digest of its name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return fsverity.measure_verity(fd) == digest
    except VerityError:
        return False
    finally:
        os.close(fd)


def _verity_good(repo: Repository, dep: Deployment, good: set[bytes]) -> bool:
    """Whether the deployment's image and every object it names measure right."""
    manifest = manifest_data(repo, dep.commit)
    return bytes.fromhex(dep.image_digest) in good and dumpfile.external_digests(manifest) <= good


class ProblemKind(Enum):
    CANNOT_ENABLE = "cannot_enable"  # the kernel refused fs-verity on it (see `message`)
    CORRUPT = "corrupt"              # its content has another digest than its name


@dataclass(frozen=True)
class VerityProblem:
    object_digest: str               # the object's name
    kind: ProblemKind
    message: str | None = None       # the kernel's refusal, for CANNOT_ENABLE
    measured_digest: str | None = None  # what its content measures, for CORRUPT


@dataclass
class VerityResult:
    objects: int
    enabled: int
    problems: list[VerityProblem]
    # Deployments whose entries now say cfsdeploy.verity=require.
    required: list[str]


@locked
def enable_verity(sysroot: Sysroot, os_name: str, *, progress: Callable[[int, int], None] | None = None,
                  lock: LockPolicy = NO_WAIT) -> VerityResult:
    """Enable fs-verity on every object of the repository (for a sysroot written where
    the kernel could not, e.g. a disk image made on another machine), then make the
    entries of deployments whose image and objects all measure right require it."""
    repo = sysroot.repo
    paths = []
    for sub in sorted(os.listdir(repo.objects.path)):
        subdir = os.path.join(repo.objects.path, sub)
        if len(sub) == 2 and os.path.isdir(subdir):
            paths += [(sub + name, os.path.join(subdir, name)) for name in sorted(os.listdir(subdir))]
    good: set[bytes] = set()
    problems = []
    every_object = False
    with repo.lock(wait=60):
        for i, (name, path) in enumerate(paths):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fsverity.enable_verity(fd)
                measured = fsverity.measure_verity(fd)
            except VerityError as e:
                problems.append(VerityProblem(name, ProblemKind.CANNOT_ENABLE, message=str(e)))
                if len(problems) >= 10:
                    break
                continue
            finally:
                os.close(fd)
            if measured.hex() != name:
                problems.append(VerityProblem(name, ProblemKind.CORRUPT, measured_digest=measured.hex()))
            else:
                good.add(measured)
            if progress is not None:
                progress(i + 1, len(paths))
        else:
            every_object = not any(p.kind is ProblemKind.CANNOT_ENABLE for p in problems)
    if every_object:
        sysroot.verity_done()
    state = prepare(sysroot, os_name)
    switch = {}
    for d in state.deployments:
        if _verity_good(repo, d, good):
            switch[d.name] = "require"
    if switch:
        rewrite(sysroot, state, state.deployments, verity=switch)
    st = staged_status(sysroot, os_name)
    if st is not None and st.deployment is not None and _verity_good(repo, st.deployment, good):
        staged.save(sysroot.top, dataclasses.replace(st.record, verity="require"))
        switch[st.record.name] = "require"
    if not problems and sysroot.config.verity != "require":
        sysroot.config.verity = "require"
        sysroot.save_config()
    return VerityResult(len(paths), len(good), problems, sorted(switch))
