"""The composefs known-answer vectors in ../shared/composefs-vectors (see its README)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

VECTOR_DIR = Path(__file__).resolve().parents[2] / "shared" / "composefs-vectors"
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
