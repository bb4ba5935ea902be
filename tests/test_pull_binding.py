"""Branch binding: a commit names, inside what is signed, the branches it was made
for (Cfsdeploy-Branch trailers); a pull refuses a head that is not bound to the
branch pulled, so a server cannot present one signed branch's head as another's."""

from __future__ import annotations

from pathlib import Path

import pygit2
import pytest
from click.testing import CliRunner

from cfsdeploy.cli import main
from cfsdeploy.remote.pull import BindingError, pull
from cfsdeploy.repo import dumbhttp, signing
from cfsdeploy.repo.repository import Repository, bindings, history

from .pullkit import (  # noqa: F401  (fixtures)
    Key,
    assert_only_verified_additions,
    builder_key,
    client,
    nginx,
    publish,
    serve_branch_as,
    snapshot,
    write_files,
)

STABLE = "os/stable"
DEBUG = "os/debug"
REF = f"refs/remotes/origin/{STABLE}"


@pytest.fixture
def served(nginx, tmp_path, request, builder_key):  # noqa: F811
    """A signed repository under nginx with a stable and a debug branch: (its path, URL)."""
    src = nginx.root / request.node.name.replace("[", "_").replace("]", "_")
    write_files(tmp_path / "stable", {"usr/lib/os-release": b"stable\n", "usr/bin/tool": b"t" * 5000})
    write_files(tmp_path / "debug", {"usr/lib/os-release": b"debug\n", "usr/bin/gdb": b"g" * 5000})
    publish(src, tmp_path / "stable", STABLE, key=builder_key)
    publish(src, tmp_path / "debug", DEBUG, key=builder_key)
    nginx.clear_log()
    return src, nginx.url(src.name)


def head(src: Path, branch: str) -> str:
    return str(Repository(src).resolve(branch).id)


def unbound_head(src: Path, branch: str, key: Key) -> str:
    """A signed commit on `branch` as cfsdeploy made them before bindings (no
    Cfsdeploy-Branch trailer), served as the branch's head."""
    repo = Repository(src)
    parent = repo.resolve(branch)
    message = "".join(f"{line}\n" for line in parent.message.splitlines()
                      if not line.startswith("Cfsdeploy-Branch: "))
    sig = pygit2.Signature("Builder", key.email, parent.commit_time + 1, 0)
    content = repo.git.create_commit_string(sig, sig, message, parent.tree_id, [parent.id])
    oid = repo.git.create_commit_with_signature(content, signing.sign(content.encode(), key.email,
                                                                      homedir=key.home))
    repo.git.references.create(f"refs/heads/{branch}", oid, force=True)
    dumbhttp.update_server_info(repo)
    assert bindings(repo.git[oid].message) == []
    return str(oid)


def test_stable_naming_the_signed_debug_head_is_refused_before_anything_else_is_fetched(
        tmp_path, served, nginx, builder_key) -> None:  # noqa: F811
    src, url = served
    repo = client(tmp_path / "client", url, key=builder_key)
    before_ref = pull(repo, "origin", STABLE).commit
    before = snapshot(repo)
    serve_branch_as(src, STABLE, head(src, DEBUG))
    nginx.clear_log()
    with pytest.raises(BindingError, match=f"was made for {DEBUG}, not {STABLE}: refusing it"):
        pull(repo, "origin", STABLE)
    assert str(repo.git.references[REF].target) == before_ref
    assert_only_verified_additions(repo, before)
    debug = head(src, DEBUG)
    assert [r.uri for r in nginx.requests()] == [f"/{src.name}/git/info/refs",
                                                 f"/{src.name}/git/objects/{debug[:2]}/{debug[2:]}"]


def test_cli_pull_of_a_head_bound_elsewhere_fails_in_one_line(tmp_path, served, builder_key) -> None:  # noqa: F811
    src, url = served
    client(tmp_path / "client", url, key=builder_key)
    serve_branch_as(src, STABLE, head(src, DEBUG))
    result = CliRunner().invoke(main, ["pull", "--repo", str(tmp_path / "client"), "origin", STABLE])
    assert result.exit_code == 4
    assert result.output == (f"cfsdeploy: commit {head(src, DEBUG)[:12]} from remote origin was made for "
                             f"{DEBUG}, not {STABLE}: refusing it (the server names another branch's commit)\n")


def test_a_commit_bound_to_several_branches_is_accepted_for_each(tmp_path, served, builder_key) -> None:  # noqa: F811
    src, url = served
    server = Repository(src)
    both = server.commit(tmp_path / "stable", STABLE, "for both", bind=["os/testing"],
                         sign_key=builder_key.email, gpg_homedir=builder_key.home).commit
    server.git.references.create("refs/heads/os/testing", both)  # the publisher promotes it
    dumbhttp.update_server_info(server)
    repo = client(tmp_path / "client", url, key=builder_key)
    assert pull(repo, "origin", STABLE).commit == both
    assert pull(repo, "origin", "os/testing").commit == both


def test_an_unbound_head_is_refused_when_the_remote_requires_binding(tmp_path, served, builder_key) -> None:  # noqa: F811
    src, url = served
    legacy = unbound_head(src, STABLE, builder_key)
    repo = client(tmp_path / "client", url, key=builder_key)
    with pytest.raises(BindingError, match=f"commit {legacy[:12]} from remote origin names no branch "
                                           r"\(Cfsdeploy-Branch\), and the remote requires one"):
        pull(repo, "origin", STABLE)
    assert REF not in repo.git.references


def test_an_unbound_head_is_accepted_from_a_remote_that_does_not_require_binding(
        tmp_path, served, builder_key) -> None:  # noqa: F811
    src, url = served
    legacy = unbound_head(src, STABLE, builder_key)
    repo = client(tmp_path / "client", url, key=builder_key, require_binding=False)
    assert pull(repo, "origin", STABLE).commit == legacy


def test_a_head_bound_elsewhere_is_refused_even_when_the_remote_does_not_require_binding(
        tmp_path, served, builder_key) -> None:  # noqa: F811
    src, url = served
    serve_branch_as(src, STABLE, head(src, DEBUG))
    repo = client(tmp_path / "client", url, key=builder_key, require_binding=False)
    with pytest.raises(BindingError, match=f"made for {DEBUG}, not {STABLE}"):
        pull(repo, "origin", STABLE)


def test_the_history_below_the_head_may_hold_commits_made_for_other_branches(
        tmp_path, served, builder_key) -> None:  # noqa: F811
    src, url = served
    # os/feature forks from os/stable: its first parent was made for os/stable.
    server = Repository(src)
    server.commit(tmp_path / "debug", "os/feature", "fork", parent=STABLE,
                  sign_key=builder_key.email, gpg_homedir=builder_key.home)
    dumbhttp.update_server_info(server)
    repo = client(tmp_path / "client", url, key=builder_key)
    pull(repo, "origin", "os/feature")
    assert [c.branches for c in history(repo, "origin/os/feature")] == [["os/feature"], [STABLE]]
