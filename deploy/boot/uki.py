"""Unified Kernel Images: systemd's EFI stub with the kernel, its initramfs and its
command line added as PE sections, one file the firmware checks with one signature
(systemd's UKI specification; ukify's placement, done with objcopy).

    offset 0      DOS header "MZ" ... e_lfanew (u32 at 0x3c) -----------------+
    e_lfanew      "PE\\0\\0", COFF header (20 bytes): Machine, NumberOfSections, |
                  TimeDateStamp, ..., SizeOfOptionalHeader                <----+
                  optional header: Magic (0x20b PE32+), ..., ImageBase,
                  SectionAlignment, FileAlignment, ..., CheckSum, ...,
                  data directories (#4: the Authenticode signature's place)
                  section table: 40 bytes a section: Name[8], VirtualSize,
                  VirtualAddress, SizeOfRawData, PointerToRawData, ...
    the stub's    .text .rodata .data .sbat .sdmagic .reloc   (systemd-stub)
    sections
    added         .osrel    os-release of the image             \\  each at the
                  .cmdline  the kernel command line, as given     |  next multiple
                  .uname    the kernel's version (if given)       |  of Section-
                  .initrd   the initramfs                         |  Alignment after
                  .linux    the kernel, last: the largest, and    |  the one before
                            room after it to decompress into     /  (ImageBase-relative)
    signature     sbsign appends a PKCS#7 signature over the Authenticode hash of
                  all of the above and points data directory #4 at it

A section's data are VirtualSize bytes at PointerToRawData (SizeOfRawData is that
rounded up to FileAlignment; the loader zero-fills past it).  Under Secure Boot
systemd-stub ignores the command line it is started with when the image has a
.cmdline: the signed .cmdline is the kernel's command line (systemd-stub(7)).

objcopy stamps the time into the COFF header and computes a checksum over it; build
puts back the stub's time stamp and zeroes the checksum, as ukify does, so the same
inputs give the same bytes.  sections() reads a UKI back without trusting it: every
offset and size is checked against the file.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ..util import fsutil
from ..util.errors import CfsError, IntegrityError, NotFoundError, UsageError
from ..util.run import run
from . import kargs

PathLike = str | os.PathLike[str]

# The sections build adds, in ukify's order (.linux last).
OSREL, CMDLINE, UNAME, INITRD, LINUX = ".osrel", ".cmdline", ".uname", ".initrd", ".linux"
ADDED = (OSREL, CMDLINE, UNAME, INITRD, LINUX)

# Bounds on what is read: the PE specification's own limit on sections (Windows
# loads at most 96), and headers that fit well within the first pages.
MAX_SECTIONS = 96
MAX_HEADERS = 1 << 16
MAX_OPTIONAL = 1 << 12  # PE32+ with all 16 data directories: 240 bytes
MAX_OSREL = 1 << 16
MAX_UNAME = 256
# A kernel and its initramfs; a UKI bigger than this is no UKI of ours.
MAX_FILE = 1 << 31

_DOS_MAGIC = b"MZ"
_PE_MAGIC = b"PE\0\0"
_PE32, _PE32_PLUS = 0x10B, 0x20B
_COFF = struct.Struct("<HHIIIHH")      # Machine ... Characteristics
_SECTION = struct.Struct("<8sIIII12xI")  # Name, VirtualSize, VirtualAddress, SizeOfRawData, PointerToRawData
_SECURITY_DIR = 4
_CMDLINE = re.compile(r"[\x21-\x26\x28-\x5b\x5d-\x7e]+( [\x21-\x26\x28-\x5b\x5d-\x7e]+)*")
_UNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")


class UkiError(CfsError):
    """A Unified Kernel Image cannot be made or read."""


class UkiFormatError(UkiError, IntegrityError):
    """A file is no well-formed PE image (truncated, malformed, hostile)."""


class UkiNotFoundError(UkiError, NotFoundError):
    """There is no file where a UKI was to be read."""


class UkiUsageError(UkiError, UsageError):
    """What a UKI is asked to be made of cannot go into one."""


@dataclass(frozen=True)
class Section:
    name: str
    virtual_address: int  # relative to ImageBase
    virtual_size: int
    raw_offset: int       # PointerToRawData
    raw_size: int         # SizeOfRawData

    @property
    def end(self) -> int:
        """The end of its memory, relative to ImageBase."""
        return self.virtual_address + self.virtual_size

    @property
    def file_size(self) -> int:
        """How many of its bytes the file holds (the loader zero-fills the rest)."""
        return min(self.virtual_size, self.raw_size)


@dataclass(frozen=True)
class PeImage:
    """A PE image's headers, checked against the file's size."""
    size: int
    image_base: int
    section_alignment: int
    file_alignment: int
    sections: tuple[Section, ...]
    signed: bool          # data directory #4 (the certificate table) is set
    timestamp: int        # the COFF header's TimeDateStamp
    timestamp_offset: int  # where the COFF header's TimeDateStamp is
    checksum_offset: int   # where the optional header's CheckSum is

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)


Reader = Callable[[int, int], bytes]


def _bad(what: str) -> UkiFormatError:
    return UkiFormatError(f"not a valid PE image: {what}")


def _headers(size: int, read: Reader) -> PeImage:
    """Parse and check the DOS header, PE signature, COFF header, optional header and
    section table of a file of `size` bytes; read(offset, n) gives its bytes."""
    def get(offset: int, n: int, what: str) -> bytes:
        if offset < 0 or offset + n > size:
            raise _bad(f"{what} past the end of the file")
        return read(offset, n)

    if size > MAX_FILE:
        raise _bad(f"larger than {MAX_FILE} bytes")
    if get(0, 2, "DOS header") != _DOS_MAGIC:
        raise _bad("no MZ signature")
    (pe,) = struct.unpack("<I", get(0x3C, 4, "DOS header"))
    if not 0x40 <= pe <= MAX_HEADERS:
        raise _bad(f"PE header offset {pe:#x} out of range")
    if get(pe, 4, "PE signature") != _PE_MAGIC:
        raise _bad("no PE signature")
    coff = pe + 4
    _, count, timestamp, _, _, opt_size, _ = _COFF.unpack(get(coff, _COFF.size, "COFF header"))
    if not 1 <= count <= MAX_SECTIONS:
        raise _bad(f"{count} sections (1 to {MAX_SECTIONS} expected)")
    opt = coff + _COFF.size
    if opt_size > MAX_OPTIONAL:
        raise _bad(f"optional header of {opt_size} bytes")
    header = get(opt, opt_size, "optional header")
    if len(header) < 2:
        raise _bad("no optional header")
    (magic,) = struct.unpack_from("<H", header)
    # PE32+ has a 64-bit ImageBase where PE32 has BaseOfData and a 32-bit one;
    # the data directories follow 96 (PE32) or 112 (PE32+) bytes of fields
    if magic not in (_PE32, _PE32_PLUS):
        raise _bad(f"optional header magic {magic:#x}")
    fields = 112 if magic == _PE32_PLUS else 96
    if len(header) < fields:
        raise _bad(f"optional header of {len(header)} bytes")
    (base,) = struct.unpack_from("<Q", header, 24) if magic == _PE32_PLUS else struct.unpack_from("<I", header, 28)
    section_alignment, file_alignment = struct.unpack_from("<II", header, 32)
    for name, value in (("SectionAlignment", section_alignment), ("FileAlignment", file_alignment)):
        if value == 0 or value & (value - 1) or value > 1 << 16:
            raise _bad(f"{name} {value:#x}")
    (directories,) = struct.unpack_from("<I", header, fields - 4)
    if directories > (len(header) - fields) // 8:
        raise _bad(f"{directories} data directories in an optional header of {len(header)} bytes")
    signed = directories > _SECURITY_DIR and struct.unpack_from("<II", header, fields + 8 * _SECURITY_DIR) != (0, 0)

    table = get(opt + opt_size, count * _SECTION.size, "section table")
    sections: list[Section] = []
    for i in range(count):
        raw_name, vsize, vaddr, raw_size, raw_offset, _ = _SECTION.unpack_from(table, i * _SECTION.size)
        name = raw_name.rstrip(b"\0")
        if not name or b"\0" in name or not all(0x21 <= c <= 0x7E for c in name):
            raise _bad(f"section {i} has the name {raw_name!r}")
        s = Section(name.decode("ascii"), vaddr, vsize, raw_offset, raw_size)
        if raw_size and raw_offset + raw_size > size:
            raise _bad(f"section {s.name} past the end of the file")
        if any(t.name == s.name for t in sections):
            # which of the two a loader takes is its own choice: refuse to guess
            raise _bad(f"two sections named {s.name}")
        sections.append(s)
    return PeImage(size, base, section_alignment, file_alignment, tuple(sections), signed,
                   timestamp, timestamp_offset=coff + 4, checksum_offset=opt + 64)


def _open(path: PathLike) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise UkiNotFoundError(f"{os.fsdecode(path)}: no such file") from None
    except OSError as e:
        raise UkiError(f"{os.fsdecode(path)}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UkiFormatError(f"{os.fsdecode(path)}: not a regular file")
    return fd


def _pread(fd: int) -> Reader:
    def read(offset: int, n: int) -> bytes:
        data = os.pread(fd, n, offset)
        if len(data) != n:
            raise _bad("the file shrank while read")
        return data
    return read


def read_headers(path: PathLike) -> PeImage:
    """The checked headers of the PE image at path."""
    fd = _open(path)
    try:
        return _headers(os.fstat(fd).st_size, _pread(fd))
    finally:
        os.close(fd)


def sections(source: PathLike | bytes, names: Collection[str] | None = None) -> dict[str, bytes]:
    """The data of a PE image's sections (those named, or all), as the file holds
    them: VirtualSize bytes at most, without the padding to FileAlignment."""
    if isinstance(source, bytes):
        data = source
        image = _headers(len(data), lambda offset, n: data[offset:offset + n])
        return {s.name: data[s.raw_offset:s.raw_offset + s.file_size]
                for s in image.sections if names is None or s.name in names}
    fd = _open(source)
    try:
        read = _pread(fd)
        image = _headers(os.fstat(fd).st_size, read)
        return {s.name: read(s.raw_offset, s.file_size)
                for s in image.sections if names is None or s.name in names}
    finally:
        os.close(fd)


def cmdline_of(source: PathLike | bytes) -> str:
    """The command line a UKI gives its kernel, as systemd-stub makes it of .cmdline:
    up to the first NUL, control characters turned into spaces, whitespace trimmed."""
    data = sections(source, (CMDLINE,)).get(CMDLINE)
    if data is None:
        raise UkiFormatError("no .cmdline section")
    text = data.split(b"\0", 1)[0]
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError:
        raise UkiFormatError(".cmdline is not ASCII") from None
    return re.sub(r"[\x00-\x20\x7f]", " ", decoded).strip(" ")


def _round_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _regular(path: PathLike, what: str) -> int:
    try:
        st = os.stat(path)
    except OSError as e:
        raise UkiUsageError(f"{what} {os.fsdecode(path)}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UkiUsageError(f"{what} {os.fsdecode(path)}: not a regular file")
    return st.st_size


def _check_cmdline(cmdline: str) -> None:
    """One plain line that systemd-stub passes on unchanged (mangle_stub_cmdline keeps
    it as is) and that every reader splits alike: words of printable ASCII without '
    or \\ (systemd reads them as quotes and escapes, the kernel not), one space apart,
    double quotes balanced."""
    if (not cmdline or len(cmdline) > kargs.MAX_LINE or not _CMDLINE.fullmatch(cmdline)
            or cmdline.count('"') % 2):
        raise UkiUsageError(f"invalid UKI command line {cmdline!r}: printable ASCII words without ' or \\, "
                            f"one space apart, double quotes balanced, at most {kargs.MAX_LINE} characters")


def _produce(out: PathLike, make: Callable[[str], None]) -> None:
    """Write out atomically from what make(path) writes to a scratch path beside it
    (the tools write to a path, not to an open file)."""
    directory = os.path.dirname(os.path.abspath(out))
    with tempfile.TemporaryDirectory(prefix=".uki.", dir=directory) as scratch:
        made = os.path.join(scratch, "made")
        make(made)

        def copy(fd: int) -> None:
            src = os.open(made, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fsutil.copy_fd(src, fd)
            finally:
                os.close(src)

        fsutil.atomic_write(out, copy, mode=0o644, tmpdir=scratch)


def build(stub: PathLike, kernel: PathLike, initrd: PathLike, cmdline: str, os_release: bytes,
          out: PathLike, *, uname: str | None = None) -> None:
    """Make a UKI at out (atomically) of systemd's EFI stub, the kernel, the initramfs,
    the command line (stored as given, without a NUL, as ukify does) and os-release."""
    _check_cmdline(cmdline)
    if not os_release or len(os_release) > MAX_OSREL:
        raise UkiUsageError(f"os-release of {len(os_release)} bytes (1 to {MAX_OSREL})")
    if uname is not None and (len(uname) > MAX_UNAME or not _UNAME.fullmatch(uname)):
        raise UkiUsageError(f"invalid kernel version {uname!r}")
    stub_image = read_headers(stub)
    if stub_image.signed:
        raise UkiUsageError(f"{os.fsdecode(stub)}: the stub is signed (adding sections would void it)")
    if present := [s.name for s in stub_image.sections if s.name in ADDED]:
        raise UkiUsageError(f"{os.fsdecode(stub)}: already has {', '.join(present)}: not a bare stub")
    kernel_size = _regular(kernel, "kernel")
    initrd_size = _regular(initrd, "initramfs")

    def make(made: str) -> None:
        scratch = os.path.dirname(made)
        texts = {OSREL: os_release, CMDLINE: cmdline.encode("ascii")}
        if uname is not None:
            texts[UNAME] = uname.encode("ascii")
        files: dict[str, tuple[str, int]] = {}
        for name, data in texts.items():
            path = os.path.join(scratch, name.lstrip("."))
            with open(path, "wb") as f:
                f.write(data)
            files[name] = (path, len(data))
        files[INITRD] = (os.path.abspath(initrd), initrd_size)
        files[LINUX] = (os.path.abspath(kernel), kernel_size)
        # ukify's placement: each section at the next multiple of SectionAlignment
        # after the end of the one before, the first after the stub's last; objcopy
        # takes absolute addresses (ImageBase + RVA) and orders sections by them
        align = stub_image.section_alignment
        vma = _round_up(max(s.end for s in stub_image.sections), align)
        argv: list[str] = ["objcopy"]
        for name in ADDED:
            if name not in files:
                continue
            path, size = files[name]
            kind = "code" if name == LINUX else "data"
            argv += ["--add-section", f"{name}={path}",
                     "--change-section-vma", f"{name}={stub_image.image_base + vma:#x}",
                     "--set-section-flags", f"{name}=readonly,{kind}"]
            vma = _round_up(vma + size, align)
        run([*argv, os.path.abspath(stub), made], capture=True)
        _settle(made, stub_image, {name: size for name, (_, size) in files.items()}, texts)

    _produce(out, make)


def _settle(made: str, stub: PeImage, sizes: dict[str, int], texts: dict[str, bytes]) -> None:
    """Check what objcopy made, and make it the same for the same inputs: the stub's
    time stamp back in the COFF header, the checksum zero (as ukify leaves it)."""
    image = read_headers(made)
    made_sizes = {s.name: s.virtual_size for s in image.sections}
    expected = [s.name for s in stub.sections] + [n for n in ADDED if n in sizes]
    if list(made_sizes) != expected or any(made_sizes[n] != size for n, size in sizes.items()):
        raise UkiError(f"objcopy made sections {list(made_sizes)}, not {expected} of the sizes given")
    got = sections(made, texts.keys())
    if got != texts:
        raise UkiError("objcopy's sections do not read back as written")
    fd = os.open(made, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, struct.pack("<I", stub.timestamp), image.timestamp_offset)
        os.pwrite(fd, struct.pack("<I", 0), image.checksum_offset)
    finally:
        os.close(fd)


def sign(uki: PathLike, key: PathLike, cert: PathLike, out: PathLike) -> None:
    """Sign the UKI for Secure Boot with sbsign (key and certificate in PEM), the
    signed image written to out atomically."""
    if read_headers(uki).signed:
        raise UkiUsageError(f"{os.fsdecode(uki)}: already signed")
    _regular(key, "key")
    _regular(cert, "certificate")

    def make(made: str) -> None:
        run(["sbsign", "--key", os.path.abspath(key), "--cert", os.path.abspath(cert), "--output", made,
             os.path.abspath(uki)], capture=True)

    _produce(out, make)


def verify(path: PathLike, cert: PathLike) -> bool:
    """Whether the PE image at path carries a valid signature by cert (sbverify)."""
    _regular(cert, "certificate")
    if not read_headers(path).signed:
        return False
    proc = run(["sbverify", "--cert", os.path.abspath(cert), os.path.abspath(path)], check=False, capture=True)
    return proc.returncode == 0
