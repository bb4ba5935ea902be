"""Commit speed: `cfsdeploy commit` against `ostree commit` (bare mode) on a real OS tree.

    python benchmarks/bench_commit.py [--tree DIR] [--runs 3] [--drop-caches]
                                      [--threads N] [--profile]

The tree is the cached debootstrap of benchmarks/rootfs.py unless --tree is given;
both tools commit a private copy of it (cp -a), so that nobody else touching the
shared cache (a hardlink changes every file's ctime) disturbs a run, and the copy
is left to settle for the digest cache's 2 s (as any tree built more than 2 s
before its commit).  Each run makes two empty repositories and times, as
subprocesses, interleaved:
(a) the first commit of the tree into each, (b) a second commit of the unchanged
tree.  Both tools get the same conditions: `sync` before every timed command and,
with --drop-caches, an emptied page cache (else the tree is read once beforehand,
so every command starts with it cached).  Both make their objects durable
(cfsdeploy: one syncfs per commit; ostree: its default fsync policy).  The best
and median of the runs, wall and CPU time (the latter less disturbed by other
load on the machine), are printed with the ratios, against the goals: first
commit no slower than OSTree, re-commit at least 5x faster than our first.

--profile then runs both commits once more in this process under cProfile and
prints where the time goes (worker processes are not profiled: their share is
the wait in _read_files).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rootfs import cache_dir, ensure_rootfs  # noqa: E402

from cfsdeploy.composefs.digestcache import SETTLE_NS  # noqa: E402
from cfsdeploy.repo.repository import Repository  # noqa: E402


def prepare(drop_caches: bool, tree: str) -> None:
    subprocess.run(["sync"], check=True)
    if drop_caches:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    else:
        subprocess.run(["tar", "-cf", "/dev/null", "-C", tree, "."], check=True)


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds, and CPU seconds (user + system, worker processes included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def ours(repo: str, tree: str, subject: str, threads: int | None) -> list[str]:
    argv = [sys.executable, "-m", "cfsdeploy.cli", "commit", "--repo", repo, "--tree", tree,
            "-b", "bench", "-m", subject]
    return argv + (["--threads", str(threads)] if threads else [])


def ostree(repo: str, tree: str, subject: str) -> list[str]:
    return ["ostree", "commit", f"--repo={repo}", "--branch=bench", f"--tree=dir={tree}", "-s", subject]


def one_run(work: str, tree: str, drop_caches: bool, threads: int | None) -> dict[str, tuple[float, float]]:
    mine, theirs = os.path.join(work, "cfsdeploy"), os.path.join(work, "ostree")
    for path in (mine, theirs):
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "cfsdeploy.cli", "init", "--repo", mine], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["ostree", "init", "--mode=bare", f"--repo={theirs}"], check=True)
    times = {}
    for step, subject in (("first", "one"), ("second", "two")):
        prepare(drop_caches, tree)
        times[f"ours {step}"] = timed(ours(mine, tree, subject, threads))
        prepare(drop_caches, tree)
        times[f"ostree {step}"] = timed(ostree(theirs, tree, subject))
    return times


def profile(work: str, tree: str, threads: int | None) -> None:
    path = os.path.join(work, "profiled")
    shutil.rmtree(path, ignore_errors=True)
    repo = Repository.init(path)
    for subject in ("first", "second"):
        prepare(False, tree)
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        with repo.lock():
            repo.commit(tree, "bench", subject, threads=threads)
        prof.disable()
        print(f"\n--- profile of the {subject} commit: {time.perf_counter() - start:.2f} s ---")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", help="tree to commit (default: the cached debootstrap)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--drop-caches", action="store_true", help="empty the page cache before each command")
    parser.add_argument("--threads", type=int, help="cfsdeploy commit --threads (default: its own)")
    parser.add_argument("--profile", action="store_true", help="then profile our two commits")
    args = parser.parse_args()
    source = args.tree or ensure_rootfs()
    os.makedirs(cache_dir(), exist_ok=True)
    work = tempfile.mkdtemp(prefix="commit-", dir=cache_dir())
    try:
        tree = os.path.join(work, "tree")
        subprocess.run(["cp", "-a", source, tree], check=True)
        time.sleep(SETTLE_NS / 1e9)
        measure(tree, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(tree: str, args: argparse.Namespace) -> None:
    work = os.path.dirname(tree)
    entries = sum(len(dirs) + len(files) for _, dirs, files in os.walk(tree))
    size = int(subprocess.run(["du", "-sb", tree], capture_output=True, text=True, check=True).stdout.split()[0])
    print(f"tree {tree}: {entries} entries, {size / 1e6:.0f} MB; "
          f"{'cold' if args.drop_caches else 'warm'} page cache; {os.cpu_count()} CPUs; "
          f"load {os.getloadavg()[0]:.1f}")
    runs = [one_run(work, tree, args.drop_caches, args.threads) for _ in range(args.runs)]
    for kind, index in (("wall", 0), ("CPU (user+sys)", 1)):
        print(f"\n{kind:14} {'cfsdeploy':>14} {'ostree':>20} {'ratio':>14}")
        print(f"{'':8} {'best':>9} {'median':>10} {'best':>9} {'median':>10} {'best':>6} {'median':>7}")
        for step in ("first", "second"):
            a = [r[f"ours {step}"][index] for r in runs]
            b = [r[f"ostree {step}"][index] for r in runs]
            print(f"{step:8} {min(a):8.2f}s {statistics.median(a):9.2f}s {min(b):8.2f}s "
                  f"{statistics.median(b):9.2f}s {min(a) / min(b):6.2f} "
                  f"{statistics.median(a) / statistics.median(b):7.2f}")
    first = statistics.median(r["ours first"][0] for r in runs)
    second = statistics.median(r["ours second"][0] for r in runs)
    ostree_first = statistics.median(r["ostree first"][0] for r in runs)
    print(f"\ngoal: first commit / ostree first commit <= 1.0 (median wall): {first / ostree_first:.2f} "
          f"({'met' if first <= ostree_first else 'NOT met'})")
    print(f"goal: our first / our second commit >= 5 (median wall): {first / second:.1f} "
          f"({'met' if first >= 5 * second else 'NOT met'})")
    print(f"load average now {os.getloadavg()[0]:.1f}")
    if args.profile:
        profile(work, tree, args.threads)


if __name__ == "__main__":
    main()
