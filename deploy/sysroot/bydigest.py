"""Which deployment a sealed boot's image digest names (docs/architecture.md, "Deploying
sealed releases"):

    SYSROOT/cfsdeploy/by-digest/<image hex> -> ../deploy/<os>/<name>

A sealed UKI's command line names the image only (it is built before any machine has
the deployment); the boot hook reads this link, exactly that form, to find the
deployment's /etc and /var.  So a sealed image has one deployment per sysroot.  The
link is written aside and renamed into place before the entry that boots it, and goes
once its deployment directory has gone.  Links are read (readlink), never followed:
the sysroot's directories are writable by the machine's users.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from dataclasses import dataclass

from ..boot import bootloader
from ..boot.bootloader import Damaged, Kind
from ..util.errors import IntegrityError
from ..util.fsutil import fsync_dir
from . import deployment
from .deployment import Deployment

DIRECTORY = "by-digest"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_TARGET = re.compile(r"\.\./deploy/(?P<os>[^/]+)/(?P<name>[^/]+)")
_NEW = ".new"  # a link being written: <digest>.new


class LinkError(IntegrityError):
    pass


@dataclass(frozen=True)
class Link:
    digest: str
    os: str
    name: str

    @property
    def path(self) -> str:
        """The deployment's path relative to the sysroot, as Deployment.path has it."""
        return f"/cfsdeploy/deploy/{self.os}/{self.name}"


def target(dep: Deployment) -> str:
    return f"../deploy/{dep.os}/{dep.name}"


def read(top: str, digest: str) -> Link | None:
    """The link of an image digest; None if there is none, LinkError if it is not a
    link of the one form the boot hook takes."""
    if not _DIGEST.fullmatch(digest):
        raise LinkError(f"{digest!r} is not an image digest")
    if os.path.lexists(os.path.join(top, DIRECTORY)) and not _is_directory(top):
        raise LinkError(f"{os.path.join(top, DIRECTORY)}: not a directory")
    path = os.path.join(top, DIRECTORY, digest)
    try:
        text = os.readlink(path)
    except FileNotFoundError:
        return None
    except OSError:
        raise LinkError(f"{path}: not a symbolic link") from None
    m = _TARGET.fullmatch(text)
    if m is None or not bootloader.OS_NAME.fullmatch(m["os"]) or not deployment.is_name(m["name"]):
        raise LinkError(f"{path}: points to {text!r}, not ../deploy/<os>/<deployment>")
    return Link(digest, m["os"], m["name"])


def write(top: str, dep: Deployment) -> None:
    """Make the link of a deployment's image durable (aside, renamed into place, the
    directory synced): before the entry that boots it is written."""
    directory = os.path.join(top, DIRECTORY)
    if not os.path.lexists(directory):
        os.mkdir(directory)
        fsync_dir(top)
    if not _is_directory(top):
        raise LinkError(f"{directory}: not a directory")
    new = os.path.join(directory, dep.image_digest + _NEW)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(new)
    os.symlink(target(dep), new)
    os.rename(new, os.path.join(directory, dep.image_digest))
    fsync_dir(directory)


def _is_directory(top: str) -> bool:
    """by-digest/ is a directory itself, not a symlink to one somewhere else."""
    with contextlib.suppress(FileNotFoundError):
        return stat.S_ISDIR(os.lstat(os.path.join(top, DIRECTORY)).st_mode)
    return False


def _names(top: str) -> list[str]:
    """What by-digest/ holds; nothing if it is not a directory (damaged() says so)."""
    if not _is_directory(top):
        return []
    return sorted(os.listdir(os.path.join(top, DIRECTORY)))


def _leftover(path: str, name: str) -> bool:
    """Whether by-digest/name is what an interrupted write left: <digest>.new, a link."""
    return name.endswith(_NEW) and bool(_DIGEST.fullmatch(name[:-len(_NEW)])) and os.path.islink(path)


def _gone(top: str, link: Link) -> bool:
    return not os.path.lexists(os.path.join(top, "deploy", link.os, link.name))


def damaged(top: str) -> list[Damaged]:
    """The entries of by-digest/ that are no link of ours, or name a deployment that is
    not a sealed one of that image: reported (the boot hook refuses them), never removed;
    what they name stays while they exist."""
    out = []
    directory = os.path.join(top, DIRECTORY)
    if os.path.lexists(directory) and not _is_directory(top):
        out.append(Damaged(Kind.LINK, directory, "not a directory", b""))
    for name in _names(top):
        path = os.path.join(top, DIRECTORY, name)
        if _leftover(path, name):
            continue  # prune() removes it
        try:
            link = read(top, name)
            why = None if link is None or _gone(top, link) else _mismatch(top, link)
        except LinkError as e:
            why = str(e).removeprefix(f"{path}: ")
        if why is not None:
            data = b""
            with contextlib.suppress(OSError):
                data = os.fsencode(os.readlink(path))
            out.append(Damaged(Kind.LINK, path, why, data))
    return out


def _mismatch(top: str, link: Link) -> str | None:
    try:
        dep = deployment.load(os.path.join(top, "deploy", link.os, link.name))
    except deployment.DeploymentError:
        return None  # the record's own damage is what is reported
    if dep.sealed is None or dep.image_digest != link.digest:
        return f"names {link.os}/{link.name}, which is not a sealed deployment of that image"
    return None


def prune(top: str) -> list[str]:
    """Remove the links whose deployment directory is gone, and what interrupted writes
    left (under the lock, after the deployment directories went); returns their names."""
    removed = []
    for name in _names(top):
        path = os.path.join(top, DIRECTORY, name)
        if _leftover(path, name):
            gone = True
        else:
            try:
                link = read(top, name)
            except LinkError:
                continue
            gone = link is not None and _gone(top, link)
        if gone:
            os.unlink(path)
            removed.append(name)
    if removed:
        fsync_dir(os.path.join(top, DIRECTORY))
    return removed
