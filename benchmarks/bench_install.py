"""Install time: `cfsdeploy install to-disk` of the Debian 13 tree, phase by phase, against OSTree's
`admin init-fs` + `os-init` + `pull-local` + `admin deploy` into a loop-mounted ext4, in one run.

    python benchmarks/bench_install.py [--runs 1] [--untrusted] [--ostree-mode bare-user|archive] [--work DIR]

The tree is tests/vm.py's make_tree(): the cached Debian 13 debootstrap with cfsdeploy, its
initramfs hook and a fresh initramfs, the kernel and initramfs at /usr/lib/modules/<kver>/,
/sysroot, and /boot empty (what `install to-disk` needs: it lints the commit first), with /dev
emptied for both tools (`ostree commit` refuses device nodes; a booted system mounts devtmpfs
there).  OSTree gets a copy of it shaped as rpm-ostree and bootc images are:

  - /etc moved to /usr/etc (OSTree 2022.7 takes the defaults of /etc from there, and makes each
    deployment's /etc by merging them);
  - the kernel and initramfs at /usr/lib/modules/<kver>/vmlinuz and initramfs.img (make_tree put
    them there), /boot empty (OSTree writes its own);
  - /home, /root, /opt, /srv, /mnt, /media and /usr/local symlinks into /var (var/home,
    var/roothome, var/opt, var/srv, var/mnt, run/media, ../var/usrlocal), their content moved there,
    and /ostree -> sysroot/ostree;
  - the rest as it is, /var included: both tools commit and pull it (OSTree 2022.7's deploy does not
    copy it into the stateroot's /var, cfsdeploy's first deploy seeds it).

Each run, cfsdeploy first, then OSTree:

  - commit (timed, not part of the install): `cfsdeploy commit` into a new repository;
    `ostree commit` into a new one (`--mode bare-user`, else `--ostree-mode`).
  - the install onto a new 4 GiB sparse image file, `sync` before it:
    cfsdeploy: `cfsdeploy install to-disk IMG --size 4G --repo REPO BRANCH --no-gpg-verify --os debian
    --json`, its phases as it reports them (check, partition, mkfs, pull, deploy, esp, sync), and
    "process" the rest of the command's wall time (interpreter start, imports);
    OSTree: partition (the image made, sfdisk with install's layout: 512 MiB ESP, the rest root),
    mkfs (losetup over the root partition, mkfs.ext4 with install's flags `-O verity -b 4096`,
    mount), pull (`admin init-fs`, `admin os-init`, `remote add` of the update remote as install
    adds one, `pull-local --remote`), deploy (`admin deploy`, then unmount and detach, as
    cfsdeploy's deploy phase ends with the root unmounted), sync.  OSTree has no ESP step (an
    installer's job: bootupd, `bootc install`); the ESP is left empty.

The ratios are cfsdeploy / OSTree (none where OSTree's figure is under 0.05 s: noise);
"comparable" sums the phases both have (partition, mkfs, pull, deploy, sync).  With --runs N the
figures are medians.  Caches are warm for both: the commits read the tree just read once, the
pulls the repository just written.  cfsdeploy's pull checks every object's fs-verity digest;
OSTree's pull-local checks none unless --untrusted.  Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cfsdeploy.composefs.digestcache import SETTLE_NS  # noqa: E402
from cfsdeploy.sysroot.install import DEFAULT_ESP_SIZE, ESP_TYPE, MIB, host_arch  # noqa: E402
from tests import vm  # noqa: E402

CFS = [sys.executable, "-m", "cfsdeploy.cli"]
OS = "debian"
BRANCH = "debian/13/x86_64/bench"
SIZE = 4 << 30
# the host's tools the run needs (vm.py's tree: debootstrap), with their Debian packages
TOOLS = {"ostree": "ostree", "sfdisk": "fdisk", "losetup": "mount", "mkfs.ext4": "e2fsprogs",
         "mkfs.vfat": "dosfstools", "mcopy": "mtools", "debootstrap": "debootstrap"}
# rpm-ostree's and bootc's places for what is machine state, relative to /
TO_VAR = {"home": "var/home", "root": "var/roothome", "opt": "var/opt", "srv": "var/srv", "mnt": "var/mnt",
          "media": "run/media", "usr/local": "var/usrlocal"}
PHASES = ("check", "partition", "mkfs", "pull", "deploy", "esp", "sync", "process")
# below this (seconds), no ratio: the two figures are noise
NOISE = 0.05
# OSTree's commands within its phases
STEPS = {"pull": ("init-fs + os-init + remote add", "pull-local"), "deploy": ("admin deploy", "umount + detach")}
COMPARABLE = ("partition", "mkfs", "pull", "deploy", "sync")


def sh(*args: str | Path, stdin: str | None = None) -> str:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, input=stdin)
    if p.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))}: exit {p.returncode}\n{p.stderr.strip()}")
    return p.stdout


def timed(*args: str | Path) -> float:
    t0 = time.perf_counter()
    sh(*args)
    return time.perf_counter() - t0


def ostree_shape(tree: Path, dest: Path) -> None:
    """A copy of tree laid out as rpm-ostree and bootc images are (see the module's text)."""
    sh("cp", "-a", tree, dest)
    os.rename(dest / "etc", dest / "usr/etc")
    for rel, target in TO_VAR.items():
        src, moved = dest / rel, dest / target
        if src.is_symlink() or not src.is_dir():
            continue
        moved.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, moved)
        # relative to the link's directory, as the images have them
        src.symlink_to(os.path.relpath(moved, src.parent))
    (dest / "ostree").symlink_to("sysroot/ostree")


def commit_both(tree: Path, ostree_tree: Path, work: Path, mode: str) -> tuple[Path, Path, float, float]:
    cfs_repo, ostree_repo = work / "cfs-repo", work / "ostree-repo"
    sh(*CFS, "init", "--repo", cfs_repo)
    sh("ostree", f"--repo={ostree_repo}", "init", f"--mode={mode}")
    times = []
    for argv, source in (([*CFS, "commit", "--repo", cfs_repo, "--tree", tree, "-b", BRANCH, "-m", "bench"], tree),
                         (["ostree", f"--repo={ostree_repo}", "commit", "-b", BRANCH, f"--tree=dir={ostree_tree}",
                           "-s", "bench"], ostree_tree)):
        # the tree read once (warm cache for both), and nothing else's writes pending
        sh("tar", "-cf", "/dev/null", "-C", source, ".")
        sh("sync")
        times.append(timed(*argv))
    return cfs_repo, ostree_repo, times[0], times[1]


def install_cfsdeploy(repo: Path, image: Path) -> dict[str, float]:
    sh("sync")
    t0 = time.perf_counter()
    out = sh(*CFS, "install", "to-disk", image, "--size", str(SIZE // MIB), "--repo", repo, BRANCH,
             "--no-gpg-verify", "--os", OS, "--json")
    wall = time.perf_counter() - t0
    phases = {p["name"]: p["seconds"] for p in json.loads(out)["phases"]}
    phases["process"] = wall - sum(phases.values())
    return phases


def install_ostree(repo: Path, image: Path, mnt: Path, untrusted: bool) -> dict[str, float]:
    """The OSTree install's phases, and the STEPS they are made of."""
    arch = host_arch()
    root_start = MIB + DEFAULT_ESP_SIZE
    root_size = (SIZE - MIB - root_start) // MIB * MIB
    t: dict[str, float] = {}
    sh("sync")
    t0 = time.perf_counter()
    with open(image, "xb") as f:
        f.truncate(SIZE)
    sh("sfdisk", "--quiet", "--wipe", "always", image, stdin=(
        "label: gpt\n"
        f"start=1MiB, size={DEFAULT_ESP_SIZE // MIB}MiB, type={ESP_TYPE}, name=esp\n"
        f"start={root_start // MIB}MiB, size={root_size // MIB}MiB, type={arch.root_type}, name=root\n"))
    t["partition"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dev = sh("losetup", "--find", "--show", "--offset", str(root_start), "--sizelimit", str(root_size),
             image).strip()
    mounted = False
    try:
        sh("mkfs.ext4", "-q", "-O", "verity", "-b", "4096", "-L", "root", dev)
        mnt.mkdir()
        sh("mount", "-t", "ext4", dev, mnt)
        mounted = True
        t["mkfs"] = time.perf_counter() - t0
        sysroot_repo = f"--repo={mnt}/ostree/repo"
        t["init-fs + os-init + remote add"] = (
            timed("ostree", "admin", "init-fs", mnt)
            + timed("ostree", "admin", "os-init", OS, f"--sysroot={mnt}")
            + timed("ostree", sysroot_repo, "remote", "add", "--no-gpg-verify", "origin", f"file://{repo}"))
        t["pull-local"] = timed("ostree", sysroot_repo, "pull-local", "--remote=origin",
                                *(["--untrusted"] if untrusted else []), repo, BRANCH)
        t["admin deploy"] = timed("ostree", "admin", "deploy", f"--sysroot={mnt}", f"--os={OS}",
                                  "--karg=root=LABEL=root", "--karg=rw", f"origin:{BRANCH}")
        t0 = time.perf_counter()
        sh("umount", mnt)
        mounted = False
        sh("losetup", "--detach", dev)
        dev = ""
        t["umount + detach"] = time.perf_counter() - t0
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        if dev:
            subprocess.run(["losetup", "--detach", dev], check=False)
    t["sync"] = timed("sync")
    for phase, steps in STEPS.items():
        t[phase] = sum(t[step] for step in steps)
    return t


def one_run(tree: Path, ostree_tree: Path, work: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    run_dir = Path(tempfile.mkdtemp(prefix="run.", dir=work))
    try:
        cfs_repo, ostree_repo, cfs_commit, ostree_commit = commit_both(tree, ostree_tree, run_dir, args.ostree_mode)
        ours = install_cfsdeploy(cfs_repo, run_dir / "cfsdeploy.img")
        os.unlink(run_dir / "cfsdeploy.img")
        theirs = install_ostree(ostree_repo, run_dir / "ostree.img", run_dir / "mnt", args.untrusted)
        return {"cfsdeploy": {"commit": cfs_commit, **ours}, "ostree": {"commit": ostree_commit, **theirs}}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def report(runs: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    def med(tool: str, key: str) -> float | None:
        values = [r[tool][key] for r in runs if key in r[tool]]
        return statistics.median(values) if values else None

    def row(name: str, a: float | None, b: float | None) -> None:
        ours = f"{a:9.2f} s" if a is not None else f"{'-':>11}"
        theirs = f"{b:9.2f} s" if b is not None else f"{'-':>11}"
        ratio = f"{a / b:6.2f}" if a is not None and b is not None and b >= NOISE else ""
        print(f"{name:50} {ours} {theirs} {ratio}")

    print(f"\n{'(median of ' + str(len(runs)) + ')':50} {'cfsdeploy':>11} {'ostree':>11} {'ratio':>6}")
    row(f"commit (ostree {args.ostree_mode}), apart", med("cfsdeploy", "commit"), med("ostree", "commit"))
    print("install:")
    for phase in PHASES:
        row(f"  {phase}", med("cfsdeploy", phase), med("ostree", phase))
        for step in STEPS.get(phase, ()):
            row(f"    ostree {step}", None, med("ostree", step))
    total = {tool: statistics.median(sum(r[tool][p] for p in PHASES if p in r[tool]) for r in runs)
             for tool in ("cfsdeploy", "ostree")}
    comparable = {tool: statistics.median(sum(r[tool][p] for p in COMPARABLE) for r in runs)
                  for tool in ("cfsdeploy", "ostree")}
    row("  total", total["cfsdeploy"], total["ostree"])
    row("  comparable (" + ", ".join(COMPARABLE) + ")", comparable["cfsdeploy"], comparable["ostree"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--ostree-mode", choices=["bare-user", "archive"], default="bare-user",
                    help="the mode of the repository OSTree commits into and pulls from")
    ap.add_argument("--untrusted", action="store_true",
                    help="pull-local --untrusted: OSTree checks every object, as cfsdeploy's pull does")
    ap.add_argument("--work", type=Path,
                    help="an empty working directory, kept (default: a new one under /var/tmp, removed)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (loop devices, mounts, chroot)")
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian package {package})")
    work = args.work or Path(tempfile.mkdtemp(prefix="cfsdeploy-bench-install.", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    if args.work and any(work.iterdir()):
        sys.exit(f"{work}: not empty")
    try:
        tree, ostree_tree = work / "tree", work / "tree-ostree"
        built = vm.make_tree(tree, log=lambda m: print(m, file=sys.stderr))
        for node in (tree / "dev").iterdir():
            if node.is_dir() and not node.is_symlink():
                shutil.rmtree(node)
            else:
                node.unlink()
        ostree_shape(tree, ostree_tree)
        # older than the digest cache's settling time, as any tree built before its commit
        time.sleep(SETTLE_NS / 1e9)
        entries = sum(len(dirs) + len(files) for _, dirs, files in os.walk(tree))
        size = int(sh("du", "-sb", tree).split()[0])
        version = sh("ostree", "--version").split()[2].strip("'")
        print(f"Debian 13 tree: kernel {built.kver}, {entries} entries, {size / 1e6:.0f} MB; "
              f"ostree {version}; {os.cpu_count()} CPUs; "
              f"load {os.getloadavg()[0]:.1f}; pull-local {'--untrusted' if args.untrusted else 'trusted'}",
              flush=True)
        runs = []
        for i in range(args.runs):
            runs.append(one_run(tree, ostree_tree, work, args))
            print(f"  run {i + 1}: cfsdeploy {sum(runs[-1]['cfsdeploy'][p] for p in PHASES):.1f} s, "
                  f"ostree {sum(v for p, v in runs[-1]['ostree'].items() if p in PHASES):.1f} s", flush=True)
        report(runs, args)
        print(f"load average now {os.getloadavg()[0]:.1f}")
    finally:
        if not args.work:
            vm.remove_tree(work)


if __name__ == "__main__":
    main()
