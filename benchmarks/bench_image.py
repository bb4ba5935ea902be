"""Image build time and peak memory: cfsdeploy's writer against the reference mkcomposefs.

    python benchmarks/bench_image.py [--entries 100000] [--dump FILE.dump[.gz]]...

Each measurement runs in a fresh process so peak RSS is the build's own.  The
reference (mkcomposefs from composefs) is timed on the same input when it is on PATH.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import synthetic_dump  # noqa: E402

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "composefs-vectors"

CHILD = r"""
import sys, time
from cfsdeploy.composefs import dumpfile, imagewriter
data = open(sys.argv[1], "rb").read()
t0 = time.perf_counter()
root = dumpfile.parse(data)
t1 = time.perf_counter()
image = imagewriter.build(root).image
t2 = time.perf_counter()
open(sys.argv[2], "wb").write(image)
# VmHWM is this process's own peak (ru_maxrss can carry the parent's across exec).
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(t1 - t0, t2 - t1, rss)
"""


def ours(dump: Path, out: Path) -> tuple[float, float, float]:
    best = None
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", CHILD, str(dump), str(out)],
                           check=True, capture_output=True, text=True)
        parse, build, rss = r.stdout.split()
        run = (float(parse), float(build), int(rss) / 1024)
        best = run if best is None or sum(run[:2]) < sum(best[:2]) else best
    assert best is not None
    return best


def reference(dump: Path, out: Path) -> tuple[float, float] | None:
    tool = shutil.which("mkcomposefs")
    if tool is None:
        return None
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-f", "%M", tool, "--from-file", str(dump), str(out)],
                           check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        rss = int(r.stderr.strip().splitlines()[-1]) / 1024
        best = (wall, rss) if best is None or wall < best[0] else best
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, action="append", help="synthetic dumpfile sizes")
    ap.add_argument("--dump", action="append", default=[], help="extra dumpfiles to measure")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inputs: list[tuple[str, Path]] = []
        for name in ["config.dump.gz", *args.dump]:
            src = VECTORS / name if not os.path.exists(name) else Path(name)
            if src.exists():
                data = src.read_bytes()
                path = Path(tmp, src.name.removesuffix(".gz"))
                path.write_bytes(gzip.decompress(data) if src.name.endswith(".gz") else data)
                inputs.append((src.name, path))
        for n in args.entries or [64_000, 100_000]:
            path = Path(tmp, f"synthetic-{n}.dump")
            path.write_bytes(synthetic_dump(n))
            inputs.append((f"synthetic {n}", path))
        print(f"{'input':<22} {'entries':>8} {'parse s':>8} {'build s':>8} {'total s':>8} "
              f"{'entries/s':>10} {'peak MiB':>9} {'ref s':>7} {'ref MiB':>8} {'time x':>7} {'mem x':>6}")
        for label, path in inputs:
            entries = path.read_bytes().count(b"\n")
            parse, build, rss = ours(path, Path(tmp, "ours.img"))
            total = parse + build
            ref = reference(path, Path(tmp, "ref.img"))
            same = ""
            if ref is not None:
                equal = Path(tmp, "ours.img").read_bytes() == Path(tmp, "ref.img").read_bytes()
                same = " (same bytes)" if equal else " (DIFFERENT)"
            refcols = (f"{ref[0]:>7.3f} {ref[1]:>8.1f} {total / ref[0]:>7.2f} {rss / ref[1]:>6.2f}"
                       if ref else f"{'n/a':>7} {'n/a':>8} {'n/a':>7} {'n/a':>6}")
            print(f"{label:<22} {entries:>8} {parse:>8.3f} {build:>8.3f} {total:>8.3f} "
                  f"{entries / total:>10.0f} {rss:>9.1f} {refcols}{same}")
        if shutil.which("mkcomposefs") is None:
            print("\nmkcomposefs is not installed here (Debian 12 has no composefs package); the "
                  "reference figure measured on this project's machines is 64,246 entries in "
                  "0.52 s with 70 MiB peak (REFERENCE-NOTES section 9).")


if __name__ == "__main__":
    main()
