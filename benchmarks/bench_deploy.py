"""Deploy time: `cfsdeploy deploy` against `ostree admin deploy`, on the same OS tree, in one run.

    python benchmarks/bench_deploy.py [--extra 83000] [--runs 3]

The tree is the cached Debian rootfs of benchmarks/rootfs.py (built if missing), with
its kernel and initramfs placed in /usr/lib/modules/<kver>/ as both tools expect.
OSTree 2022.7 (Debian 12) wants the defaults of /etc in /usr/etc, so its copy of the
tree has them there.  Each tool gets a sysroot with the tree committed, then deploys
it `--runs` times (a deploy of an already-deployed commit, as an upgrade to a new
commit would be: neither tool shares work between deployments beyond objects and
kernels).  With --extra N, a second round adds N empty files to show how deploy time
grows with the tree.  Times are wall seconds, best of the runs; caches are warm for
both tools.  Needs root.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rootfs import cache_dir, ensure_rootfs  # noqa: E402

CFS = [sys.executable, "-m", "cfsdeploy.cli"]


def sh(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed(*args: str | Path) -> float:
    t0 = time.perf_counter()
    sh(*args)
    return time.perf_counter() - t0


def prepare_tree(rootfs: Path, dest: Path, extra: int, *, usr_etc: bool) -> int:
    """A hardlinked copy of the rootfs, kernel in place; returns its entry count."""
    sh("cp", "-al", rootfs, dest)
    kernel = sorted(glob.glob(str(dest / "boot/vmlinuz-*")))[-1]
    kver = os.path.basename(kernel)[len("vmlinuz-"):]
    modules = dest / "usr/lib/modules" / kver
    modules.mkdir(parents=True, exist_ok=True)
    os.link(kernel, modules / "vmlinuz")
    os.link(dest / f"boot/initrd.img-{kver}", modules / "initramfs.img")
    (dest / "sysroot").mkdir(exist_ok=True)
    for d in range(extra // 1000):
        sub = dest / "usr/share/bench-extra" / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(1000):
            (sub / f"f{f}").touch()
    if usr_etc:
        os.rename(dest / "etc", dest / "usr/etc")
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(dest))


def bench_cfsdeploy(tree: Path, work: Path, runs: int) -> list[float]:
    root = work / "cfs-sysroot"
    sh(*CFS, "sysroot", "init", "--sysroot", root, "--os", "debian", "--karg", "root=/dev/vda2")
    sh(*CFS, "commit", "--repo", root / "cfsdeploy/repo", "--tree", tree, "-b", "debian/stable", "-m", "bench")
    return [timed(*CFS, "deploy", "--sysroot", root, "--os", "debian", "debian/stable") for _ in range(runs)]


def bench_ostree(tree: Path, work: Path, runs: int) -> list[float]:
    root = work / "ostree-sysroot"
    root.mkdir()
    sh("ostree", "admin", "init-fs", root)
    sh("ostree", "admin", "os-init", "debian", f"--sysroot={root}")
    sh("ostree", f"--repo={root}/ostree/repo", "commit", "-b", "debian/stable", f"--tree=dir={tree}",
       "--no-xattrs", "-s", "bench")
    return [timed("ostree", "admin", "deploy", f"--sysroot={root}", "--os=debian",
                  "--karg=root=/dev/vda2", "debian/stable") for _ in range(runs)]


def remove(work: Path) -> None:
    # OSTree marks deployment roots immutable.
    subprocess.run(["chattr", "-R", "-f", "-i", str(work)], stderr=subprocess.DEVNULL)
    shutil.rmtree(work, ignore_errors=True)


def round_(rootfs: Path, extra: int, runs: int) -> tuple[int, float, float]:
    work = Path(cache_dir()) / "deploy-work"
    remove(work)
    work.mkdir(parents=True)
    try:
        entries = prepare_tree(rootfs, work / "tree", extra, usr_etc=False)
        prepare_tree(rootfs, work / "tree-ostree", extra, usr_etc=True)
        ours = min(bench_cfsdeploy(work / "tree", work, runs))
        theirs = min(bench_ostree(work / "tree-ostree", work, runs))
    finally:
        remove(work)
    return entries, ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra", type=int, default=83_000, help="empty files added in the second round")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rootfs = Path(ensure_rootfs())
    print(f"{'entries':>8} {'cfsdeploy deploy':>17} {'ostree admin deploy':>20} {'ratio':>6}")
    for extra in (0, args.extra):
        entries, ours, theirs = round_(rootfs, extra, args.runs)
        print(f"{entries:>8} {ours:>16.2f}s {theirs:>19.2f}s {ours / theirs:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
