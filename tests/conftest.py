"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# The helpers' asserts (the entry guard of sysroots.py) say what differed, as tests' do.
pytest.register_assert_rewrite("tests.sysroots")


@pytest.fixture(scope="session")
def requires_mount() -> None:
    """Skip, saying why, unless this process can mount EROFS/composefs images."""
    from cfsdeploy.composefs.mounts import can_mount  # here, so other tests never depend on it importing

    ok, reason = can_mount()
    if not ok:
        pytest.skip(f"cannot mount images here: {reason}")


@pytest.fixture(scope="session")
def everything_tree(tmp_path_factory, requires_mount) -> Path:
    """A tree holding every file type and metadata a root filesystem can (needs root)."""
    from .fstree import make_everything_tree

    tree = tmp_path_factory.mktemp("everything") / "tree"
    tree.mkdir()
    make_everything_tree(tree)
    return tree
