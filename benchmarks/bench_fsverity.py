"""fs-verity digest speed: cfsdeploy against Debian's `fsverity digest`.

    python benchmarks/bench_fsverity.py [--size-mib 1024] [--sparse-gib 8] [--dir DIR]

Times, best of 3, on a file of random content and on a sparse file with a few data
extents: `fsverity digest FILE` (a subprocess, as a user would run it), and
cfsdeploy's digest_file with its default worker count and with threads=1.  Every
digest must agree with the tool's.  Both files are read from the page cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from cfsdeploy.composefs import fsverity

RUNS = 3


def best_of(fn: Callable[[], str]) -> tuple[float, str]:
    times, result = [], ""
    for _ in range(RUNS):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def write_random(path: str, size: int) -> None:
    with open(path, "wb") as f:
        for offset in range(0, size, 1 << 20):
            f.write(os.urandom(min(1 << 20, size - offset)))


def write_sparse(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in ((0, 1 << 20), (size // 3 + 12345, 5000), (size - 100, 100)):
            f.seek(offset)
            f.write(os.urandom(length))


def measure(label: str, path: str, tool: str) -> list[tuple[str, str, float]]:
    """(input, method, seconds) rows; exits unless every method gives the tool's digest."""
    reference_time, reference = best_of(lambda: subprocess.run(
        [tool, "digest", path], check=True, capture_output=True, text=True).stdout.split()[0])
    rows = [(label, "fsverity digest", reference_time)]
    for method, threads in (("cfsdeploy (default)", None), ("cfsdeploy threads=1", 1)):
        seconds, digest = best_of(
            lambda threads=threads: fsverity.format_digest(fsverity.digest_file(path, threads=threads)))
        if digest != reference:
            sys.exit(f"{method} disagrees on {label}: {digest} != {reference}")
        rows.append((label, method, seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="random file size")
    parser.add_argument("--sparse-gib", type=int, default=8, help="sparse file size")
    parser.add_argument("--dir", help="where to create the files (default: the temp dir)")
    args = parser.parse_args()
    tool = shutil.which("fsverity")
    if tool is None:
        sys.exit("the fsverity tool (Debian package fsverity) is not installed")

    dense_label = f"{args.size_mib} MiB random"
    sparse_label = f"{args.sparse_gib} GiB sparse, 3 extents"
    sizes = {dense_label: args.size_mib << 20, sparse_label: args.sparse_gib << 30}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        dense, sparse = os.path.join(tmp, "random"), os.path.join(tmp, "sparse")
        write_random(dense, sizes[dense_label])
        write_sparse(sparse, sizes[sparse_label])
        rows = measure(dense_label, dense, tool) + measure(sparse_label, sparse, tool)

    reference = {label: seconds for label, method, seconds in rows if method == "fsverity digest"}
    print(f"{os.cpu_count()} CPUs; best of {RUNS}; MB/s is file size / time; "
          "ratio is time / fsverity's time (below 1: faster)")
    print(f"{'input':<26} {'method':<21} {'seconds':>9} {'MB/s':>9} {'ratio':>7}")
    for label, method, seconds in rows:
        print(f"{label:<26} {method:<21} {seconds:>9.4f} {sizes[label] / seconds / 1e6:>9.0f} "
              f"{seconds / reference[label]:>7.3f}")


if __name__ == "__main__":
    main()
