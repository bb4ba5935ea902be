"""Deploying costs a constant number of file operations, whatever the size of the tree:
the image is one object, and only /etc is materialized."""

from __future__ import annotations

import os
from pathlib import Path

from cfsdeploy.sysroot.deploy import deploy
from cfsdeploy.sysroot.layout import Sysroot

from .sysroots import BRANCH, OS, ROOT_KARGS, commit_tree, make_os_tree


def all_paths(top: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, files in os.walk(top):
        out.update(os.path.join(dirpath, n) for n in dirnames + files)
    return out


def created_by_deploy(tmp_path: Path, entries: int) -> int:
    tree = make_os_tree(tmp_path / "tree")
    # Empty files are inline in the manifest: the commit stays cheap, the tree big.
    per_dir = 1000
    for d in range(entries // per_dir):
        sub = tree / "usr/share/many" / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(per_dir - 1):
            (sub / f"f{f}").touch()
    s = Sysroot.init(str(tmp_path / "sysroot"), OS, karg_list=ROOT_KARGS)
    commit_tree(s, tree)
    before = all_paths(tmp_path / "sysroot")
    deploy(s, BRANCH, os_name=OS)
    return len(all_paths(tmp_path / "sysroot") - before)


def test_deploy_creates_as_many_files_for_100k_entries_as_for_1k(tmp_path) -> None:
    small = created_by_deploy(tmp_path / "small", 1_000)
    large = created_by_deploy(tmp_path / "large", 100_000)
    assert small == large
    # deployment dir, record, etc (5 entries), image object, kernel dir with two files,
    # loader/entries with one entry, the deployment's ref, and /var's contents.
    assert small < 30
