"""The repository: objects by fs-verity digest, manifests in git commits, refs.

    REPO/config.toml   settings (TOML, for humans)
    REPO/git/          bare git repository: commits, manifests, refs, tags
    REPO/objects/      file contents and images, XX/YYYY... by digest
    REPO/tmp/          staging on the same filesystem, so renames are atomic
    REPO/cache/        local hints (digests of files already read), never needed
    REPO/lock          flock()ed by writers

Each mutating operation (commit, create_tag, prune, init) takes the lock itself
and keeps the git/info/refs index of a static HTTP server current (dumbhttp.py).

A commit's tree holds one file, manifest.dump; its message ends in trailers
naming the image digest and format and the branches it was made for (see
docs/architecture.md, "Commit").
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import pygit2

from ..composefs import dumpfile, fsverity, imagewriter
from ..composefs.digestcache import DigestCache
from ..composefs.fsverity import Digest, DigestError
from ..composefs.objects import ObjectStore
from ..composefs.scan import ScanStats, scan
from ..composefs.tarscan import scan_tar
from ..composefs.tree import Inode, lookup, walk
from ..composefs.tree import resolve as resolve_entry
from ..util import lockfile
from ..util.errors import CfsError, IntegrityError, NotFoundError, UsageError
from ..util.fsutil import atomic_write_bytes, fsync_dir, remove_tree
from . import dumbhttp, signing

MANIFEST = "manifest.dump"
# Digests of the files last committed from a directory (a hint; see digestcache.py).
DIGEST_CACHE = "cache/digests"
TRAILER_DIGEST = "Composefs-Digest"
TRAILER_FORMAT = "Composefs-Format"
TRAILER_VERSION = "Cfsdeploy-Version"
TRAILER_BRANCH = "Cfsdeploy-Branch"  # the binding: a branch the commit was made for
# A sealed release (docs/architecture.md, "Sealed releases"): objects holding its
# signed Unified Kernel Image and the boot loader signed with the same key.
TRAILER_SEALED_UKI = "Cfsdeploy-Sealed-UKI"
TRAILER_SEALED_LOADER = "Cfsdeploy-Sealed-Loader"
# The only trailer a message may give more than once; every other key appears at most once.
REPEATABLE = frozenset({TRAILER_BRANCH})
_TRAILER_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# C0 controls, DEL, C1 controls and the Unicode line and paragraph separators: what
# could end a line, or look like it, in git, a terminal or str.splitlines().
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_IN_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # keeps \t and \n
DEFAULT_AUTHOR = ("cfsdeploy", "cfsdeploy@localhost")
# tmp/resume/ keeps partial downloads for the next pull to resume (it checks them in full).
RESUME_DIR = "resume"
CONFIG_TEMPLATE = """\
# cfsdeploy repository settings
[core]
repo-version = 1
"""

# Refs, objects and packs are fsynced by libgit2 before they are renamed into place.
pygit2.option(pygit2.enums.Option.ENABLE_FSYNC_GITDIR, True)


class RepositoryError(CfsError):
    pass


class RepositoryUsageError(RepositoryError, UsageError):
    pass


class RepositoryNotFoundError(RepositoryError, NotFoundError):
    pass


class RepositoryIntegrityError(RepositoryError, IntegrityError):
    pass


class CommitTextError(RepositoryError, UsageError):
    """User text cannot become part of a commit message."""


class TrailerError(RepositoryError, IntegrityError):
    """A commit message's trailers are ambiguous."""


@dataclass(frozen=True)
class Sealed:
    """What seals a commit: the objects of its signed UKI, whose command line names
    the commit's image, and of the boot loader signed with the same key."""

    uki: Digest
    loader: Digest

    def objects(self) -> set[Digest]:
        return {self.uki, self.loader}

    def to_json(self) -> dict[str, object]:
        return {"uki": self.uki.hex(), "loader": self.loader.hex()}


# Seals a commit being made: called with its tree and image digest inside the
# objects' transaction, it stores the objects it names.
Sealer = Callable[[Inode, Digest], Sealed]


@dataclass(frozen=True)
class CommitResult:
    """What Repository.commit made: the new commit on `branch`, and what the scan saw."""

    commit: str
    image_digest: Digest
    branch: str
    stats: ScanStats
    sealed: Sealed | None = None


class Repository:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        for part in ("config.toml", "git", "objects", "tmp"):
            if not os.path.exists(os.path.join(self.path, part)):
                raise RepositoryNotFoundError(f"not a cfsdeploy repository: {self.path} (no {part})")
        self.git = pygit2.Repository(os.path.join(self.path, "git"))
        self.objects = ObjectStore(os.path.join(self.path, "objects"), os.path.join(self.path, "tmp"))
        self._lock_depth = 0  # lock() held by this object: nested holds are free

    @classmethod
    def init(cls, path: str | os.PathLike[str]) -> Repository:
        """Create a repository at path; refuses to touch anything that exists there.

        It is built in a temporary sibling and renamed into place, so a crash leaves
        either nothing or a whole repository."""
        path = os.path.abspath(os.fspath(path))
        if os.path.lexists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise RepositoryUsageError(f"refusing to create a repository over existing {path}")
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.init-", dir=parent)
        try:
            for sub in ("objects", "tmp"):
                os.mkdir(os.path.join(staging, sub))
            pygit2.init_repository(os.path.join(staging, "git"), bare=True)
            with open(os.path.join(staging, "config.toml"), "w") as f:
                f.write(CONFIG_TEMPLATE)
                f.flush()
                os.fsync(f.fileno())
            lockfile.create(os.path.join(staging, "lock"))
            dumbhttp.write_server_info(staging)
            os.chmod(staging, 0o755)
            if os.path.isdir(path):
                os.rmdir(path)  # empty, checked above
            os.rename(staging, path)
        except BaseException:
            remove_tree(staging, ignore_errors=True)
            raise
        fsync_dir(parent)
        return cls(path)

    @contextlib.contextmanager
    def lock(self, *, wait: float = 0.0, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the repository's writer lock; wait up to `wait` seconds for it.

        Re-entrant on this object, so a caller may hold it across several operations
        that each take it; only the outermost hold clears tmp/."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with lockfile.hold(os.path.join(self.path, "lock"),
                           f"repository {self.path} is locked by another cfsdeploy process",
                           wait=wait, on_wait=on_wait):
            self._lock_depth = 1
            try:
                self._clean_tmp()
                yield
            finally:
                self._lock_depth = 0

    def _clean_tmp(self) -> None:
        # Whatever a killed writer left in tmp/ is garbage: nothing refers to it.  So are
        # libgit2's lock and temp files: a killed ref update leaves refs/.../x.lock
        # behind, which would block every later update of that ref.
        git = os.path.join(self.path, "git")
        for top, _, files in os.walk(git):
            for name in files:
                if name.endswith(".lock") or name.startswith("tmp_object_git2_"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(top, name))
        tmp = os.path.join(self.path, "tmp")
        for name in os.listdir(tmp):
            if name == RESUME_DIR:
                continue
            remove_tree(os.path.join(tmp, name), ignore_errors=True)

    def mark_verified(self, commit_id: str, image_digest: bytes) -> None:
        """Record that the commit's manifest was built into the image its trailer names
        (so deploying it needs no rebuild: the image object's own digest is then enough)."""
        directory = os.path.join(self.path, "verified")
        os.makedirs(directory, exist_ok=True)
        atomic_write_bytes(os.path.join(directory, commit_id), image_digest.hex().encode() + b"\n")

    def is_verified(self, commit_id: str, image_digest: bytes) -> bool:
        try:
            with open(os.path.join(self.path, "verified", commit_id), "rb") as f:
                return f.read().strip() == image_digest.hex().encode()
        except FileNotFoundError:
            return False

    def resolve(self, rev: str) -> pygit2.Commit:
        try:
            obj = self.git.revparse_single(rev)
            commit = obj.peel(pygit2.Commit)
        except (KeyError, ValueError, pygit2.GitError):
            raise RepositoryNotFoundError(f"unknown revision {rev!r}") from None
        return commit

    def branch_head(self, branch: str) -> pygit2.Commit | None:
        ref = self.git.references.get(f"refs/heads/{branch}")
        return None if ref is None else self.git[ref.target].peel(pygit2.Commit)

    def commit(self, tree: str | os.PathLike[str], branch: str, subject: str, *,
               body: str | None = None, version: str | None = None, bind: Sequence[str] = (),
               parent: str | None = None,
               orphan: bool = False, author: tuple[str, str] = DEFAULT_AUTHOR,
               sign_key: str | None = None, gpg_homedir: str | None = None,
               threads: int | None = None,
               warn: Callable[[str], None] | None = None,
               progress: Callable[[ScanStats], None] | None = None,
               sealer: Sealer | None = None,
               lock_wait: float = 60.0, on_lock_wait: Callable[[], None] | None = None) -> CommitResult:
        """Store a tree's objects, its manifest and image, and move `branch` to a new
        commit, under the lock (waiting up to lock_wait seconds for it).

        The commit is bound to `branch` and to the branches in `bind` (its
        Cfsdeploy-Branch trailers): a pull of any other branch refuses it.
        With a sealer, the commit is sealed: its Cfsdeploy-Sealed-* trailers name
        what the sealer stored.
        The new objects are published durably (one transaction) before the ref moves;
        if anything fails first, nothing new is named and the branch stays."""
        message = CommitMessage(subject, body, version, (branch, *bind))
        with self.lock(wait=lock_wait, on_wait=on_lock_wait):
            return self._commit(tree, branch, message, parent=parent, orphan=orphan, author=author,
                                sign_key=sign_key, gpg_homedir=gpg_homedir, threads=threads, warn=warn,
                                progress=progress, sealer=sealer)

    def _commit(self, tree: str | os.PathLike[str], branch: str, message: CommitMessage, *,
                parent: str | None, orphan: bool, author: tuple[str, str], sign_key: str | None,
                gpg_homedir: str | None, threads: int | None, warn: Callable[[str], None] | None,
                progress: Callable[[ScanStats], None] | None, sealer: Sealer | None) -> CommitResult:
        parents: list[str | pygit2.Oid]
        if orphan:
            parents = []
        elif parent is not None:
            parents = [self.resolve(parent).id]
        else:
            head = self.branch_head(branch)
            parents = [head.id] if head is not None else []
        kw: dict[str, Any] = {"warn": warn} if warn is not None else {}
        source = os.fspath(tree)
        cache_path = os.path.join(self.path, DIGEST_CACHE)
        with self.objects.transaction():
            if source.startswith("tar:"):
                cache = None
                root, stats = scan_tar(source[4:], store=self.objects, progress=progress, **kw)
            else:
                cache = DigestCache.load(cache_path)
                root, stats = scan(source, store=self.objects, progress=progress, threads=threads,
                                   cache=cache, **kw)
            manifest = dumpfile.dumps(root)
            image_digest, image_format = self._image_of(manifest, root, parents)
            sealed = sealer(root, image_digest) if sealer is not None else None
            commit_id = self._create_commit(manifest, message.render(image_digest, image_format, sealed),
                                            parents, author, sign_key, gpg_homedir)
        if cache is not None:
            cache.save(cache_path)
        self.mark_verified(str(commit_id), image_digest)
        self.git.references.create(f"refs/heads/{branch}", commit_id, force=True)
        dumbhttp.update_server_info(self)
        return CommitResult(str(commit_id), image_digest, branch, stats, sealed)

    def _image_of(self, manifest: bytes, root: Inode, parents: list[str | pygit2.Oid]) -> tuple[Digest, int]:
        """The digest and format of the manifest's image, stored.  An unchanged tree
        reuses its parent's image: the image is a function of the manifest alone
        (what fsck checks), so building it again would give the same bytes."""
        if parents:
            parent = self.git[parents[0]].peel(pygit2.Commit)
            if MANIFEST in parent.tree and parent.tree[MANIFEST].id == pygit2.hash(manifest):
                with contextlib.suppress(RepositoryError):  # no valid trailers: build
                    fmt = trailers(parent.message).get(TRAILER_FORMAT, "")
                    digest = image_digest_of(parent)
                    if fmt.isdigit() and self.objects.has(digest):
                        return digest, int(fmt)
        built = imagewriter.build(root)
        return self.objects.add_bytes(built.image), built.version

    def _create_commit(self, manifest: bytes, message: str, parents: list[str | pygit2.Oid],
                       author: tuple[str, str], sign_key: str | None,
                       gpg_homedir: str | None) -> pygit2.Oid:
        """The git commit of a manifest (signed if asked), not yet on any ref."""
        blob = self.git.create_blob(manifest)
        builder = self.git.TreeBuilder()
        builder.insert(MANIFEST, blob, pygit2.enums.FileMode.BLOB)
        tree_id = builder.write()
        when = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
        sig = pygit2.Signature(author[0], author[1], when, 0)
        if sign_key is None:
            return self.git.create_commit(None, sig, sig, message, tree_id, parents)
        # pygit2's stubs say Oid; it returns the commit's text.
        content = cast(str, self.git.create_commit_string(sig, sig, message, tree_id, parents))
        signature = signing.sign(content.encode(), sign_key, homedir=gpg_homedir)
        return self.git.create_commit_with_signature(content, signature)


def _check_branch(branch: str) -> None:
    if not valid_ref_name(f"refs/heads/{branch}"):
        raise RepositoryUsageError(f"invalid branch name {branch!r}")


def valid_ref_name(ref: str) -> bool:
    # libgit2 calls longer names valid, then fails to look them up (GIT_REFNAME_MAX).
    return len(ref.encode()) < 1024 and pygit2.reference_is_valid_name(ref)


def check_text(what: str, text: str, *, lines: bool = False) -> str:
    """text, refused if it holds a control character (in `lines` text, newlines and
    tabs are allowed): user text must not become lines of its own where only one
    line is expected, e.g. a trailer after the real ones."""
    bad = (_CONTROL_IN_LINES if lines else _CONTROL).search(text)
    if bad:
        rule = "only newlines and tabs are allowed there" if lines else "it must be one line of text"
        raise CommitTextError(f"{what} contains the control character U+{ord(bad.group()):04X}: {rule}")
    return text


@dataclass(frozen=True)
class CommitMessage:
    """The user's text of a commit, checked when made: the subject, version and
    branches single lines, the body lines, none with a control character; so no
    part can add a trailer, hide one, or pass for the trailer block."""

    subject: str
    body: str | None = None
    version: str | None = None
    branches: tuple[str, ...] = ()  # the binding: the branches the commit is made for

    def __post_init__(self) -> None:
        # Checked before stripping: str.strip() removes some controls (\x1c-\x1f, \x85).
        subject = check_text("the subject", self.subject).strip()
        if not subject:
            raise CommitTextError("the subject must be one non-empty line")
        for branch in self.branches:
            _check_branch(check_text(f"branch name {branch!r}", branch))
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "body", check_text("the body", self.body or "", lines=True).strip())
        object.__setattr__(self, "version", check_text("the version", self.version or "").strip() or None)
        object.__setattr__(self, "branches", tuple(dict.fromkeys(self.branches)))

    def render(self, image_digest: bytes, image_format: int, sealed: Sealed | None = None) -> str:
        """Subject, body, trailers: the message of the commit of this image."""
        lines = [f"{TRAILER_DIGEST}: {image_digest.hex()}", f"{TRAILER_FORMAT}: {image_format}"]
        if self.version:
            lines.append(f"{TRAILER_VERSION}: {self.version}")
        if sealed is not None:
            lines += [f"{TRAILER_SEALED_UKI}: {sealed.uki.hex()}", f"{TRAILER_SEALED_LOADER}: {sealed.loader.hex()}"]
        lines += [f"{TRAILER_BRANCH}: {branch}" for branch in self.branches]
        return "\n\n".join(p for p in (self.subject, self.body, "\n".join(lines)) if p) + "\n"


def _split_message(message: str) -> tuple[list[str], dict[str, list[str]]]:
    """The paragraphs of a message before its trailers, and the trailers.

    The trailers are the last paragraph, never the first (the subject), and only
    when every line of it is `Key: value` with a single-line value without leading
    or trailing space; otherwise the message has none.  So a trailer-looking line
    in the body never counts, and a key other than the repeatable ones must appear
    once: twice is ambiguous, and refused rather than resolved."""
    paragraphs = message.rstrip("\n").split("\n\n")
    if len(paragraphs) < 2:
        return paragraphs, {}
    found: dict[str, list[str]] = {}
    for line in paragraphs[-1].split("\n"):
        key, sep, value = line.partition(": ")
        if (not sep or not _TRAILER_KEY.fullmatch(key) or not value or value != value.strip()
                or _CONTROL.search(value)):
            return paragraphs, {}
        found.setdefault(key, []).append(value)
    for key, values in found.items():
        if len(values) > 1 and key not in REPEATABLE:
            raise TrailerError(f"the trailer {key} appears {len(values)} times in one commit message")
    return paragraphs[:-1], found


def trailers(message: str) -> dict[str, str]:
    """The single-valued trailers of a commit message (see _split_message)."""
    return {key: values[0] for key, values in _split_message(message)[1].items() if key not in REPEATABLE}


def bindings(message: str) -> list[str]:
    """The branches a commit message binds the commit to (its Cfsdeploy-Branch trailers)."""
    return _split_message(message)[1].get(TRAILER_BRANCH, [])


def digest_trailer(found: dict[str, str]) -> Digest | None:
    """The image digest a commit's trailers name; None if none or not a digest."""
    try:
        return Digest.from_hex(found.get(TRAILER_DIGEST, ""))
    except DigestError:
        return None


def image_digest_of(commit: pygit2.Commit) -> Digest:
    digest = digest_trailer(trailers(commit.message))
    if digest is None:
        raise RepositoryIntegrityError(f"commit {commit.id} has no valid {TRAILER_DIGEST} trailer")
    return digest


def sealed_trailers(found: dict[str, str]) -> Sealed | None:
    """What a commit's trailers say seals it; None if it is not sealed.  Raises
    TrailerError when they name only one object, or something that is no digest:
    a commit sealed by halves is damaged, never taken for an unsealed one."""
    uki, loader = found.get(TRAILER_SEALED_UKI), found.get(TRAILER_SEALED_LOADER)
    if uki is None and loader is None:
        return None
    try:
        return Sealed(Digest.from_hex(uki or ""), Digest.from_hex(loader or ""))
    except DigestError:
        raise TrailerError(f"{TRAILER_SEALED_UKI} and {TRAILER_SEALED_LOADER} must name an object each, "
                           f"by digest") from None


def sealed_of(commit: pygit2.Commit) -> Sealed | None:
    """The objects that seal a commit; None if it is not sealed (see sealed_trailers)."""
    return sealed_trailers(trailers(commit.message))


def commit_objects(commit: pygit2.Commit) -> set[Digest]:
    """Every object a commit needs: its image, the external files of its manifest,
    and what seals it."""
    sealed = sealed_of(commit)
    return ({image_digest_of(commit)} | objects_of(dumpfile.parse(manifest_data(commit)))
            | (sealed.objects() if sealed else set()))


@dataclass(frozen=True)
class SignatureInfo:
    """Who signed a commit, as its signature says; with a keyring, whether it verifies."""

    key_id: str | None  # None when the signature cannot be read
    fingerprint: str | None
    verified: bool | None = None  # None: not checked (no keyring given)
    signer: str | None = None  # the signer's user id, once verified
    problem: str | None = None  # why it does not verify

    def to_json(self) -> dict[str, object]:
        return {"key_id": self.key_id, "fingerprint": self.fingerprint, "verified": self.verified,
                "signer": self.signer, "problem": self.problem}


@dataclass(frozen=True)
class CommitInfo:
    """A stored commit as log and show describe it: its message split into parts, its
    trailers read (a trailer that does not parse is None), who signed it."""

    id: str
    subject: str
    body: str
    version: str | None
    time: int  # the committer's timestamp
    author: str
    parents: list[str]
    image_digest: Digest | None
    image_format: int | None
    branches: list[str]  # the binding; empty for commits made before bindings
    signature: SignatureInfo | None = None
    sealed: Sealed | None = None

    def to_json(self) -> dict[str, object]:
        return {"commit": self.id, "subject": self.subject, "body": self.body, "version": self.version,
                "branches": self.branches, "time": iso_time(self.time), "author": self.author,
                "parents": self.parents, "image_digest": self.image_digest.hex() if self.image_digest else None,
                "image_format": self.image_format, "sealed": self.sealed.to_json() if self.sealed else None,
                "signature": self.signature.to_json() if self.signature else None}


def iso_time(timestamp: int) -> str:
    """A Unix time in ISO 8601, UTC, as every JSON time: 2026-11-30T05:12:43+00:00."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def signature_info(commit: pygit2.Commit, *, gpg_homedir: str | None = None) -> SignatureInfo | None:
    """The signer a commit's gpgsig names (None if unsigned); checked against the
    keyring in gpg_homedir when one is given."""
    signature, payload = commit.gpg_signature
    if not signature:
        return None
    armored = signature.decode("ascii", "replace")
    try:
        who = signing.issuer(armored)
    except signing.SignatureError as e:
        return SignatureInfo(None, None, verified=False if gpg_homedir else None, problem=str(e))
    if gpg_homedir is None:
        return SignatureInfo(who.key_id, who.fingerprint)
    try:
        signer = signing.verify(payload, armored, homedir=gpg_homedir)
    except signing.SignatureError as e:
        return SignatureInfo(who.key_id, who.fingerprint, verified=False, problem=str(e))
    return SignatureInfo(who.key_id, who.fingerprint or signer.fingerprint, verified=True,
                         signer=signer.username)


def commit_info(commit: pygit2.Commit, *, gpg_homedir: str | None = None) -> CommitInfo:
    paragraphs, found = _split_message(commit.message)
    t = {key: values[0] for key, values in found.items()}
    fmt = t.get(TRAILER_FORMAT)
    return CommitInfo(
        id=str(commit.id), subject=paragraphs[0], body="\n\n".join(paragraphs[1:]),
        version=t.get(TRAILER_VERSION), branches=found.get(TRAILER_BRANCH, []),
        time=commit.commit_time, author=f"{commit.author.name} <{commit.author.email}>",
        parents=[str(p) for p in commit.parent_ids], image_digest=digest_trailer(t),
        image_format=int(fmt) if fmt and fmt.isdigit() else None,
        signature=signature_info(commit, gpg_homedir=gpg_homedir), sealed=_sealed_or_none(t))


def _sealed_or_none(found: dict[str, str]) -> Sealed | None:
    # log and show describe what they can: damaged seal trailers read as none (fsck says why)
    try:
        return sealed_trailers(found)
    except TrailerError:
        return None


def history(repo: Repository, rev: str, limit: int | None = None, *,
            gpg_homedir: str | None = None) -> list[CommitInfo]:
    """Commits reachable from rev, newest first (first-parent order); signatures are
    checked against the keyring in gpg_homedir when one is given."""
    out: list[CommitInfo] = []
    commit: pygit2.Commit | None = repo.resolve(rev)
    while commit is not None and (limit is None or len(out) < limit):
        out.append(commit_info(commit, gpg_homedir=gpg_homedir))
        commit = commit.parents[0] if commit.parents else None
    return out


def list_refs(repo: Repository) -> list[tuple[str, str]]:
    """(ref name, commit id) for branches, tags and remote branches, sorted by name."""
    out = []
    for name in sorted(repo.git.references):
        if name.startswith(("refs/heads/", "refs/tags/", "refs/remotes/")):
            target = repo.git.references[name].peel(pygit2.Commit)
            out.append((name, str(target.id)))
    return out


def create_tag(repo: Repository, name: str, rev: str, *, force: bool = False, lock_wait: float = 60.0,
               on_lock_wait: Callable[[], None] | None = None) -> str:
    """Point the tag `name` at the commit `rev` names (under the lock); its commit id."""
    ref = f"refs/tags/{name}"
    if not valid_ref_name(ref):
        raise RepositoryUsageError(f"invalid tag name {name!r}")
    with repo.lock(wait=lock_wait, on_wait=on_lock_wait):
        if ref in repo.git.references and not force:
            raise RepositoryUsageError(f"tag {name!r} already exists")
        commit = repo.resolve(rev)
        repo.git.references.create(ref, commit.id, force=force)
        dumbhttp.update_server_info(repo)
    return str(commit.id)


def manifest_data(commit: pygit2.Commit) -> bytes:
    """The manifest (dumpfile) a commit's tree holds."""
    entry = commit.tree[MANIFEST] if MANIFEST in commit.tree else None
    if not isinstance(entry, pygit2.Blob):
        raise RepositoryIntegrityError(f"commit {commit.id} has no {MANIFEST}")
    return entry.data


def manifest_of(repo: Repository, rev: str) -> Inode:
    return dumpfile.parse(manifest_data(repo.resolve(rev)))


@dataclass(frozen=True)
class ListedFile:
    """One line of `ls`: a path of a commit's tree and its metadata."""

    path: bytes
    mode: int
    uid: int
    gid: int
    size: int
    symlink_target: bytes | None  # for symlinks


def list_files(repo: Repository, rev: str, path: str, *, recursive: bool = False) -> list[ListedFile]:
    """The file at `path` in commit `rev`; or for a directory, its entries (all those
    below it if recursive), in tree order."""
    top = lookup(manifest_of(repo, rev), os.fsencode(path))
    if top is None:
        raise RepositoryNotFoundError(f"{path}: no such file in {rev}")
    prefix = os.fsencode(path).rstrip(b"/")
    node = resolve_entry(top)
    if node.children is None:
        entries = [(prefix, node)]
    else:
        depth = prefix.count(b"/") + 1
        entries = [(prefix + p, resolve_entry(e)) for p, e in walk(node)
                   if p != b"/" and (recursive or (prefix + p).count(b"/") == depth)]
    return [ListedFile(p, n.mode, n.uid, n.gid, n.size, (n.payload or b"") if n.is_symlink() else None)
            for p, n in entries]


def read_file(repo: Repository, rev: str, path: str) -> bytes:
    """The content of a regular file in a commit, from its inline data or its object."""
    entry = lookup(manifest_of(repo, rev), os.fsencode(path))
    if entry is None:
        raise RepositoryNotFoundError(f"{path}: no such file in {rev}")
    return read_content(repo, resolve_entry(entry), path)


def read_content(repo: Repository, node: Inode, path: str) -> bytes:
    """The content of a regular file of a manifest, checked against its digest."""
    if not node.is_reg():
        raise RepositoryUsageError(f"{path}: not a regular file")
    if node.content is not None or node.size == 0:
        return node.content or b""
    if node.digest is None:
        raise RepositoryUsageError(f"{path}: the manifest names no object for this file")
    try:
        with open(repo.objects.path_of(node.digest), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise RepositoryIntegrityError(f"{path}: object {node.digest.hex()} is missing",
                                       hint="run fsck, or pull") from None
    if fsverity.digest_bytes(data) != node.digest:
        raise RepositoryIntegrityError(f"{path}: object {node.digest.hex()} is corrupt", hint="run fsck")
    return data


def verify_commit(repo: Repository, rev: str, *, gpg_homedir: str | None = None) -> signing.Signer:
    """Check the gpgsig signature of a commit; return its signer."""
    commit = repo.resolve(rev)
    signature, payload = commit.gpg_signature
    if not signature:
        raise signing.SignatureIntegrityError(f"commit {commit.id} is not signed")
    return signing.verify(payload, signature.decode(), homedir=gpg_homedir)


# Deployments hold a ref each, so their commits and objects outlive moved branches.
ROOT_REFS = ("refs/heads/", "refs/tags/", "refs/remotes/", "refs/deployments/")


def reachable_commits(repo: Repository) -> list[pygit2.Commit]:
    """Every commit reachable from a branch, tag, remote branch or deployment."""
    seen: set[pygit2.Oid] = set()
    out = []
    stack = [repo.git.references[name].peel(pygit2.Commit) for name in repo.git.references
             if name.startswith(ROOT_REFS)]
    while stack:
        commit = stack.pop()
        if commit.id in seen:
            continue
        seen.add(commit.id)
        out.append(commit)
        stack.extend(commit.parents)
    return out


def objects_of(root: Inode) -> set[Digest]:
    """The digests of the external files a manifest needs."""
    return {e.digest for _, e in walk(root)
            if isinstance(e, Inode) and e.is_reg() and e.digest is not None and e.content is None}


@dataclass(frozen=True)
class PruneResult:
    removed: int
    bytes_freed: int
    kept: int


def prune(repo: Repository, *, dry_run: bool = False, keep_younger_than: float = 0.0, lock_wait: float = 60.0,
          on_lock_wait: Callable[[], None] | None = None) -> PruneResult:
    """Remove objects that no commit reachable from a ref needs, under the lock."""
    with repo.lock(wait=lock_wait, on_wait=on_lock_wait):
        return _prune(repo, dry_run, keep_younger_than)


def _prune(repo: Repository, dry_run: bool, keep_younger_than: float) -> PruneResult:
    needed: set[Digest] = set()
    for commit in reachable_commits(repo):
        needed |= commit_objects(commit)
    cutoff = time.time() - keep_younger_than
    removed = freed = kept = 0
    for sub in sorted(os.listdir(repo.objects.path)):
        if len(sub) != 2:
            continue
        # Through the directory's own fd: a symlink in objects/ leads nowhere.
        try:
            fd = os.open(os.path.join(repo.objects.path, sub),
                         os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                continue
            raise
        try:
            for name in os.listdir(fd):
                try:
                    digest = bytes.fromhex(sub + name)
                except ValueError:
                    continue
                st = os.lstat(name, dir_fd=fd)
                if digest in needed or st.st_mtime > cutoff:
                    kept += 1
                    continue
                removed += 1
                freed += st.st_size
                if not dry_run:
                    os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)
    return PruneResult(removed, freed, kept)
