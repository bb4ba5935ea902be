"""kill -9 a commit at many points: the branch is old or new, never broken, and fsck is clean."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cfsdeploy.repo.fsck import fsck
from cfsdeploy.repo.repository import Repository

KILL_POINTS = 24


# One reader, and forked workers (which must die with the commit: they hold the lock's fd).
@pytest.mark.parametrize("threads", [1, 2])
def test_commit_killed_at_any_point_leaves_a_clean_repository(tmp_path, threads: int) -> None:
    tree = tmp_path / "tree"
    for d in range(20):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(15):
            (tree / f"d{d}" / f"f{f}").write_bytes(os.urandom(2000 + 97 * f))
    repo = Repository.init(tmp_path / "repo")
    first = repo.commit(tree, "b", "base").commit
    (tree / "d0" / "new").write_bytes(os.urandom(50_000))
    cmd = [sys.executable, "-m", "cfsdeploy.cli", "commit", "--repo", repo.path, "--tree", str(tree),
           "-b", "b", "-m", "next", "--threads", str(threads), "--wait-lock", "10"]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    duration = time.monotonic() - t0
    repo.git.references.create("refs/heads/b", repo.resolve(first).id, force=True)

    outcomes = set()
    for i in range(KILL_POINTS):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(duration * i / KILL_POINTS)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        head = str(Repository(repo.path).resolve("b").id)
        # Either untouched or a whole new commit, and everything it needs is there;
        # every object under a valid name is whole (fsck checks all their digests).
        outcomes.add("old" if head == first else "new")
        report = fsck(Repository(repo.path))
        assert report.ok, (i, report.problems)
        if head != first:
            repo.git.references.create("refs/heads/b", repo.resolve(first).id, force=True)
    assert "old" in outcomes
    # A rerun after all that succeeds and cleans what the killed runs left in tmp/.
    subprocess.run(cmd, check=True, capture_output=True)
    assert os.listdir(os.path.join(repo.path, "tmp")) == []
