"""Pulling a branch from a remote, checked at every step before the next trusts it.

 1. git/info/refs names the branch's head commit.
 2. The head commit (checked against its id) must carry a good signature by a key
    of the remote's keyring (gpg-verify), and be bound to the branch pulled (its
    Cfsdeploy-Branch trailers name it; a commit with none only from a remote that
    does not require bindings), before anything else is fetched.
 3. Its tree and manifest (checked against their ids): the manifest must parse, each
    regular file's payload must be its digest's object path, and the image built
    from it here must have the commit's Composefs-Digest.  Images never travel.
 4. The history below the head (all of it, or `depth` commits with the head), with
    manifests; where it stops, the last commit is listed in git/shallow.
 5. The objects the head's manifest needs and the repository lacks, in parallel:
    downloaded into tmp/resume/, checked against their fs-verity digests, synced
    to disk and renamed into objects/.  An interrupted pull resumes partial files there.
    A sealed head's UKI and loader come the same way; no manifest gives their size,
    so they are bounded by PullOptions.max_sealed and downloaded whole each time.
 6. The image, then the commits (parents first), then refs/remotes/REMOTE/BRANCH.
All of it under the repository lock.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import pygit2

from ..composefs import dumpfile, fsverity, imagewriter
from ..composefs.tree import Inode, digest_to_path, walk
from ..repo import dumbhttp
from ..repo.repository import (
    MANIFEST,
    RESUME_DIR,
    TRAILER_BRANCH,
    TRAILER_DIGEST,
    TRAILER_FORMAT,
    Repository,
    TrailerError,
    bindings,
    digest_trailer,
    sealed_trailers,
    trailers,
)
from ..repo.signing import SignatureError, SignatureIntegrityError, Signer
from ..util.errors import CfsError, IntegrityError, NotFoundError, UsageError
from ..util.fsutil import atomic_write_bytes, remove_tree, syncfs
from . import keyring, remotes
from .gitfetch import GitFetcher, RawCommit, parse_commit, parse_tree
from .transport import Limits, Transport, open_transport


class PullError(CfsError):
    pass


class PullUsageError(PullError, UsageError):
    pass


class PullNotFoundError(PullError, NotFoundError):
    pass


class PullIntegrityError(PullError, IntegrityError):
    pass


class ObjectMismatchError(PullError, IntegrityError):
    """A downloaded object is not the one its digest names."""


class DowngradeError(PullError, IntegrityError):
    """The remote offers a commit older than the one its ref already names."""


class ManifestError(PullError, IntegrityError):
    """A commit's manifest is malformed, unsafe, or does not give the commit's image."""


class BindingError(PullError, IntegrityError):
    """The head was not made for the branch pulled: a server may not present one
    branch's (validly signed) commit as another's."""


@dataclass(frozen=True)
class PullOptions:
    jobs: int = 8                      # parallel object downloads
    limits: Limits = field(default_factory=Limits)
    max_metadata: int = 256 << 20      # largest git object accepted (a manifest)
    max_pack: int = 4 << 30            # largest git pack accepted
    max_refs: int = 16 << 20           # largest git/info/refs accepted
    max_sealed: int = 1 << 30          # largest sealed UKI or loader: a kernel and initramfs, with room
    lock_wait: float = 60.0
    on_lock_wait: Callable[[], None] | None = None


@dataclass(frozen=True)
class PullProgress:
    phase: str                         # "metadata", then "objects"
    objects_done: int
    objects_total: int
    bytes_done: int                    # content bytes of objects received
    bytes_total: int
    wire_bytes: int                    # everything received, as sent (compressed)
    elapsed: float


@dataclass(frozen=True)
class PullResult:
    remote: str
    branch: str
    ref: str
    commit: str
    previous: str | None
    signer: Signer | None
    commits_fetched: int
    git_objects_fetched: int           # commits, trees, manifests (and packs) downloaded
    objects_fetched: int
    bytes_fetched: int                 # content bytes of the objects downloaded
    wire_bytes: int                    # all bytes received, compressed as they travelled
    requests: int
    elapsed: float

    @property
    def updated(self) -> bool:
        return self.commit != self.previous


def pull(repo: Repository, remote_name: str, branch: str | None = None, *, depth: int | None = None,
         allow_downgrade: bool = False, progress: Callable[[PullProgress], None] | None = None,
         options: PullOptions | None = None, url: str | None = None) -> PullResult:
    """Fetch `branch` (default: the remote's branch setting) of a remote and move
    refs/remotes/REMOTE/BRANCH to its head once everything is checked.

    url, when given, is where to fetch from this once (a mirror, install media, the
    build machine's copy) instead of the remote's URL; keys and refs stay the remote's.

    A head older than the one the ref names (an ancestor of it, or committed
    earlier) is refused unless allow_downgrade: a mirror must not be able to bring
    back an old release by serving its (validly signed) commit."""
    options = options or PullOptions()
    rem = remotes.get(repo, remote_name)
    branch = branch or rem.branch
    if not branch:
        raise PullUsageError(f"remote {rem.name} has no default branch: name the branch to pull")
    remotes.check_branch(branch)
    if depth is not None and depth < 1:
        raise PullUsageError(f"depth must be at least 1, not {depth}")
    if options.jobs < 1:
        raise PullUsageError(f"jobs must be at least 1, not {options.jobs}")
    trusted = None
    if rem.gpg_verify:
        trusted = remotes.keyring_path(repo, rem.name)
        if not os.path.exists(trusted):
            raise PullUsageError(f"remote {rem.name} has no trusted keys",
                                 hint="add it again with --gpg-import KEYFILE, or --no-gpg-verify")
    transport = open_transport(remotes.normalize_url(url) if url else rem.url, options.limits)
    try:
        with repo.lock(wait=options.lock_wait, on_wait=options.on_lock_wait):
            return _Pull(repo, rem, branch, depth, trusted, transport, options, progress).run(allow_downgrade)
    finally:
        transport.close()


def check_manifest(root: Inode) -> dict[bytes, int]:
    """The objects a manifest needs ({digest: size}); refuses a regular file whose
    payload is anything but its own digest's object path (an image built from it
    could redirect outside the object store)."""
    needed: dict[bytes, int] = {}
    for path, entry in walk(root):
        if not isinstance(entry, Inode) or not entry.is_reg():
            continue  # hardlinks: their primary is walked too; symlink targets are free
        where = path.decode(errors="replace")
        if entry.content is not None or entry.size == 0:
            if entry.payload is not None:
                raise ManifestError(f"manifest: {where}: inline or empty file with a payload")
            continue
        if entry.digest is None:
            raise ManifestError(f"manifest: {where}: file without a digest")
        if entry.payload != digest_to_path(entry.digest):
            raise ManifestError(f"manifest: {where}: payload {entry.payload!r} is not the path of "
                                "its digest")
        if needed.setdefault(entry.digest, entry.size) != entry.size:
            raise ManifestError(f"manifest: {where}: two sizes for object {entry.digest.hex()}")
    return needed


class _Cancelled(Exception):
    pass


class _Pull:
    def __init__(self, repo: Repository, rem: remotes.Remote, branch: str, depth: int | None,
                 trusted: str | None, transport: Transport, options: PullOptions,
                 progress: Callable[[PullProgress], None] | None) -> None:
        self.repo = repo
        self.remote = rem
        self.branch = branch
        self.depth = depth
        self.trusted = trusted
        self.transport = transport
        self.options = options
        self.progress = progress
        self.git = GitFetcher(repo.git, transport, os.path.join(repo.path, "tmp"),
                              max_object=options.max_metadata, max_pack=options.max_pack)
        self.resume_dir = os.path.join(repo.path, "tmp", RESUME_DIR)
        self.shallow_path = os.path.join(repo.git.path, "shallow")
        self.start = time.monotonic()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.objects_total = self.objects_done = self.bytes_total = self.bytes_done = 0
        self.checked: list[tuple[str, bytes]] = []  # (file in tmp/resume, its digest), to adopt

    def run(self, allow_downgrade: bool) -> PullResult:
        name = self.remote.name
        refs = self.git.refs(self.options.max_refs)
        head = refs.get(f"refs/heads/{self.branch}")
        if head is None:
            raise PullNotFoundError(f"remote {name} has no branch {self.branch}")
        ref = f"refs/remotes/{name}/{self.branch}"
        old = self.repo.git.references.get(ref)
        previous = None if old is None else str(old.target)

        commit, head_is_new = self._commit(head)
        signer = self._verify(commit)
        self._check_binding(commit)
        if previous is not None and previous != head and not allow_downgrade:
            self._refuse_downgrade(previous, commit, head_is_new)
        needed, image = self._content(commit, head_is_new)
        new_commits = [commit] if head_is_new else []
        shallow_add, shallow_drop = self._history(commit, new_commits)
        self._objects({d: s for d, s in needed.items() if not self.repo.objects.has(d)})
        if image is not None:
            digest = self.repo.objects.add_bytes(image)
            self.repo.mark_verified(head, digest)
        self._store_commits(new_commits, shallow_add, shallow_drop)
        if previous != head:
            self.repo.git.references.create(ref, head, force=True)
            dumbhttp.update_server_info(self.repo)
        remove_tree(self.resume_dir, ignore_errors=True)  # whatever is left, nothing needs
        self._report("done")
        return PullResult(
            remote=name, branch=self.branch, ref=ref, commit=head, previous=previous, signer=signer,
            commits_fetched=len(new_commits), git_objects_fetched=self.git.fetched,
            objects_fetched=self.objects_done, bytes_fetched=self.bytes_done,
            wire_bytes=self.transport.stats.wire_bytes, requests=self.transport.stats.requests,
            elapsed=time.monotonic() - self.start)

    # --- commits and manifests -------------------------------------------------------

    def _commit(self, oid: str) -> tuple[RawCommit, bool]:
        new = not self.git.has(oid)
        commit = parse_commit(oid, self.git.read(oid, "commit"))
        self._report("metadata")
        return commit, new

    def _verify(self, commit: RawCommit) -> Signer | None:
        if self.trusted is None:
            return None
        where = f"commit {commit.id} from remote {self.remote.name}"
        if commit.signature is None:
            raise SignatureIntegrityError(f"{where} is not signed, and the remote requires signatures (gpg-verify)")
        try:
            return keyring.verify(self.trusted, commit.signed_payload, commit.signature)
        except SignatureError as e:
            raise SignatureIntegrityError(f"{where}: {e}") from None

    def _check_binding(self, commit: RawCommit) -> None:
        """The head must be bound to the branch pulled.  Only the head: a branch's
        history may hold commits made for others (a branch forked from another, a
        promotion), and the head is what upgrades deploy."""
        where = f"commit {commit.id[:12]} from remote {self.remote.name}"
        try:
            bound = bindings(commit.message)
        except TrailerError as e:
            raise TrailerError(f"{where}: {e}") from None
        if self.branch in bound:
            return
        if bound:
            named = ", ".join(bound[:3]) + (", ..." if len(bound) > 3 else "")
            raise BindingError(f"{where} was made for {named}, not {self.branch}: refusing it "
                               "(the server names another branch's commit)")
        if self.remote.require_binding:
            raise BindingError(f"{where} names no branch ({TRAILER_BRANCH}), and the remote requires "
                               "one (require-binding)")

    def _refuse_downgrade(self, previous: str, commit: RawCommit, is_new: bool) -> None:
        old = self.repo.git[previous].peel(pygit2.Commit)
        older = commit.time < old.commit_time
        if older or (not is_new and self.repo.git.descendant_of(previous, commit.id)):
            raise DowngradeError(f"remote {self.remote.name} offers {commit.id[:12]}, older than "
                                 f"{previous[:12]} which {self.remote.name}/{self.branch} names: "
                                 "refusing a downgrade (allow it explicitly to go back)")

    def _manifest(self, commit: RawCommit) -> tuple[bytes, str, bytes]:
        """(tree data, manifest id, manifest data) of a commit, each checked against its id."""
        tree = self.git.read(commit.tree, "tree")
        entries = parse_tree(commit.tree, tree)
        if len(entries) != 1 or entries[0][:2] != (0o100644, MANIFEST.encode()):
            raise ManifestError(f"commit {commit.id}: its tree must hold {MANIFEST} only")
        blob = entries[0][2]
        return tree, blob, self.git.read(blob, "blob")

    def _content(self, commit: RawCommit, is_new: bool) -> tuple[dict[bytes, int | None], bytes | None]:
        """The objects the head needs (with their sizes; None for what seals it, whose
        size no manifest gives), and its image if it must be stored; the manifest and
        tree are stored once they proved to give the commit's image."""
        tree, blob, data = self._manifest(commit)
        try:
            root = dumpfile.parse(data)
        except CfsError as e:
            raise ManifestError(f"commit {commit.id}: malformed manifest: {e}") from None
        needed: dict[bytes, int | None] = {**check_manifest(root)}
        t = trailers(commit.message)  # they parse: _check_binding read them
        try:
            sealed = sealed_trailers(t)
        except TrailerError as e:
            raise TrailerError(f"commit {commit.id[:12]} from remote {self.remote.name}: {e}") from None
        for obj in sealed.objects() if sealed else ():
            needed.setdefault(obj, None)
        digest = digest_trailer(t)
        fmt = int(t.get(TRAILER_FORMAT, "")) if t.get(TRAILER_FORMAT, "").isdigit() else -1
        if digest is None or not 0 <= fmt <= imagewriter.FORMAT_VERSION_MAX:
            raise ManifestError(f"commit {commit.id}: no valid {TRAILER_DIGEST} and {TRAILER_FORMAT} trailers")
        image = None
        # A commit already here came with its image checked, by the commit or pull that stored it.
        if is_new or not self.repo.objects.has(digest):
            try:
                image = imagewriter.build(root, min_version=fmt, max_version=fmt).image
            except CfsError as e:
                raise ManifestError(f"commit {commit.id}: no image can be built from its manifest: {e}") from None
            if fsverity.digest_bytes(image) != digest:
                raise ManifestError(f"commit {commit.id}: its manifest does not give the image its "
                                    f"{TRAILER_DIGEST} names (tampered manifest?)")
        self.git.write("blob", blob, data)
        self.git.write("tree", commit.tree, tree)
        return needed, image

    def _history(self, head: RawCommit, new: list[RawCommit]) -> tuple[set[str], set[str]]:
        """Fetch the commits below the head (with their manifests) down to `depth`,
        appending the new ones to `new`; returns the commits to add to and drop
        from git/shallow."""
        shallow = self._read_shallow()
        add: set[str] = set()
        drop: set[str] = set()
        seen = {head.id}
        queue = collections.deque([(head, 1)])
        while queue:
            commit, level = queue.popleft()
            if self.depth is not None and level >= self.depth:
                if not all(self.git.has(p) for p in commit.parents):
                    add.add(commit.id)  # history stops here
                continue
            drop |= {commit.id} & shallow
            for parent in commit.parents:
                if parent in seen:
                    continue
                seen.add(parent)
                pc, is_new = self._commit(parent)
                if is_new:
                    tree, blob, data = self._manifest(pc)
                    self.git.write("blob", blob, data)
                    self.git.write("tree", pc.tree, tree)
                    new.append(pc)
                queue.append((pc, level + 1))
        return add, drop

    def _read_shallow(self) -> set[str]:
        try:
            with open(self.shallow_path, "rb") as f:
                ids = set(f.read().split())
        except FileNotFoundError:
            return set()
        if not all(len(i) == 40 and all(c in b"0123456789abcdef" for c in i) for i in ids):
            raise PullIntegrityError(f"{self.shallow_path} is damaged: it should list commit ids, one a line")
        return {i.decode() for i in ids}

    def _write_shallow(self, ids: set[str]) -> None:
        if not ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.shallow_path)
            return
        data = "".join(f"{i}\n" for i in sorted(ids)).encode()
        atomic_write_bytes(self.shallow_path, data, tmpdir=os.path.join(self.repo.path, "tmp"))

    def _store_commits(self, new: list[RawCommit], add: set[str], drop: set[str]) -> None:
        """Write commits parents first, so that any commit stored has its history stored
        or listed in git/shallow, whenever this stops."""
        shallow = self._read_shallow()
        if add - shallow:
            self._write_shallow(shallow | add)
        by_id = {c.id: c for c in new}
        done: set[str] = set()
        for first in new:
            stack = [(first, False)]
            while stack:
                commit, parents_done = stack.pop()
                if commit.id in done:
                    continue
                if parents_done:
                    self.git.write("commit", commit.id, commit.data)
                    done.add(commit.id)
                    continue
                stack.append((commit, True))
                stack.extend((by_id[p], False) for p in commit.parents if p in by_id and p not in done)
        if drop:
            self._write_shallow((shallow | add) - drop)
        if add - shallow or drop:
            # libgit2 reads git/shallow when it opens a repository, never again.
            self.repo.git = pygit2.Repository(self.repo.git.path)

    # --- objects -----------------------------------------------------------------------

    def _objects(self, todo: dict[bytes, int | None]) -> None:
        """Workers download and check objects into tmp/resume/; every so often this
        thread makes their content durable with one syncfs and renames them into
        objects/ (an fsync per object would cost more than the transfer)."""
        self.objects_total = len(todo)
        self.bytes_total = sum(size or 0 for size in todo.values())
        if not todo:
            return
        os.makedirs(self.resume_dir, exist_ok=True)
        # Largest first, so that no big transfer starts last and runs alone (a UKI is big).
        order = sorted(todo.items(), key=lambda item: -(self.options.max_sealed if item[1] is None else item[1]))
        try:
            with ThreadPoolExecutor(max_workers=self.options.jobs, thread_name_prefix="pull") as pool:
                pending = {pool.submit(self._object, digest, size) for digest, size in order}
                try:
                    while pending:
                        done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                        self._adopt_checked()
                        self._report("objects")
                        for future in done:
                            future.result()
                except BaseException:
                    self.stop.set()
                    for future in pending:
                        future.cancel()
                    raise
        finally:
            # Checked objects are kept even when the pull fails: the next one needs them.
            self._adopt_checked()
            syncfs(self.repo.objects.path)  # their names are durable before any commit names them

    def _object(self, digest: bytes, size: int | None) -> None:
        path = f"objects/{os.fsdecode(digest_to_path(digest))}"
        part = os.path.join(self.resume_dir, digest.hex())
        for attempt in (1, 2):
            resumed, got = self._download(path, part, size)
            if got == digest:
                break
            os.unlink(part)
            if not resumed or attempt == 2:
                raise ObjectMismatchError(f"{self.transport.url}/{path}: content does not match its "
                                          "fs-verity digest (corrupt or tampered)")
            # The part kept from an earlier pull may have been the wrong one: once more from 0.
        with self.lock:
            self.checked.append((part, digest))

    def _adopt_checked(self) -> None:
        with self.lock:
            batch, self.checked = self.checked, []
        if not batch:
            return
        syncfs(self.resume_dir)  # the content of each is on disk before it gets its name
        for part, digest in batch:
            self.repo.objects.adopt(part, digest, sync_dir=False)
        with self.lock:
            self.objects_done += len(batch)

    def _download(self, path: str, part: str, size: int | None) -> tuple[bool, bytes]:
        """Complete the partial file `part` (or start it) from the remote's `path`;
        returns whether it resumed, and the fs-verity digest of what it holds.  Of an
        unknown size, at most max_sealed bytes, and never resumed (what is
        there may be all of it, or not)."""
        try:
            have = os.stat(part).st_size
        except FileNotFoundError:
            have = 0
        if size is None or have > size:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            have = 0
        hasher = fsverity.Hasher()
        with open(part, "ab") as f:
            if have:
                with open(part, "rb") as kept:
                    while chunk := kept.read(1 << 20):
                        hasher.update(chunk)

            def sink(data: bytes) -> None:
                if self.stop.is_set():
                    raise _Cancelled()
                f.write(data)
                hasher.update(data)
                with self.lock:
                    self.bytes_done += len(data)

            if size is None:
                self.transport.fetch(path, sink, limit=self.options.max_sealed)
            elif have < size:
                self.transport.fetch(path, sink, limit=size, offset=have)
            f.flush()
            got = os.fstat(f.fileno()).st_size
        if size is not None and got != size:
            raise PullError(f"{self.transport.url}/{path}: the server sent {got} of its {size} bytes")
        return have > 0, hasher.digest()

    def _report(self, phase: str) -> None:
        if self.progress is not None:
            with self.lock:
                p = PullProgress(phase, self.objects_done, self.objects_total, self.bytes_done,
                                 self.bytes_total, self.transport.stats.wire_bytes,
                                 time.monotonic() - self.start)
            self.progress(p)

