"""Kernel command lines: one reading (the kernel's next_arg()), and every argument checked
before it goes into a boot entry."""

from __future__ import annotations

import pytest

from cfsdeploy.boot import kargs
from cfsdeploy.boot.kargs import KargsError, check, edit, param, split, value


def test_words_split_at_whitespace_outside_double_quotes() -> None:
    assert split(' a="b  c"\td "e f"g=h x=y"1 2"z ') == ['a="b  c"', "d", '"e f"g=h', 'x=y"1 2"z']


def test_an_unclosed_quote_runs_to_the_end_of_the_line() -> None:
    assert split('a="b c d') == ['a="b c d']


@pytest.mark.parametrize("word, read", [
    ("a=b", ("a", "b")),
    ('a="b c"', ("a", "b c")),
    ('"a=b c"', ("a", "b c")),
    ('a=b"c d"e', ("a", 'b"c d"e')),
    ('"quiet"', ("quiet", None)),
    ("quiet", ("quiet", None)),
    ("a=b=c", ("a", "b=c")),
])
def test_quotes_around_a_value_or_a_whole_word_are_not_part_of_it(word, read) -> None:
    assert param(word) == read


def test_the_last_value_of_a_key_wins() -> None:
    assert value(split('cfsdeploy=/a x "cfsdeploy=/b"'), "cfsdeploy") == "/b"


def test_a_quoted_value_hides_nothing_from_the_reading() -> None:
    assert value(split('systemd.setenv="A=1 cfsdeploy=x" cfsdeploy=/real'), "cfsdeploy") == "/real"


@pytest.mark.parametrize("arg", ["console=ttyS0\nlinux /evil", "a\rb", "a\tb", "a\0b", "a\x1bb", "a\x7f"])
def test_argument_with_a_control_character_is_refused(arg) -> None:
    with pytest.raises(KargsError, match="printable ASCII"):
        check(arg)


@pytest.mark.parametrize("arg", ["a b", 'a="b', 'a="b c" d', '"'])
def test_argument_of_more_than_one_word_or_with_an_unbalanced_quote_is_refused(arg) -> None:
    with pytest.raises(KargsError, match="one word"):
        check(arg)


@pytest.mark.parametrize("arg", ["a='b c'", "a=\\x", "a=é", "a=\xa0"])
def test_argument_the_kernel_and_systemd_read_differently_is_refused(arg) -> None:
    with pytest.raises(KargsError, match="printable ASCII"):
        check(arg)


@pytest.mark.parametrize("arg", [
    "cfsdeploy=/x", "cfsdeploy.digest=00", "cfsdeploy.verity=off", "cfsdeploy",
    '"cfsdeploy=/x"', 'cfsdeploy"=/x"', '"cfsdeploy"=/x', 'systemd.setenv="A=1 cfsdeploy=x"',
    'a="b cfsdeploy.verity=off"',
])
def test_cfsdeploy_own_arguments_are_refused_however_quoted(arg) -> None:
    with pytest.raises(KargsError, match="set by cfsdeploy"):
        check(arg)


@pytest.mark.parametrize("arg", ["--", '"--"'])
def test_double_dash_is_refused(arg) -> None:
    with pytest.raises(KargsError, match="to init"):
        check(arg)


def test_quoted_value_with_spaces_is_accepted() -> None:
    assert check('systemd.setenv="A=1 B=2"') == 'systemd.setenv="A=1 B=2"'


def test_too_long_argument_is_refused() -> None:
    with pytest.raises(KargsError, match="1 to 1024"):
        check("a=" + "x" * kargs.MAX_ARG)


def test_too_long_command_line_is_refused() -> None:
    with pytest.raises(KargsError, match="characters long"):
        edit([], append=tuple(f"a{i}=" + "x" * 500 for i in range(4)))


def test_replace_checks_the_new_value() -> None:
    with pytest.raises(KargsError, match="printable ASCII"):
        edit(["console=ttyS0"], replace=("console=ttyS0=ttyS1\nlinux /evil",))


def test_replace_of_every_value_checks_it_too() -> None:
    with pytest.raises(KargsError, match="set by cfsdeploy"):
        edit(["a=1"], replace=('a="x cfsdeploy=/evil"',))


def test_replace_reads_an_equals_sign_in_quotes_as_part_of_the_value() -> None:
    assert edit(["a=1", "b"], replace=('a="x=y"',)) == ['a="x=y"', "b"]
    assert edit(['a="x=y"'], replace=('a="x=y"=2',)) == ["a=2"]


def test_a_bad_argument_kept_from_before_is_refused_with_the_way_out() -> None:
    with pytest.raises(KargsError, match="printable ASCII.*on the command line now") as info:
        edit(["quiet", "a\nb"], append=("rw",))
    assert "kargs --delete" in (info.value.hint or "")


def test_deleting_the_bad_argument_kept_from_before_mends_the_line() -> None:
    assert edit(["quiet", "a'b"], delete=("a'b",)) == ["quiet"]
