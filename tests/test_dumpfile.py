"""composefs-dump(5): parsing and writing manifests exactly."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cfsdeploy.composefs import dumpfile
from cfsdeploy.composefs.tree import Hardlink, Inode, lookup
from cfsdeploy.util.errors import DumpfileError

from .vectors import VALID

ROOT = b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
DIGEST = "35d02f81325122d77ec1d11baba655bc9bf8a891ab26119a41c50fa03ddfb408"


def parse(text: bytes, strict: bool = True) -> Inode:
    return dumpfile.parse(text, strict=strict)


@given(st.binary(max_size=200))
def test_escape_then_unescape_gives_the_bytes_back(value: bytes) -> None:
    assert dumpfile.unescape(dumpfile.escape(value)) == value
    assert dumpfile.unescape(dumpfile.escape_xattr(value)) == value


def test_escaped_field_has_no_space_newline_or_backslash_unescaped() -> None:
    out = dumpfile.escape(b"a b\nc\\d\te\x00")
    assert out == b"a\\x20b\\nc\\\\d\\te\\x00"


def test_equal_sign_is_escaped_only_in_xattrs() -> None:
    assert dumpfile.escape(b"a=b") == b"a=b"
    assert dumpfile.escape_xattr(b"a=b") == b"a\\x3db"


def test_lone_dash_value_is_escaped_to_tell_it_from_unset() -> None:
    assert dumpfile.escape_optional(b"-") == b"\\x2d"
    assert dumpfile.escape_optional(None) == b"-"
    node = parse(ROOT + b"/f 1 100644 1 0 0 0 0.0 - \\x2d -\n").children[b"f"]
    assert node.content == b"-"


@pytest.mark.parametrize("vector", [v for v in VALID if v.strict], ids=lambda v: v.name)
def test_canonical_vector_round_trips_exactly(vector) -> None:
    assert dumpfile.dumps(parse(vector.data)) == vector.data


def test_fields_are_parsed() -> None:
    text = ROOT + (f"/a\\x20b 259 100644 3 1000 1001 0 1695368732.385062094 "
                   f"35/d02f - {DIGEST} user.k=v\\x3dw security.selinux=x\\x00\n").encode()
    node = parse(text).children[b"a b"]
    assert (node.size, node.mode, node.nlink, node.uid, node.gid) == (259, 0o100644, 3, 1000, 1001)
    assert (node.mtime_sec, node.mtime_nsec) == (1695368732, 385062094)
    assert node.payload == b"35/d02f" and node.digest == bytes.fromhex(DIGEST)
    assert node.xattrs == {b"user.k": b"v=w", b"security.selinux": b"x\x00"}


def test_hardlink_shares_its_target_inode() -> None:
    text = ROOT + (b"/a 5 100644 2 0 0 0 0.0 - hello -\n"
                   b"/b 5 @100644 2 0 0 0 0.0 /a - -\n")
    root = parse(text)
    link = root.children[b"b"]
    assert isinstance(link, Hardlink) and link.target is root.children[b"a"]
    assert link.target.nlink == 2


def test_hardlink_may_come_before_its_target_and_chain() -> None:
    text = ROOT + (b"/a 0 @100644 3 0 0 0 0.0 /c - -\n"
                   b"/b 0 @100644 3 0 0 0 0.0 /a - -\n"
                   b"/c 0 100644 3 0 0 0 0.0 - - -\n")
    root = parse(text)
    assert root.children[b"a"].target is root.children[b"c"]
    assert root.children[b"b"].target is root.children[b"c"]


def test_dump_names_a_hardlink_by_its_primary_path() -> None:
    text = ROOT + (b"/a 3 100644 2 0 0 0 0.0 - abc -\n"
                   b"/b 3 @100644 2 0 0 0 0.0 /a abc -\n")
    assert dumpfile.dumps(parse(text)) == text


@pytest.mark.parametrize("line, problem", [
    (b"/f 0 100644 1 0 0 0 0.0 - - -", "missing trailing newline"),
    (b"/f 0 100644 1 0 0 5 0.0 - - -\n", "non-zero rdev"),
    (b"/l 3 120777 1 0 0 0 0.0 abcd - -\n", "symlink size"),
    (b"/f 0 100644 1 0 0 0 0 - - -\n", "invalid mtime"),
    (b"/f 0 100644 1 0 0 0 0.0 - - - nokey\n", "missing '='"),
    (b"/f 0 100644 1 0 0 0 0.0 - - - =v\n", "empty xattr name"),
    (b"/f 0 100648 1 0 0 0 0.0 - - -\n", "invalid mode"),
    (b"/f 0 644 1 0 0 0 0.0 - - -\n", "invalid mode"),
    (b"/f x 100644 1 0 0 0 0.0 - - -\n", "invalid size"),
    (b"/f 0 100644 1 -1 0 0 0.0 - - -\n", "invalid uid"),
    (b"/f 2 100644 1 0 0 0 0.0 - abc -\n", "content length"),
    (b"/f 9 100644 1 0 0 0 0.0 - - abc\n", "invalid digest"),
    (b"/f 0 100644 1 0 0 0 0.0 a\\q - -\n", "unsupported escape"),
    (b"/f 0 100644 1 0 0 0 0.0 a\\x4 - -\n", "hex escape"),
    (b"/f 0 100644 1 0 0 0 0.0 a\\ - -\n", "no character after escape"),
    (b"/x/f 0 100644 1 0 0 0 0.0 - - -\n", "parent directory missing"),
    (b"/f 0 100644 1 0 0 0 0.0 - - -\n/f 0 100644 1 0 0 0 0.0 - - -\n", "already exists"),
    (b"/f 0 @100644 1 0 0 0 0.0 /nowhere - -\n", "no target"),
    (b"/f 0 @100644 1 0 0 0 0.0 / - -\n", "hardlink to directory"),
    (b"/f 0 @100644 1 0 0 0 0.0 /f - -\n", "self-referential"),
    (b"/a 0 @100644 1 0 0 0 0.0 /b - -\n/b 0 @100644 1 0 0 0 0.0 /a - -\n", "cycle"),
    (b"/d 0 @40755 1 0 0 0 0.0 / - -\n", "directories can't be hardlinked"),
    (b"/f\x00 0 100644 1 0 0 0 0.0 - - -\n", "NUL"),
    (b"/f 0 100644 1 0 0 0 0.0 - -\n", "expected at least 11 fields"),
])
def test_malformed_line_is_rejected_naming_line_and_problem(line: bytes, problem: str) -> None:
    with pytest.raises(DumpfileError) as e:
        parse(ROOT + line)
    assert problem in str(e.value)
    assert str(e.value).startswith("line ")


@pytest.mark.parametrize("strict", [True, False])
def test_negative_mtime_is_a_time_before_1970(strict: bool) -> None:
    text = ROOT + b"/f 0 100644 1 0 0 0 -14182940.500000000 - - -\n"
    node = parse(text, strict=strict).children[b"f"]
    assert (node.mtime_sec, node.mtime_nsec) == (-14182940, 500_000_000)
    assert dumpfile.dumps(parse(text)) == text


@pytest.mark.parametrize("mtime", [b"-9223372036854775809.0", b"9223372036854775808.0",
                                   # the reference's strtoull wraps this to -1; we refuse it
                                   b"18446744073709551615.0"])
def test_mtime_outside_64_signed_bits_is_rejected(mtime: bytes) -> None:
    with pytest.raises(DumpfileError, match="^line 2: /f: mtime .* out of range"):
        parse(ROOT + b"/f 0 100644 1 0 0 0 " + mtime + b" - - -\n", strict=False)


@pytest.mark.parametrize("mtime", [b"--1.0", b"-.0", b"1.-1", b"+1.0"])
def test_malformed_signed_mtime_is_rejected(mtime: bytes) -> None:
    with pytest.raises(DumpfileError, match="invalid mtime"):
        parse(ROOT + b"/f 0 100644 1 0 0 0 " + mtime + b" - - -\n")


@pytest.mark.parametrize("line, problem", [
    (b"/l 0 120777 1 0 0 0 0.0 - - -\n", "/l: symlink with an empty target"),
    (b"/l 4096 120777 1 0 0 0 0.0 " + b"a" * 4096 + b" - -\n", "/l: symlink target longer than 4095"),
    (b"/l 3 120777 1 0 0 0 0.0 a\\x00b - -\n", "/l: symlink target or payload contains NUL"),
    (b"/f 0 100644 1 4294967296 0 0 0.0 - - -\n", "/f: uid 4294967296 out of range"),
    (b"/f 0 100644 1 0 0 0 0.1000000000 - - -\n", "/f: mtime nanoseconds 1000000000 out of range"),
    (b"/c 0 20644 1 0 0 4294967296 0.0 - - -\n", "/c: device number 4294967296 out of range"),
])
def test_entry_the_tree_cannot_hold_is_rejected_in_both_modes(line: bytes, problem: str) -> None:
    for strict in (True, False):
        with pytest.raises(DumpfileError, match="^line 2: " + re.escape(problem)):
            parse(ROOT + line, strict=strict)


def test_error_names_the_line_number() -> None:
    with pytest.raises(DumpfileError, match="^line 3: "):
        parse(ROOT + b"/a 0 100644 1 0 0 0 0.0 - - -\n/b 0 1 1 0 0 0 0.0 - - -\n")


def test_first_line_must_be_the_root() -> None:
    with pytest.raises(DumpfileError, match="root"):
        parse(b"/a 0 100644 1 0 0 0 0.0 - - -\n")
    with pytest.raises(DumpfileError, match="no root"):
        parse(b"")


def test_lenient_mode_accepts_what_strict_refuses() -> None:
    root = parse(ROOT + b"/f 0 100644 1 0 0 5 0.0 - - -\n/l 9 120777 1 0 0 0 0.0 abcd - -", strict=False)
    assert root.children[b"f"].rdev == 0
    assert root.children[b"l"].size == 4


def test_duplicate_xattr_keeps_the_last_value() -> None:
    node = parse(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - user.a=1 user.a=2\n").children[b"f"]
    assert node.xattrs == {b"user.a": b"2"}


def test_xattrs_over_the_per_file_budget_are_rejected() -> None:
    big = b" ".join(b"user.k%d=%s" % (i, b"v" * 4000) for i in range(9))
    with pytest.raises(DumpfileError, match="xattrs too large"):
        parse(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - " + big + b"\n")


def test_lookup_finds_nested_entries() -> None:
    root = parse(ROOT + b"/d 0 40755 2 0 0 0 0.0 - - -\n/d/f 0 100644 1 0 0 0 0.0 - - -\n")
    assert lookup(root, b"/d/f") is root.children[b"d"].children[b"f"]
    assert lookup(root, b"/d/f/x") is None


@pytest.mark.parametrize("vector", [v for v in VALID if v.strict], ids=lambda v: v.name)
def test_external_digests_are_those_of_the_parsed_tree(vector) -> None:
    from cfsdeploy.repo.repository import objects_of

    assert dumpfile.external_digests(vector.data) == objects_of(dumpfile.parse(vector.data))


@pytest.mark.parametrize("vector", [v for v in VALID if v.strict], ids=lambda v: v.name)
def test_partial_parse_keeps_wanted_entries_ancestors_and_link_targets(vector) -> None:
    from cfsdeploy.composefs.tree import walk

    full = {p: e for p, e in walk(dumpfile.parse(vector.data))}
    wanted = sorted(full)[len(full) // 2:]
    pattern = b"|".join(re.escape(dumpfile.escape(p)) for p in wanted)
    part = {p: e for p, e in walk(dumpfile.parse_paths(vector.data, pattern))}
    assert set(wanted) <= set(part)
    for p, e in part.items():
        a, b = (x.target if hasattr(x, "target") else x for x in (e, full[p]))
        assert (a.mode, a.size, a.digest, a.payload, a.xattrs) == (b.mode, b.size, b.digest, b.payload, b.xattrs)
