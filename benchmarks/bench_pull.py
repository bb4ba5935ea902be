"""Bytes on the wire for a full pull and an upgrade pull: cfsdeploy against `ostree pull`.

    python benchmarks/bench_pull.py [--tree DIR | --synthetic FILES] [--changed 0.01]
                                    [--compression gzip-1,gzip-6,static,off] [--work DIR]

The same trees are committed to a cfsdeploy repository and to an archive-mode OSTree
repository, both served by one real nginx (tests/nginx.py) under each compression
setting; fresh clients pull the first tree (full pull), then the second, which
changes a fraction of the regular files (upgrade pull).  Bytes are nginx's own count
of what it sent (headers included).  The tree is --tree, else the shared Debian
rootfs if it exists, else a synthetic tree.  "static" serves gzip -9 copies made
beside the objects (gzip_static); the others compress on the fly.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cfsdeploy.remote import remotes  # noqa: E402
from cfsdeploy.remote.pull import PullOptions, pull  # noqa: E402
from cfsdeploy.repo import dumbhttp  # noqa: E402
from cfsdeploy.repo.repository import Repository  # noqa: E402
from tests.nginx import Nginx  # noqa: E402

SHARED_ROOTFS = Path("/var/tmp/cfsdeploy-bench/rootfs-bookworm")
V1, V2 = "bench/v1", "bench/v2"


@dataclass
class Row:
    tool: str
    compression: str
    pull: str
    requests: int
    wire_bytes: int        # nginx $bytes_sent: headers and bodies
    body_bytes: int
    metadata_bytes: int    # bodies of everything but file contents (refs, commits, manifests or dirtrees)
    seconds: float


def synthetic_tree(top: Path, files: int, seed: int = 1) -> None:
    """Text-like and binary-like files in nested directories, shaped a bit like /usr."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz_", k=rng.randrange(2, 12))) for _ in range(3000)]
    for i in range(files):
        d = top / f"usr/lib/d{i % 97}/s{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        size = int(rng.lognormvariate(8.5, 1.6))
        if rng.random() < 0.6:
            data = b" ".join(rng.choices(words, k=size // 6 + 1))[:size]
        else:
            data = rng.randbytes(size)
        (d / f"f{i}").write_bytes(data)


def changed_copy(src: Path, dest: Path, fraction: float, seed: int = 2) -> tuple[int, int]:
    """A copy of src with `fraction` of its regular files changed a little (as a new
    package version would be: same kind of content); returns (files, bytes) changed."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dest)], check=True)
    regular = sorted(p for p in dest.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size > 64)
    rng = random.Random(seed)
    chosen = rng.sample(regular, max(1, int(len(regular) * fraction)))
    total = 0
    for p in chosen:
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        data += b"\n# upgraded\n"
        p.write_bytes(bytes(data))
        total += len(data)
    return len(chosen), total


def _gzip_one(path: str) -> int:
    with open(path, "rb") as f:
        data = f.read()
    packed = gzip.compress(data, 9, mtime=0)
    if len(packed) > 0.9 * len(data):
        return 0
    with open(path + ".gz", "wb") as f:
        f.write(packed)
    return 1


def precompress(repo: Path) -> int:
    """gzip -9 copies beside the objects worth compressing, for nginx's gzip_static."""
    paths = [str(p) for p in (repo / "objects").glob("??/*") if not p.name.endswith(".gz")]
    with Pool() as pool:
        return sum(pool.map(_gzip_one, paths, chunksize=64))


def ostree(*args: str) -> str:
    return subprocess.run(["ostree", *args], check=True, capture_output=True, text=True).stdout.strip()


def timed_requests(server: Nginx, action) -> tuple[float, list]:
    server.clear_log()
    t0 = time.perf_counter()
    action()
    seconds = time.perf_counter() - t0
    return seconds, server.requests()


def is_content(uri: str) -> bool:
    """A file's content: a cfsdeploy object or an ostree .filez object."""
    return uri.endswith(".filez") or (uri.startswith("/cfs/objects/") and not uri.startswith("/cfs/git/"))


def row(tool: str, compression: str, pull: str, reqs: list, secs: float) -> Row:
    return Row(tool, compression, pull, len(reqs), sum(r.bytes_sent for r in reqs), sum(r.body_bytes for r in reqs),
               sum(r.body_bytes for r in reqs if not is_content(r.uri)), round(secs, 2))


def measure(server: Nginx, work: Path, compression: str, jobs: int) -> list[Row]:
    rows = []
    client = work / f"cfs-client-{compression}"
    shutil.rmtree(client, ignore_errors=True)
    repo = Repository.init(client)
    remotes.add(repo, "origin", server.url("cfs"), gpg_verify=False)
    options = PullOptions(jobs=jobs)
    for name, branch in (("full", V1), ("upgrade", V2)):
        secs, reqs = timed_requests(server, lambda b=branch: pull(repo, "origin", b, options=options))
        rows.append(row("cfsdeploy", compression, name, reqs, secs))
    oclient = work / f"ostree-client-{compression}"
    shutil.rmtree(oclient, ignore_errors=True)
    ostree("init", f"--repo={oclient}", "--mode=bare")
    ostree("remote", "add", f"--repo={oclient}", "--no-gpg-verify", "origin", server.url("ostree"))
    for name, branch in (("full", V1), ("upgrade", V2)):
        secs, reqs = timed_requests(server, lambda b=branch: ostree("pull", f"--repo={oclient}", "origin", b))
        rows.append(row("ostree", compression, name, reqs, secs))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, help="The first tree (default: the shared rootfs, else synthetic).")
    ap.add_argument("--synthetic", type=int, metavar="FILES", help="Use a synthetic tree of this many files.")
    ap.add_argument("--changed", type=float, default=0.01, help="Fraction of regular files the upgrade changes.")
    ap.add_argument("--compression", default="gzip-1,gzip-6,static,off")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--work", type=Path, help="Work directory (default: a temporary one, removed).")
    ap.add_argument("--json", action="store_true", help="Print the rows as JSON too.")
    args = ap.parse_args()
    if shutil.which("ostree") is None or shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        sys.exit("needs ostree and nginx (Debian packages ostree, nginx-light)")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-pull-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tree1 = args.tree or (SHARED_ROOTFS if SHARED_ROOTFS.is_dir() and not args.synthetic else None)
        if tree1 is None:
            tree1 = work / "tree1"
            synthetic_tree(tree1, args.synthetic or 4000)
        tree2 = work / "tree2"
        files_changed, bytes_changed = changed_copy(tree1, tree2, args.changed)
        print(f"tree {tree1}; upgrade changes {files_changed} files, {bytes_changed / 1e6:.1f} MB", flush=True)

        www = work / "www"
        www.mkdir()
        cfs = Repository.init(www / "cfs")
        with cfs.lock():
            t0 = time.perf_counter()
            first = cfs.commit(tree1, V1, "first").commit
            t_cfs = time.perf_counter() - t0
            cfs.commit(tree2, V2, "upgrade", parent=first)
            dumbhttp.update_server_info(cfs)
        ostree("init", f"--repo={www / 'ostree'}", "--mode=archive")
        t0 = time.perf_counter()
        rev = ostree("commit", f"--repo={www / 'ostree'}", f"--branch={V1}", f"--tree=dir={tree1}")
        t_ostree = time.perf_counter() - t0
        ostree("commit", f"--repo={www / 'ostree'}", f"--branch={V2}", f"--parent={rev}", f"--tree=dir={tree2}")
        ostree("summary", "-u", f"--repo={www / 'ostree'}")
        print(f"commit of the first tree: cfsdeploy {t_cfs:.1f} s, ostree (archive) {t_ostree:.1f} s", flush=True)

        rows: list[Row] = []
        for setting in args.compression.split(","):
            kind, _, level = setting.partition("-")
            if kind == "static":
                print(f"precompressed {precompress(www / 'cfs')} objects for gzip_static", flush=True)
            server = Nginx(www, work / f"nginx-{setting}", compression=kind, level=int(level or 6))
            try:
                rows += measure(server, work, setting, args.jobs)
            finally:
                server.stop()

        print(f"\n{'tool':10} {'compression':11} {'pull':8} {'requests':>8} {'wire MB':>9} {'body MB':>9} "
              f"{'meta MB':>9} {'s':>7}")
        for r in rows:
            print(f"{r.tool:10} {r.compression:11} {r.pull:8} {r.requests:8d} {r.wire_bytes / 1e6:9.2f} "
                  f"{r.body_bytes / 1e6:9.2f} {r.metadata_bytes / 1e6:9.2f} {r.seconds:7.2f}")
        print(f"\nchanged files: {bytes_changed / 1e6:.2f} MB")
        if args.json:
            print(json.dumps({"files_changed": files_changed, "bytes_changed": bytes_changed,
                              "rows": [asdict(r) for r in rows]}, indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
