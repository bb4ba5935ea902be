"""Unified Kernel Images: built with objcopy from systemd's stub, signed and checked
with sbsigntool, and read back by a PE reader that trusts nothing in the file.

The stub is the host's (systemd-boot-efi); the kernel and initramfs are stand-ins:
what is tested here is the container, which tests/test_secureboot.py boots."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cfsdeploy.boot import uki
from cfsdeploy.util.errors import CommandHostError, IntegrityError

from . import secureboot

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
CMDLINE = "console=ttyS0 root=LABEL=root cfsdeploy.digest=" + "ab" * 32 + " cfsdeploy.verity=require"
OS_RELEASE = b'ID=debian\nVERSION_ID="13"\nPRETTY_NAME="Debian GNU/Linux 13 (trixie)"\n'
UNAME = "6.12.117+deb13-amd64"
# the vendor's key, and a stranger's
Keys = tuple[secureboot.KeyPair, secureboot.KeyPair]


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    if not STUB.exists():
        pytest.skip(f"{STUB} missing (Debian package systemd-boot-efi)")
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"MZ" + os.urandom(300_000))
    initrd.write_bytes(os.urandom(150_001))
    return {"kernel": kernel, "initrd": initrd}


def build(inputs: dict[str, Path], out: Path, cmdline: str = CMDLINE) -> Path:
    uki.build(STUB, inputs["kernel"], inputs["initrd"], cmdline, OS_RELEASE, out, uname=UNAME)
    return out


@pytest.fixture
def image(inputs: dict[str, Path], tmp_path: Path) -> Path:
    return build(inputs, tmp_path / "uki.efi")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    return secureboot.make_key(d, "vendor"), secureboot.make_key(d, "stranger")


# --- building ----------------------------------------------------------------------------


def test_added_sections_read_back_exactly(image: Path, inputs: dict[str, Path]) -> None:
    got = uki.sections(image, uki.ADDED)
    assert got == {".osrel": OS_RELEASE, ".cmdline": CMDLINE.encode(), ".uname": UNAME.encode(),
                   ".initrd": inputs["initrd"].read_bytes(), ".linux": inputs["kernel"].read_bytes()}


def test_the_stubs_sections_come_first_and_unchanged(image: Path) -> None:
    stub = uki.sections(STUB)
    assert list(uki.sections(image))[:len(stub)] == list(stub)
    assert {k: v for k, v in uki.sections(image).items() if k in stub} == stub


def test_added_sections_follow_the_stub_each_at_the_next_section_alignment(image: Path) -> None:
    pe = uki.read_headers(image)
    added = [s for s in pe.sections if s.name in uki.ADDED]
    assert [s.name for s in added] == list(uki.ADDED)
    before = [s for s in pe.sections if s.name not in uki.ADDED]
    end = max(s.end for s in before)
    for s in added:
        assert s.virtual_address == -(-end // pe.section_alignment) * pe.section_alignment
        end = s.end


def test_objdump_agrees_on_the_section_names(image: Path) -> None:
    out = subprocess.run(["objdump", "-h", image], capture_output=True, text=True, check=True).stdout
    names = [line.split()[1] for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert names == list(uki.sections(image))


def test_same_inputs_give_the_same_bytes(inputs: dict[str, Path], tmp_path: Path) -> None:
    first = build(inputs, tmp_path / "a.efi").read_bytes()
    time.sleep(1.1)  # objcopy stamps the time, in seconds
    assert build(inputs, tmp_path / "b.efi").read_bytes() == first


def test_command_line_is_stored_without_a_nul_and_read_back(image: Path) -> None:
    assert uki.sections(image, (uki.CMDLINE,))[uki.CMDLINE] == CMDLINE.encode()
    assert uki.cmdline_of(image) == CMDLINE


def test_cmdline_of_reads_it_as_systemd_stub_does(image: Path) -> None:
    data = bytearray(image.read_bytes())
    s = uki.read_headers(image).section(uki.CMDLINE)
    assert s is not None
    data[s.raw_offset:s.raw_offset + 8] = b"\t a\nb\0zz"
    # up to the NUL, control characters made spaces, trimmed
    assert uki.cmdline_of(bytes(data)) == "a b"


@pytest.mark.parametrize("cmdline", ["", " leading", "trailing ", "two  spaces", "new\nline", "caf\u00e9",
                                     'unbalanced "quote', "it's", "back\\slash", "x" * 2000])
def test_build_refuses_a_command_line_the_stub_would_not_pass_on_as_given(inputs: dict[str, Path], tmp_path: Path,
                                                                          cmdline: str) -> None:
    with pytest.raises(uki.UkiUsageError):
        build(inputs, tmp_path / "uki.efi", cmdline)
    assert sorted(tmp_path.iterdir()) == sorted(inputs.values())


def test_build_refuses_a_stub_that_is_already_a_uki(image: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(uki.UkiUsageError, match="not a bare stub"):
        uki.build(image, inputs["kernel"], inputs["initrd"], CMDLINE, OS_RELEASE, tmp_path / "again.efi")


def test_build_replaces_the_output_whole(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "uki.efi"
    out.write_bytes(b"old")
    build(inputs, out)
    assert uki.cmdline_of(out) == CMDLINE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["initrd.img", "uki.efi", "vmlinuz"]


# --- signing -----------------------------------------------------------------------------


def test_signed_uki_verifies_with_its_certificate(image: Path, keys: Keys, tmp_path: Path) -> None:
    vendor, _ = keys
    uki.sign(image, vendor.key, vendor.cert, tmp_path / "signed.efi")
    assert uki.verify(tmp_path / "signed.efi", vendor.cert)


def test_signed_uki_does_not_verify_with_another_certificate(image: Path, keys: Keys, tmp_path: Path) -> None:
    vendor, stranger = keys
    uki.sign(image, vendor.key, vendor.cert, tmp_path / "signed.efi")
    assert not uki.verify(tmp_path / "signed.efi", stranger.cert)


def test_unsigned_uki_does_not_verify(image: Path, keys: Keys) -> None:
    vendor, _ = keys
    assert not uki.verify(image, vendor.cert)


def test_signed_uki_with_its_command_line_changed_does_not_verify(image: Path, keys: Keys, tmp_path: Path) -> None:
    vendor, _ = keys
    signed = tmp_path / "signed.efi"
    uki.sign(image, vendor.key, vendor.cert, signed)
    data = signed.read_bytes().replace(b"verity=require", b"verity=off\0\0\0\0")
    signed.write_bytes(data)
    assert uki.cmdline_of(signed) == CMDLINE.replace("require", "off")
    assert not uki.verify(signed, vendor.cert)


def test_signing_keeps_the_sections(image: Path, keys: Keys, tmp_path: Path) -> None:
    vendor, _ = keys
    uki.sign(image, vendor.key, vendor.cert, tmp_path / "signed.efi")
    assert uki.sections(tmp_path / "signed.efi") == uki.sections(image)


def test_signing_a_signed_uki_is_refused(image: Path, keys: Keys, tmp_path: Path) -> None:
    vendor, _ = keys
    uki.sign(image, vendor.key, vendor.cert, tmp_path / "signed.efi")
    with pytest.raises(uki.UkiUsageError, match="already signed"):
        uki.sign(tmp_path / "signed.efi", vendor.key, vendor.cert, tmp_path / "twice.efi")


# --- missing tools -----------------------------------------------------------------------


@pytest.fixture
def no_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_build_without_objcopy_names_its_package_and_writes_nothing(inputs: dict[str, Path], tmp_path: Path,
                                                                    no_tools: None) -> None:
    with pytest.raises(CommandHostError) as e:
        build(inputs, tmp_path / "uki.efi")
    assert (str(e.value), e.value.hint) == ("objcopy: command not found", "install package binutils?")
    assert not (tmp_path / "uki.efi").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sign_without_sbsign_names_its_package(image: Path, keys: Keys, tmp_path: Path, no_tools: None) -> None:
    vendor, _ = keys
    with pytest.raises(CommandHostError) as e:
        uki.sign(image, vendor.key, vendor.cert, tmp_path / "signed.efi")
    assert (str(e.value), e.value.hint) == ("sbsign: command not found", "install package sbsigntool?")


def test_verify_without_sbverify_names_its_package(image: Path, keys: Keys, tmp_path: Path) -> None:
    vendor, _ = keys
    signed = tmp_path / "signed.efi"
    uki.sign(image, vendor.key, vendor.cert, signed)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    with pytest.MonkeyPatch.context() as m:  # after signing
        m.setenv("PATH", str(empty))
        with pytest.raises(CommandHostError) as e:
            uki.verify(signed, vendor.cert)
    assert (str(e.value), e.value.hint) == ("sbverify: command not found", "install package sbsigntool?")


# --- hostile files -----------------------------------------------------------------------


def _pe(data: bytes) -> int:
    return int(struct.unpack_from("<I", data, 0x3C)[0])


def _table(data: bytes) -> int:
    pe = _pe(data)
    (opt_size,) = struct.unpack_from("<H", data, pe + 20)
    return pe + 24 + opt_size


def _section_offset(data: bytes, name: bytes) -> int:
    (count,) = struct.unpack_from("<H", data, _pe(data) + 6)
    for i in range(count):
        at = _table(data) + 40 * i
        if data[at:at + 8].rstrip(b"\0") == name:
            return at
    raise AssertionError(name)


def _put(data: bytes, offset: int, fmt: str, *values: int | bytes) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


MALFORMED: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda d: b"",
    "truncated_in_the_headers": lambda d: d[:0x100],
    "truncated_in_a_section": lambda d: d[:len(d) // 2],
    "no_mz": lambda d: b"ZM" + d[2:],
    "pe_offset_past_the_end": lambda d: _put(d, 0x3C, "<I", 0xFFFFFFF0),
    "pe_offset_inside_the_dos_header": lambda d: _put(d, 0x3C, "<I", 4),
    "no_pe_signature": lambda d: _put(d, _pe(d), "<4s", b"PE\0\1"),
    "absurd_section_count": lambda d: _put(d, _pe(d) + 6, "<H", 0xFFFF),
    "no_sections": lambda d: _put(d, _pe(d) + 6, "<H", 0),
    "optional_header_past_the_end": lambda d: _put(d, _pe(d) + 20, "<H", 0xFFFF)[:_pe(d) + 24 + 0x1000],
    "absurd_optional_header_size": lambda d: _put(d, _pe(d) + 20, "<H", 0xFFFF),
    "optional_header_too_short": lambda d: _put(d, _pe(d) + 20, "<H", 16),
    "unknown_optional_header_magic": lambda d: _put(d, _pe(d) + 24, "<H", 0x107),
    "absurd_section_alignment": lambda d: _put(d, _pe(d) + 24 + 32, "<I", 3),
    "too_many_data_directories": lambda d: _put(d, _pe(d) + 24 + 108, "<I", 0x10000),
    "section_past_the_end": lambda d: _put(d, _section_offset(d, b".cmdline") + 20, "<I", len(d) - 4),
    "section_size_past_the_end": lambda d: _put(d, _section_offset(d, b".linux") + 16, "<I", 0xFFFFFF00),
    "unprintable_section_name": lambda d: _put(d, _section_offset(d, b".osrel"), "<8s", b".os\nrel"),
    "two_sections_of_one_name": lambda d: _put(d, _section_offset(d, b".uname"), "<8s", b".cmdline"),
}


@pytest.mark.parametrize("damage", MALFORMED)
def test_a_malformed_pe_is_a_format_error(image: Path, damage: str) -> None:
    data = MALFORMED[damage](image.read_bytes())
    with pytest.raises(uki.UkiFormatError):
        uki.sections(data)


@pytest.mark.parametrize("damage", ["truncated_in_a_section", "absurd_section_count", "section_past_the_end"])
def test_a_malformed_pe_file_is_a_format_error_for_every_reader(image: Path, damage: str, keys: Keys) -> None:
    image.write_bytes(MALFORMED[damage](image.read_bytes()))
    vendor, _ = keys
    for read in (uki.sections, uki.cmdline_of, uki.read_headers, lambda p: uki.verify(p, vendor.cert)):
        with pytest.raises(uki.UkiFormatError):
            read(image)


def test_a_uki_without_a_command_line_is_a_format_error_for_cmdline_of() -> None:
    if not STUB.exists():
        pytest.skip(f"{STUB} missing")
    with pytest.raises(uki.UkiFormatError, match="no .cmdline"):
        uki.cmdline_of(STUB)


def test_a_directory_is_not_a_pe_image(tmp_path: Path) -> None:
    with pytest.raises(uki.UkiFormatError, match="not a regular file"):
        uki.sections(tmp_path)


def test_a_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(uki.UkiNotFoundError):
        uki.cmdline_of(tmp_path / "missing.efi")


def test_format_errors_are_integrity_errors() -> None:
    assert issubclass(uki.UkiFormatError, IntegrityError) and uki.UkiFormatError("x").exit_code == 4
