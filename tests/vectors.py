"""The composefs known-answer vectors in tests/vectors/composefs (see its README)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

VECTOR_DIR = Path(__file__).resolve().parent / "vectors" / "composefs"
LENIENT = {"no-newline.dump", "longlink.dump", "honggfuzz-longlink-unterminated.dump"}


@dataclass(frozen=True)
class Vector:
    name: str
    data: bytes
    strict: bool
    sha256: str | None
    version: int | None


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    # A vector that is a symlink upstream arrives as a file naming its target.
    if len(data) < 64 and b"\n" not in data and (path.parent / data.decode()).is_file():
        data = (path.parent / data.decode()).read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def load() -> list[Vector]:
    out = []
    for path in sorted(VECTOR_DIR.glob("*.dump*")):
        if not (path.name.endswith(".dump") or path.name.endswith(".dump.gz")):
            continue
        sha = path.with_name(path.name + ".sha256")
        ver = path.with_name(path.name + ".version")
        out.append(Vector(
            name=path.name, data=_read(path), strict=path.name not in LENIENT,
            sha256=sha.read_text().split()[0] if sha.exists() else None,
            version=int(ver.read_text()) if ver.exists() else None))
    return out


VECTORS = load() if VECTOR_DIR.is_dir() else []
VALID = [v for v in VECTORS if not v.name.startswith("should-fail")]
SHOULD_FAIL = [v for v in VECTORS if v.name.startswith("should-fail")]

# Times before 1970, our own known answer: the reference mkcomposefs (composefs 6fc335c,
# `mkcomposefs --from-file`) builds BEFORE_1970 into the image of BEFORE_1970_SHA256, and
# its `composefs-info dump` of that image prints BEFORE_1970_DUMP (directory sizes and
# link counts recomputed).  -1, the least 64-bit time, the Moon landing (1969-07-20
# 20:17:40.5 UTC) and a nanosecond short of -1.
BEFORE_1970 = (b"/ 4096 40755 2 0 0 0 1700000000.0 - - -\n"
               b"/a 3 100644 1 0 0 0 -1.0 - hi\\n -\n"
               b"/b 6 100644 1 0 0 0 -9223372036854775808.0 - there\\n -\n"
               b"/c 1 120777 1 0 0 0 -14182940.500000000 a - -\n"
               b"/d 0 40755 2 0 0 0 -1.999999999 - - -\n")
BEFORE_1970_SHA256 = "6977bda512f7bb7aa7499f761a5a059e934d40b2e87873417f7f84058e076ea1"
BEFORE_1970_DUMP = (b"/ 4096 40755 3 0 0 0 1700000000.0 - - -\n"
                    b"/a 3 100644 1 0 0 0 -1.0 - hi\\n -\n"
                    b"/b 6 100644 1 0 0 0 -9223372036854775808.0 - there\\n -\n"
                    b"/c 1 120777 1 0 0 0 -14182940.500000000 a - -\n"
                    b"/d 27 40755 2 0 0 0 -1.999999999 - - -\n")
