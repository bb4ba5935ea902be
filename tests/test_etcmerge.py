"""The /etc 3-way merge: local edits, additions and deletions win; files the user
never touched follow upstream; impossible local changes are reported, upstream kept.

Each test builds the original /etc on disk, commits it (scan into an object store),
checks it out twice as the starting point of the next commit ("new") and of the
running deployment's writable /etc ("local"), edits those, and merges.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cfsdeploy.composefs.objects import ObjectStore
from cfsdeploy.composefs.scan import scan
from cfsdeploy.composefs.tree import Inode, lookup
from cfsdeploy.repo.checkout import CheckoutUsageError, checkout
from cfsdeploy.sysroot.etcmerge import (
    Conflict,
    ConflictKind,
    EtcMergeError,
    MergeReport,
    merge_etc,
    merge_local,
    read_local,
)
from cfsdeploy.util.errors import CfsError
from cfsdeploy.util.run import run

from .fstree import compare_trees, make_everything_tree

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown, mknod and trusted.* xattrs"),
]

MTIME_NS = 1_600_000_000_123_456_789


def write(top: bytes, rel: bytes, data: bytes, mode: int = 0o644) -> None:
    path = os.path.join(top, rel)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def read(top: bytes, rel: bytes) -> bytes:
    with open(os.path.join(top, rel), "rb") as f:
        return f.read()


def mkdir(top: bytes, rel: bytes, mode: int = 0o755) -> None:
    os.mkdir(os.path.join(top, rel))
    os.chmod(os.path.join(top, rel), mode)


def xattrs(path: bytes) -> dict[bytes, bytes]:
    return {os.fsencode(n): os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)}


class Etcs:
    """The three /etc directories of a merge, as bytes paths: orig (what the local
    /etc came from), new (the next commit's) and local; dest is the merge result."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = os.fsencode(tmp)
        self.store = ObjectStore(tmp / "objects")
        self.orig = self.tmp + b"/orig/etc"
        self.new = self.tmp + b"/new/etc"
        self.local = self.tmp + b"/local/etc"
        self.dest = self.tmp + b"/staging/etc"
        os.makedirs(self.orig)
        os.chmod(self.orig, 0o755)
        self.orig_etc: Inode | None = None

    def commit(self, etc: bytes) -> Inode:
        root, _ = scan(os.path.dirname(etc), store=self.store, warn=lambda m: None)
        node = lookup(root, b"/etc")
        assert isinstance(node, Inode)
        return node

    def fork(self) -> None:
        """Commit orig; new and local start as checkouts of it."""
        self.orig_etc = self.commit(self.orig)
        for etc in (self.new, self.local):
            os.mkdir(os.path.dirname(etc))
            checkout(self.orig_etc, self.store, os.fsdecode(etc))

    def merge(self) -> MergeReport:
        os.makedirs(os.path.dirname(self.dest), exist_ok=True)
        return merge_etc(self.orig_etc, self.local, self.commit(self.new), self.store, self.dest)


@pytest.fixture
def etc(tmp_path: Path) -> Etcs:
    return Etcs(tmp_path)


# First deployment

def test_first_deployment_is_a_plain_checkout_of_new(etc: Etcs) -> None:
    write(etc.orig, b"hostname", b"box\n")
    write(etc.orig, b"big.conf", b"x" * 5000, 0o600)
    mkdir(etc.orig, b"ssh", 0o700)
    os.symlink(b"../run/resolv.conf", etc.orig + b"/resolv.conf")
    etc.fork()
    os.mkdir(os.path.dirname(etc.dest))
    report = merge_etc(None, None, etc.commit(etc.new), etc.store, etc.dest)
    assert report == MergeReport()
    assert compare_trees(Path(os.fsdecode(etc.new)), Path(os.fsdecode(etc.dest))) == []


def test_first_deployment_without_upstream_etc_is_an_empty_root_owned_directory(etc: Etcs) -> None:
    os.mkdir(os.path.dirname(etc.dest))
    merge_etc(None, None, None, etc.store, etc.dest)
    st = os.lstat(etc.dest)
    assert (st.st_mode, st.st_uid, st.st_gid) == (stat.S_IFDIR | 0o755, 0, 0)
    assert os.listdir(etc.dest) == []


def test_without_an_original_etc_every_local_entry_counts_as_added(etc: Etcs) -> None:
    etc.fork()
    write(etc.local, b"mine", b"local\n")
    mkdir(etc.local, b"mine.d")
    os.mkdir(os.path.dirname(etc.dest))
    report = merge_etc(None, etc.local, None, etc.store, etc.dest)
    assert report.added == [b"/etc/mine", b"/etc/mine.d"]
    assert read(etc.dest, b"mine") == b"local\n"


# Untouched files follow upstream

def test_untouched_file_follows_upstream_change(etc: Etcs) -> None:
    write(etc.orig, b"os-release", b"VERSION=1\n")
    etc.fork()
    write(etc.new, b"os-release", b"VERSION=2\n")
    assert etc.merge() == MergeReport()
    assert read(etc.dest, b"os-release") == b"VERSION=2\n"


def test_upstream_addition_arrives(etc: Etcs) -> None:
    etc.fork()
    mkdir(etc.new, b"new.d")
    write(etc.new, b"new.d/default.conf", b"shipped\n")
    assert etc.merge() == MergeReport()
    assert read(etc.dest, b"new.d/default.conf") == b"shipped\n"


def test_upstream_deletion_of_untouched_file_happens(etc: Etcs) -> None:
    write(etc.orig, b"obsolete.conf", b"old\n")
    etc.fork()
    os.unlink(etc.new + b"/obsolete.conf")
    assert etc.merge() == MergeReport()
    assert not os.path.lexists(etc.dest + b"/obsolete.conf")


# Local edits

def test_local_edit_wins_over_upstream_change(etc: Etcs) -> None:
    write(etc.orig, b"sshd_config", b"PermitRootLogin no\n" * 10)
    etc.fork()
    write(etc.new, b"sshd_config", b"PermitRootLogin prohibit-password\n" * 10)
    write(etc.local, b"sshd_config", b"PermitRootLogin yes\n" * 10)
    report = etc.merge()
    assert report.modified == [b"/etc/sshd_config"]
    assert read(etc.dest, b"sshd_config") == b"PermitRootLogin yes\n" * 10


def test_local_edit_is_kept_when_upstream_is_unchanged(etc: Etcs) -> None:
    write(etc.orig, b"hostname", b"localhost\n")
    etc.fork()
    write(etc.local, b"hostname", b"box\n")
    assert etc.merge().modified == [b"/etc/hostname"]
    assert read(etc.dest, b"hostname") == b"box\n"


def test_local_edit_of_a_file_upstream_deleted_is_kept(etc: Etcs) -> None:
    write(etc.orig, b"legacy.conf", b"default\n")
    etc.fork()
    os.unlink(etc.new + b"/legacy.conf")
    write(etc.local, b"legacy.conf", b"still needed\n")
    assert etc.merge().modified == [b"/etc/legacy.conf"]
    assert read(etc.dest, b"legacy.conf") == b"still needed\n"


def test_file_edited_back_to_its_default_is_not_a_change_and_follows_upstream(etc: Etcs) -> None:
    write(etc.orig, b"motd", b"welcome\n")
    etc.fork()
    write(etc.local, b"motd", b"something else\n")
    write(etc.local, b"motd", b"welcome\n")
    os.utime(etc.local + b"/motd", ns=(MTIME_NS, MTIME_NS))  # mtime never counts
    write(etc.new, b"motd", b"welcome to version 2\n")
    assert etc.merge() == MergeReport()
    assert read(etc.dest, b"motd") == b"welcome to version 2\n"


def test_mode_only_change_counts_and_keeps_the_local_file(etc: Etcs) -> None:
    write(etc.orig, b"sudoers", b"root ALL=(ALL) ALL\n", 0o440)
    etc.fork()
    write(etc.new, b"sudoers", b"root ALL=(ALL:ALL) ALL\n", 0o440)
    os.chmod(etc.local + b"/sudoers", 0o400)
    assert etc.merge().modified == [b"/etc/sudoers"]
    # The user's whole file wins, not just its mode.
    assert read(etc.dest, b"sudoers") == b"root ALL=(ALL) ALL\n"
    assert stat.S_IMODE(os.lstat(etc.dest + b"/sudoers").st_mode) == 0o400


def test_owner_only_change_counts_and_keeps_the_local_file(etc: Etcs) -> None:
    write(etc.orig, b"app.conf", b"a=1\n")
    etc.fork()
    write(etc.new, b"app.conf", b"a=2\n")
    os.chown(etc.local + b"/app.conf", 1000, 1001)
    assert etc.merge().modified == [b"/etc/app.conf"]
    st = os.lstat(etc.dest + b"/app.conf")
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert read(etc.dest, b"app.conf") == b"a=1\n"


def test_xattr_only_change_counts_and_keeps_the_local_file(etc: Etcs) -> None:
    write(etc.orig, b"ping.conf", b"x\n")
    os.setxattr(etc.orig + b"/ping.conf", b"user.origin", b"vendor")
    etc.fork()
    write(etc.new, b"ping.conf", b"y\n")
    os.removexattr(etc.local + b"/ping.conf", b"user.origin")
    os.setxattr(etc.local + b"/ping.conf", b"trusted.note", b"mine")
    assert etc.merge().modified == [b"/etc/ping.conf"]
    assert xattrs(etc.dest + b"/ping.conf") == {b"trusted.note": b"mine"}
    assert read(etc.dest, b"ping.conf") == b"x\n"


def test_selinux_label_alone_is_not_a_change(etc: Etcs) -> None:
    write(etc.orig, b"resolv.conf", b"nameserver 10.0.0.1\n")
    os.setxattr(etc.orig + b"/resolv.conf", b"security.selinux", b"system_u:object_r:etc_t:s0\0")
    etc.fork()
    write(etc.new, b"resolv.conf", b"nameserver 10.0.0.2\n")
    os.setxattr(etc.local + b"/resolv.conf", b"security.selinux", b"system_u:object_r:net_conf_t:s0\0")
    assert etc.merge() == MergeReport()
    assert read(etc.dest, b"resolv.conf") == b"nameserver 10.0.0.2\n"
    assert xattrs(etc.dest + b"/resolv.conf") == {b"security.selinux": b"system_u:object_r:etc_t:s0\0"}


def test_symlink_retargeted_locally_is_kept(etc: Etcs) -> None:
    os.symlink(b"/usr/share/zoneinfo/UTC", etc.orig + b"/localtime")
    etc.fork()
    os.unlink(etc.new + b"/localtime")
    os.symlink(b"/usr/share/zoneinfo/Etc/UTC", etc.new + b"/localtime")
    os.unlink(etc.local + b"/localtime")
    os.symlink(b"/usr/share/zoneinfo/Europe/Paris", etc.local + b"/localtime")
    assert etc.merge().modified == [b"/etc/localtime"]
    assert os.readlink(etc.dest + b"/localtime") == b"/usr/share/zoneinfo/Europe/Paris"


def test_directory_metadata_change_applies_while_its_children_follow_upstream(etc: Etcs) -> None:
    mkdir(etc.orig, b"sudoers.d", 0o755)
    write(etc.orig, b"sudoers.d/vendor", b"v1\n")
    os.setxattr(etc.orig + b"/sudoers.d", b"security.selinux", b"old_t\0")
    etc.fork()
    write(etc.new, b"sudoers.d/vendor", b"v2\n")
    write(etc.new, b"sudoers.d/added", b"new\n")
    os.setxattr(etc.new + b"/sudoers.d", b"security.selinux", b"new_t\0")
    os.chmod(etc.local + b"/sudoers.d", 0o750)
    os.chown(etc.local + b"/sudoers.d", 0, 27)
    assert etc.merge().modified == [b"/etc/sudoers.d"]
    st = os.lstat(etc.dest + b"/sudoers.d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 0, 27)
    assert sorted(os.listdir(etc.dest + b"/sudoers.d")) == [b"added", b"vendor"]
    assert read(etc.dest, b"sudoers.d/vendor") == b"v2\n"
    # The label is upstream's: labels are never user edits.
    assert xattrs(etc.dest + b"/sudoers.d") == {b"security.selinux": b"new_t\0"}


# Local additions

def test_local_addition_is_kept(etc: Etcs) -> None:
    etc.fork()
    mkdir(etc.local, b"myapp")
    write(etc.local, b"myapp/config.toml", b"port = 8080\n")
    assert etc.merge().added == [b"/etc/myapp"]
    assert read(etc.dest, b"myapp/config.toml") == b"port = 8080\n"


def test_local_addition_wins_over_an_upstream_addition_of_the_same_path(etc: Etcs) -> None:
    etc.fork()
    write(etc.new, b"chrony.conf", b"pool vendor.example\n")
    write(etc.local, b"chrony.conf", b"server 10.0.0.1\n")
    assert etc.merge().added == [b"/etc/chrony.conf"]
    assert read(etc.dest, b"chrony.conf") == b"server 10.0.0.1\n"


def test_locally_added_directory_merges_into_the_same_directory_added_upstream(etc: Etcs) -> None:
    etc.fork()
    mkdir(etc.new, b"conf.d")
    write(etc.new, b"conf.d/00-vendor", b"vendor\n")
    write(etc.new, b"conf.d/50-both", b"upstream\n")
    mkdir(etc.local, b"conf.d", 0o750)
    write(etc.local, b"conf.d/50-both", b"local\n")
    write(etc.local, b"conf.d/99-local", b"local\n")
    assert etc.merge().added == [b"/etc/conf.d"]
    assert sorted(os.listdir(etc.dest + b"/conf.d")) == [b"00-vendor", b"50-both", b"99-local"]
    assert read(etc.dest, b"conf.d/50-both") == b"local\n"
    assert stat.S_IMODE(os.lstat(etc.dest + b"/conf.d").st_mode) == 0o750


def test_local_addition_inside_a_directory_upstream_removed_recreates_it_from_the_local_one(etc: Etcs) -> None:
    mkdir(etc.orig, b"old.d", 0o750)
    mkdir(etc.orig, b"old.d/sub", 0o700)
    write(etc.orig, b"old.d/sub/default", b"default\n")
    os.chown(etc.orig + b"/old.d", 1000, 1001)
    os.setxattr(etc.orig + b"/old.d", b"user.template", b"yes")
    etc.fork()
    shutil.rmtree(os.path.join(etc.new, b"old.d"))
    write(etc.local, b"old.d/sub/mine", b"mine\n")
    report = etc.merge()
    assert report.added == [b"/etc/old.d/sub/mine"]
    for rel in (b"old.d", b"old.d/sub"):
        want, got = os.lstat(os.path.join(etc.local, rel)), os.lstat(os.path.join(etc.dest, rel))
        assert (got.st_mode, got.st_uid, got.st_gid, got.st_mtime_ns) == (
            want.st_mode, want.st_uid, want.st_gid, want.st_mtime_ns)
        assert xattrs(os.path.join(etc.dest, rel)) == xattrs(os.path.join(etc.local, rel))
    # Upstream's removal of the untouched default still happens.
    assert os.listdir(etc.dest + b"/old.d/sub") == [b"mine"]


# Local deletions

def test_local_deletion_persists_even_when_upstream_changed_the_file(etc: Etcs) -> None:
    write(etc.orig, b"cron.deny", b"nobody\n")
    etc.fork()
    write(etc.new, b"cron.deny", b"nobody\nguest\n")
    os.unlink(etc.local + b"/cron.deny")
    assert etc.merge().removed == [b"/etc/cron.deny"]
    assert not os.path.lexists(etc.dest + b"/cron.deny")


def test_locally_deleted_directory_stays_deleted(etc: Etcs) -> None:
    mkdir(etc.orig, b"unwanted.d")
    write(etc.orig, b"unwanted.d/a", b"a\n")
    etc.fork()
    write(etc.new, b"unwanted.d/a", b"a2\n")
    write(etc.new, b"unwanted.d/b", b"b\n")
    shutil.rmtree(os.path.join(etc.local, b"unwanted.d"))
    assert etc.merge().removed == [b"/etc/unwanted.d"]
    assert not os.path.lexists(etc.dest + b"/unwanted.d")


def test_local_deletion_below_a_directory_upstream_made_a_symlink_touches_nothing_outside(etc: Etcs) -> None:
    outside = etc.tmp + b"/outside"
    os.mkdir(outside)
    write(outside, b"x", b"must survive\n")
    mkdir(etc.orig, b"d")
    write(etc.orig, b"d/x", b"x\n")
    etc.fork()
    shutil.rmtree(os.path.join(etc.new, b"d"))
    os.symlink(outside, etc.new + b"/d")
    os.unlink(etc.local + b"/d/x")
    write(etc.local, b"d/y", b"y\n")
    report = etc.merge()
    assert read(outside, b"x") == b"must survive\n"
    assert os.listdir(outside) == [b"x"]
    assert os.readlink(etc.dest + b"/d") == outside
    assert report.conflicts == [Conflict(b"/etc/d/y", ConflictKind.PARENT_NOT_DIRECTORY, "symlink", parent=b"/etc/d")]


# A local user racing the merge: /etc/app is theirs, /etc/app/app.conf their edit

USER = 1000
SECRET = b"root only\n"


def user_directory_and_root_only_twin(etc: Etcs) -> bytes:
    """orig ships /etc/app/app.conf; the local one is the user's edit in their own
    directory.  Returns a root-only directory outside /etc holding an app.conf of its
    own, what a swapped symlink would lead to."""
    mkdir(etc.orig, b"app")
    os.chown(etc.orig + b"/app", USER, USER)
    write(etc.orig, b"app/app.conf", b"default\n")
    etc.fork()
    write(etc.local, b"app/app.conf", b"the user's edit\n")
    secret = etc.tmp + b"/root-only"
    mkdir(etc.tmp, b"root-only", 0o700)
    write(secret, b"app.conf", SECRET, 0o600)
    os.makedirs(os.path.dirname(etc.dest), exist_ok=True)
    return secret


def test_a_directory_swapped_for_a_symlink_after_the_scan_stops_the_merge(etc: Etcs) -> None:
    secret = user_directory_and_root_only_twin(etc)
    local = read_local(etc.local)
    try:
        os.rename(etc.local + b"/app", etc.local + b"/app.away")
        os.symlink(secret, etc.local + b"/app")
        with pytest.raises(EtcMergeError, match="/etc/app/app.conf changed during the merge"):
            merge_local(etc.orig_etc, local, etc.commit(etc.new), etc.store, etc.dest)
    finally:
        local.close()
    assert not os.path.lexists(etc.dest)


def test_a_file_replaced_after_the_scan_stops_the_merge(etc: Etcs) -> None:
    user_directory_and_root_only_twin(etc)
    local = read_local(etc.local)
    try:
        os.rename(etc.local + b"/app/app.conf", etc.local + b"/app/old")
        write(etc.local, b"app/app.conf", b"the user's edit\n")
        with pytest.raises(EtcMergeError, match="/etc/app/app.conf changed during the merge"):
            merge_local(etc.orig_etc, local, etc.commit(etc.new), etc.store, etc.dest)
    finally:
        local.close()
    assert not os.path.lexists(etc.dest)


def regular_files(top: bytes) -> list[bytes]:
    """The contents of every regular file under top, no symlink followed."""
    out = []
    for d, _, files in os.walk(top):
        for name in files:
            path = os.path.join(d, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                out.append(read(d, name))
    return out


def test_a_directory_swapped_back_and_forth_during_merges_never_brings_in_a_file_from_outside(etc: Etcs) -> None:
    secret = user_directory_and_root_only_twin(etc)
    twin = etc.tmp + b"/twin"
    os.symlink(secret, twin)
    new = etc.commit(etc.new)
    # The user's side, in a process of its own: swap /etc/app and the symlink, endlessly.
    swapper = subprocess.Popen([sys.executable, "-c",
                                "import sys\nfrom cfsdeploy.util.fsutil import exchange\n"
                                "while True: exchange(sys.argv[1], sys.argv[2])",
                                etc.local + b"/app", twin])
    refused = merged = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                merge_etc(etc.orig_etc, etc.local, new, etc.store, etc.dest)
            except EtcMergeError:
                refused += 1
                assert not os.path.lexists(etc.dest)
                continue
            merged += 1
            assert SECRET not in regular_files(etc.dest)
            shutil.rmtree(etc.dest)
    finally:
        swapper.kill()
        swapper.wait()
    assert merged + refused > 0


# Type changes and conflicts

def test_locally_edited_file_that_upstream_turned_into_a_directory_is_a_conflict(etc: Etcs) -> None:
    write(etc.orig, b"limits.conf", b"default\n")
    etc.fork()
    os.unlink(etc.new + b"/limits.conf")
    mkdir(etc.new, b"limits.conf")
    write(etc.new, b"limits.conf/00-default", b"default\n")
    write(etc.local, b"limits.conf", b"edited\n")
    report = etc.merge()
    assert report.conflicts == [
        Conflict(b"/etc/limits.conf", ConflictKind.UPSTREAM_RETYPED, "directory", local="file", original="file")]
    assert report.modified == []
    assert os.listdir(etc.dest + b"/limits.conf") == [b"00-default"]


def test_local_addition_of_another_type_than_upstream_added_is_a_conflict(etc: Etcs) -> None:
    etc.fork()
    mkdir(etc.new, b"foo")
    write(etc.local, b"foo", b"mine\n")
    report = etc.merge()
    assert report.conflicts == [Conflict(b"/etc/foo", ConflictKind.BOTH_ADDED, "directory", local="file")]
    assert report.added == []
    assert stat.S_ISDIR(os.lstat(etc.dest + b"/foo").st_mode)


def test_local_addition_under_a_directory_upstream_turned_into_a_file_is_a_conflict(etc: Etcs) -> None:
    mkdir(etc.orig, b"d")
    etc.fork()
    os.rmdir(etc.new + b"/d")
    write(etc.new, b"d", b"now a file\n")
    write(etc.local, b"d/mine", b"mine\n")
    report = etc.merge()
    assert report.conflicts == [Conflict(b"/etc/d/mine", ConflictKind.PARENT_NOT_DIRECTORY, "file", parent=b"/etc/d")]
    assert read(etc.dest, b"d") == b"now a file\n"


def test_directory_replaced_by_a_file_locally_wins_when_upstream_kept_the_directory(etc: Etcs) -> None:
    mkdir(etc.orig, b"profile.d")
    write(etc.orig, b"profile.d/a.sh", b"a\n")
    etc.fork()
    shutil.rmtree(os.path.join(etc.local, b"profile.d"))
    write(etc.local, b"profile.d", b"now a file\n")
    assert etc.merge().modified == [b"/etc/profile.d"]
    assert read(etc.dest, b"profile.d") == b"now a file\n"


# Metadata and names

def test_with_upstream_unchanged_the_merge_equals_the_local_etc_metadata_and_all(etc: Etcs) -> None:
    write(etc.orig, b"edited", b"default\n")
    mkdir(etc.orig, b"untouched.d")
    write(etc.orig, b"untouched.d/file", b"f\n")
    etc.fork()
    local = etc.local
    write(local, b"edited", b"edited " * 20, 0o4750)
    os.chown(local + b"/edited", 1000, 2000)
    os.chmod(local + b"/edited", 0o4750)  # chown cleared setuid
    os.setxattr(local + b"/edited", b"trusted.t", b"\0\1")
    write(local, b"added", b"", 0o600)
    os.setxattr(local + b"/added", b"user.u", b"v")
    os.setxattr(local + b"/added", b"security.selinux", b"label\0")
    mkdir(local, b"added.d", 0o2750)
    os.chown(local + b"/added.d", 3, 4)
    os.chmod(local + b"/added.d", 0o2750)
    mkdir(local, b"added.d/empty", 0o700)
    write(local, b"added.d/big", os.urandom(100_000), 0o640)
    os.symlink(b"big", local + b"/added.d/link")
    os.chown(local + b"/added.d/link", 5, 6, follow_symlinks=False)
    os.setxattr(local + b"/added.d/link", b"trusted.l", b"on a symlink", follow_symlinks=False)
    os.mknod(local + b"/added.d/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(local + b"/added.d/disk", stat.S_IFBLK | 0o660, os.makedev(259, 1))
    os.mkfifo(local + b"/added.d/fifo", 0o620)
    for i, rel in enumerate((b"added.d/empty", b"added.d/big", b"added.d/link", b"added.d/fifo",
                             b"added.d", b"edited", b"added")):
        os.utime(os.path.join(local, rel), ns=(MTIME_NS + i * 1001,) * 2, follow_symlinks=False)
    report = etc.merge()
    assert (report.modified, report.added) == ([b"/etc/edited"], [b"/etc/added", b"/etc/added.d"])
    assert compare_trees(Path(os.fsdecode(local)), Path(os.fsdecode(etc.dest))) == []


def test_non_utf8_names_are_merged(etc: Etcs) -> None:
    write(etc.orig, b"caf\xe9.conf", b"default\n")
    write(etc.orig, b"\xff\xfe", b"gone soon\n")
    mkdir(etc.orig, b"d\x80")
    etc.fork()
    write(etc.new, b"caf\xe9.conf", b"upstream\n")
    write(etc.local, b"caf\xe9.conf", b"local\n")
    os.unlink(etc.local + b"/\xff\xfe")
    write(etc.local, b"d\x80/n\xe4me", b"added\n")
    report = etc.merge()
    assert (report.modified, report.added, report.removed) == (
        [b"/etc/caf\xe9.conf"], [b"/etc/d\x80/n\xe4me"], [b"/etc/\xff\xfe"])
    assert read(etc.dest, b"caf\xe9.conf") == b"local\n"
    assert read(etc.dest, b"d\x80/n\xe4me") == b"added\n"
    assert not os.path.lexists(etc.dest + b"/\xff\xfe")
    assert report.to_json()["removed"] == [os.fsdecode(b"/etc/\xff\xfe")]


def test_sockets_are_neither_copied_nor_taken_for_deletions(etc: Etcs) -> None:
    write(etc.orig, b"control", b"default\n")
    etc.fork()
    os.unlink(etc.local + b"/control")
    os.mknod(etc.local + b"/control", stat.S_IFSOCK | 0o600)
    os.mknod(etc.local + b"/agent.sock", stat.S_IFSOCK | 0o600)
    assert etc.merge() == MergeReport()
    assert read(etc.dest, b"control") == b"default\n"
    assert not os.path.lexists(etc.dest + b"/agent.sock")


def test_everything_a_tree_can_hold_is_copied_exactly_when_added_locally(etc: Etcs) -> None:
    etc.fork()
    everything = etc.local + b"/everything"
    make_everything_tree(Path(os.fsdecode(everything)))
    os.utime(etc.local, ns=(MTIME_NS, MTIME_NS))
    assert etc.merge().added == [b"/etc/everything"]
    assert compare_trees(Path(os.fsdecode(etc.local)), Path(os.fsdecode(etc.dest))) == [
        # Sockets are skipped; hardlinked names become separate copies.
        "/everything/special/socket: missing",
        "/everything/hardlinks/a/first: nlink 3 != 1",
        "/everything/hardlinks/b/second: nlink 3 != 1",
        "/everything/hardlinks/third: nlink 3 != 1",
    ]


# The report

def test_report_lists_sorted_paths_and_typed_conflicts(etc: Etcs) -> None:
    for name in (b"b.conf", b"a.conf", b"gone", b"retyped"):
        write(etc.orig, name, b"default\n")
    etc.fork()
    os.unlink(etc.new + b"/retyped")
    mkdir(etc.new, b"retyped")
    for name in (b"b.conf", b"a.conf", b"retyped"):
        write(etc.local, name, b"local\n")
    write(etc.local, b"new", b"local\n")
    os.unlink(etc.local + b"/gone")
    report = etc.merge()
    assert report.modified == [b"/etc/a.conf", b"/etc/b.conf"]
    assert report.added == [b"/etc/new"]
    assert report.removed == [b"/etc/gone"]
    assert [c.path for c in report.conflicts] == [b"/etc/retyped"]
    assert report.to_json() == {
        "modified": ["/etc/a.conf", "/etc/b.conf"],
        "added": ["/etc/new"],
        "removed": ["/etc/gone"],
        "conflicts": [{"path": "/etc/retyped", "kind": "upstream_retyped", "upstream": "directory", "local": "file",
                       "original": "file", "parent": None}],
    }


# Errors

def test_unreadable_local_file_raises_a_typed_error_naming_it(etc: Etcs) -> None:
    etc.fork()
    write(etc.local, b"secret", b"hidden\n", 0o000)
    os.mkdir(os.path.dirname(etc.dest))
    # Root reads everything; without the two DAC capabilities it is refused like anyone.
    code = (
        "import os, sys\n"
        "from cfsdeploy.util.errors import CfsError\n"
        "from cfsdeploy.sysroot.etcmerge import EtcMergeError, merge_etc\n"
        "from cfsdeploy.composefs.objects import ObjectStore\n"
        "a = [os.fsencode(x) for x in sys.argv[1:]]\n"
        "try:\n"
        "    merge_etc(None, a[0], None, ObjectStore(a[1]), a[2])\n"
        "except EtcMergeError as e:\n"
        "    assert isinstance(e, CfsError)\n"
        "    print(e)\n"
    )
    proc = run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                "--inh-caps=-dac_override,-dac_read_search", sys.executable, "-c", code,
                etc.local, etc.store.path, etc.dest], capture=True)
    message = proc.stdout.decode()
    assert os.fsdecode(etc.local + b"/secret") in message
    assert "Permission denied" in message
    assert not os.path.lexists(etc.dest)


def test_existing_destination_is_refused_and_left_alone(etc: Etcs) -> None:
    etc.fork()
    os.makedirs(etc.dest)
    write(etc.dest, b"keep", b"keep\n")
    with pytest.raises(CheckoutUsageError, match="refusing"):
        etc.merge()
    assert os.listdir(etc.dest) == [b"keep"]

