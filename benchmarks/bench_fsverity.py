"""fs-verity digest throughput: cfsdeploy against Debian's `fsverity digest`.

    python benchmarks/bench_fsverity.py [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

from cfsdeploy import fsverity


def best(fn, runs: int = 3) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        dense = os.path.join(tmp, "dense")
        with open(dense, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        sparse = os.path.join(tmp, "sparse")
        with open(sparse, "wb") as f:
            f.truncate(8 << 30)
            for off in (0, 3 << 30, (8 << 30) - 4096):
                f.seek(off)
                f.write(os.urandom(1 << 20)[:4096])

        def ref(path: str):
            return lambda: subprocess.run(["fsverity", "digest", path], check=True,
                                          capture_output=True, text=True).stdout.split()[0]

        def ours(path: str, threads: int | None):
            return lambda: fsverity.format_digest(fsverity.digest_file(path, threads=threads))

        rows = []
        for label, path, nbytes in ((f"{args.size_mib} MiB random", dense, size),
                                    ("8 GiB sparse, 3 extents", sparse, 8 << 30)):
            t_ref, d_ref = best(ref(path))
            t_1, d_1 = best(ours(path, 1))
            t_n, d_n = best(ours(path, None))
            assert d_ref == d_1 == d_n, (d_ref, d_1, d_n)
            rows.append((label, nbytes, t_ref, t_1, t_n))
        print(f"{'input':<24} {'fsverity s':>10} {'MB/s':>7} {'ours 1t s':>9} {'MB/s':>7} "
              f"{'ours 2t s':>9} {'MB/s':>7} {'time ratio ours/ref':>19}")
        for label, nbytes, t_ref, t_1, t_n in rows:
            mb = nbytes / 1e6
            print(f"{label:<24} {t_ref:>10.3f} {mb / t_ref:>7.0f} {t_1:>9.3f} {mb / t_1:>7.0f} "
                  f"{t_n:>9.3f} {mb / t_n:>7.0f} {t_n / t_ref:>19.2f}")


if __name__ == "__main__":
    main()
