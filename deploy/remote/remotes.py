"""Remotes: where a repository pulls from, and whose signatures it trusts.

Each remote is a table in REPO/config.toml:

    [remote.origin]
    url = "https://example.com/os/repo"
    gpg-verify = true
    require-binding = true                  # refuse heads that name no branch
    branch = "debian/13/x86_64/stable"      # optional default branch of `pull`

and, with gpg-verify, a keyring of trusted public keys in REPO/remotes/NAME/trusted.gpg.
A head bound to other branches than the one pulled is always refused; one bound to
none (made before bindings) only with require-binding, which `add` sets unless
told not to.  A table without the key, written before bindings, does not require them.
URLs are http://, https:// or file://; plain paths are stored as file:// URLs.
"""

from __future__ import annotations

import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..repo import dumbhttp
from ..repo.repository import Repository, valid_ref_name
from ..util import tomlfile
from ..util.errors import CfsError, NotFoundError, UsageError
from ..util.fsutil import atomic_write_bytes, fsync_dir, remove_tree
from . import keyring

CONFIG = "config.toml"
CONFIG_HEADER = "cfsdeploy repository settings"
REMOTES_DIR = "remotes"
KEYRING = "trusted.gpg"
SCHEMES = ("http", "https", "file")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class RemoteError(CfsError):
    pass


class RemoteUsageError(RemoteError, UsageError):
    pass


class RemoteNotFoundError(RemoteError, NotFoundError):
    pass


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    gpg_verify: bool = True
    branch: str | None = None
    require_binding: bool = True

    def to_toml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "gpg-verify": self.gpg_verify,
                               "require-binding": self.require_binding}
        if self.branch:
            out["branch"] = self.branch
        return out


def check_name(name: str) -> str:
    # The name is a ref component (refs/remotes/NAME/...) and a directory name.
    if not _NAME.fullmatch(name) or name.endswith((".", ".lock")) or ".." in name:
        raise RemoteUsageError(f"invalid remote name {name!r} (letters, digits, '_', '.' and '-')")
    return name


def check_branch(branch: str) -> str:
    if not valid_ref_name(f"refs/heads/{branch}"):
        raise RemoteUsageError(f"invalid branch name {branch!r}")
    return branch


def normalize_url(url: str) -> str:
    """An http(s):// or file:// URL without a trailing slash; plain paths become file:// URLs."""
    try:
        url.encode()
    except UnicodeEncodeError:
        raise RemoteUsageError(f"invalid URL {url!r}: not UTF-8") from None
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is no number, or out of range
    except ValueError as e:
        raise RemoteUsageError(f"invalid URL {url!r}: {e}") from None
    # urlsplit drops tabs and newlines silently, and http.client takes ASCII only.
    if parts.scheme and not (url.isascii() and url.isprintable() and " " not in url):
        raise RemoteUsageError(f"URL with blanks, control or non-ASCII characters: {url!r}")
    if not parts.scheme:
        return "file://" + urllib.parse.quote(os.path.abspath(url))
    if parts.scheme not in SCHEMES:
        raise RemoteUsageError(f"unsupported URL {url!r} (http://, https://, file:// or a path)")
    if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
        raise RemoteUsageError(f"file URLs name a local path, not a host: {url!r}")
    if parts.scheme != "file" and not parts.hostname:
        raise RemoteUsageError(f"URL without a host: {url!r}")
    if parts.query or parts.fragment:
        raise RemoteUsageError(f"URL with a query or fragment: {url!r}")
    return url.rstrip("/")


def keyring_path(repo: Repository, name: str) -> str:
    return os.path.join(repo.path, REMOTES_DIR, check_name(name), KEYRING)


def _load(repo: Repository) -> dict[str, Any]:
    path = os.path.join(repo.path, CONFIG)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise RemoteError(f"{path}: {e}") from None


def _save(repo: Repository, doc: dict[str, Any]) -> None:
    atomic_write_bytes(os.path.join(repo.path, CONFIG), tomlfile.dumps(doc, header=CONFIG_HEADER).encode())


def _parse(name: str, table: object, where: str) -> Remote:
    if not isinstance(table, dict):
        raise RemoteError(f"{where}: remote {name!r} is not a table")
    unknown = sorted(set(table) - {"url", "gpg-verify", "branch", "require-binding"})
    if unknown:  # a typo, or a setting this version does not know: it must not be ignored
        raise RemoteError(f"{where}: remote {name!r}: unknown setting {unknown[0]!r}")
    url, verify, branch = table.get("url"), table.get("gpg-verify", True), table.get("branch")
    # Absent: a remote added before bindings, whose server may have only unbound commits.
    binding = table.get("require-binding", False)
    if (not isinstance(url, str) or not isinstance(verify, bool) or not isinstance(branch, (str, type(None)))
            or not isinstance(binding, bool)):
        raise RemoteError(f"{where}: remote {name!r} needs url (string), gpg-verify (boolean), "
                          "branch (string, optional), require-binding (boolean, optional)")
    try:
        check_name(name)
        if normalize_url(url) != url:
            raise RemoteError(f"URL {url!r} is not in its normal form", hint="as `cfsdeploy remote add` writes it")
        if branch is not None:
            check_branch(branch)
    except RemoteError as e:
        raise RemoteError(f"{where}: remote {name!r}: {e}", hint=e.hint) from None
    return Remote(name, url, verify, branch, binding)


def _tables(repo: Repository, doc: dict[str, Any], *, but: str | None = None) -> dict[str, Any]:
    """The [remote] tables of a loaded config, each checked but `but`'s (so that a
    damaged remote can still be removed)."""
    where = os.path.join(repo.path, CONFIG)
    tables = doc.setdefault("remote", {})
    if not isinstance(tables, dict):
        raise RemoteError(f"{where}: [remote] must hold one table per remote")
    for name, table in tables.items():
        if name != but:
            _parse(name, table, where)
    return tables


def list_remotes(repo: Repository) -> list[Remote]:
    where = os.path.join(repo.path, CONFIG)
    return [_parse(name, table, where) for name, table in sorted(_tables(repo, _load(repo)).items())]


def get(repo: Repository, name: str) -> Remote:
    for r in list_remotes(repo):
        if r.name == name:
            return r
    raise RemoteNotFoundError(f"no remote named {name!r}", hint="see `cfsdeploy remote list`")


def add(repo: Repository, name: str, url: str, *, key_files: Iterable[str] = (), gpg_verify: bool = True,
        branch: str | None = None, require_binding: bool = True, lock_wait: float = 60.0,
        on_lock_wait: Callable[[], None] | None = None) -> Remote:
    """Add a remote and import its trusted keys (the keyring first, the config last).

    require_binding=False accepts heads bound to no branch (made before bindings)."""
    check_name(name)
    key_files = list(key_files)
    if gpg_verify and not key_files:
        raise RemoteUsageError(f"remote {name}: checking signatures needs trusted keys",
                               hint="give --gpg-import KEYFILE, or --no-gpg-verify")
    remote = Remote(name, normalize_url(url), gpg_verify, check_branch(branch) if branch else None,
                    require_binding)
    with repo.lock(wait=lock_wait, on_wait=on_lock_wait):
        doc = _load(repo)
        tables = _tables(repo, doc)
        if name in tables:
            raise RemoteUsageError(f"remote {name!r} exists (remove it first)")
        top = os.path.join(repo.path, REMOTES_DIR)
        # Left by an add that died before writing the config: nobody uses it.
        remove_tree(os.path.join(top, name), ignore_errors=True)
        if key_files:
            staging = os.path.join(repo.path, "tmp", f"remote-{name}")
            os.mkdir(staging)
            keyring.import_keys(os.path.join(staging, KEYRING), key_files)
            os.makedirs(top, exist_ok=True)
            os.rename(staging, os.path.join(top, name))
            fsync_dir(top)
        tables[name] = remote.to_toml()
        _save(repo, doc)
    return remote


def remove(repo: Repository, name: str, *, lock_wait: float = 60.0,
           on_lock_wait: Callable[[], None] | None = None) -> None:
    """Forget a remote: its settings, keyring and remote branches."""
    with repo.lock(wait=lock_wait, on_wait=on_lock_wait):
        doc = _load(repo)
        tables = _tables(repo, doc, but=name)
        if name not in tables:
            raise RemoteNotFoundError(f"no remote named {name!r}")
        del tables[name]
        _save(repo, doc)
        for ref in [r for r in repo.git.references if r.startswith(f"refs/remotes/{name}/")]:
            repo.git.references.delete(ref)
        remove_tree(os.path.join(repo.path, REMOTES_DIR, name), ignore_errors=True)
        dumbhttp.update_server_info(repo)


def trusted_keys(repo: Repository, name: str) -> list[str]:
    """The fingerprints a remote's commits may be signed with."""
    return keyring.fingerprints(keyring_path(repo, name))
