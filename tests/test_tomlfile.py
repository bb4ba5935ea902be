"""TOML writer: what it writes, tomllib reads back unchanged."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cfsdeploy.util.tomlfile import dumps

keys = st.text(min_size=1, max_size=12)
scalars = st.one_of(st.booleans(), st.integers(min_value=-2**63, max_value=2**63 - 1), st.text(max_size=30))
values = st.one_of(scalars, st.lists(st.text(max_size=10), max_size=4), st.lists(st.integers(0, 99), max_size=3))
tables = st.recursive(st.dictionaries(keys, values, max_size=4),
                      lambda inner: st.dictionaries(keys, st.one_of(values, inner), max_size=4), max_leaves=12)


@given(st.dictionaries(keys, tables, max_size=4))
def test_round_trips_through_tomllib(doc) -> None:
    assert tomllib.loads(dumps(doc)) == doc


def test_writes_tables_in_order_with_bare_and_quoted_keys() -> None:
    doc = {"core": {"repo-version": 1}, "remote": {"origin": {"url": "http://h/r", "gpg-verify": True},
                                                  "my remote": {"branches": ["a", "b"]}}}
    assert dumps(doc) == (
        "[core]\nrepo-version = 1\n\n"
        '[remote.origin]\nurl = "http://h/r"\ngpg-verify = true\n\n'
        '[remote."my remote"]\nbranches = ["a", "b"]\n')


def test_header_and_comments_are_written_as_toml_comments() -> None:
    text = dumps({"boot": {"verity": "require"}}, header="settings\nof a sysroot",
                 comments={"boot.verity": "require | try | off"})
    assert text == '# settings\n# of a sysroot\n[boot]\nverity = "require"  # require | try | off\n'
    assert tomllib.loads(text) == {"boot": {"verity": "require"}}


def test_escapes_control_characters_and_quotes() -> None:
    s = 'a"b\\c\nd\x01\x7f#e'
    assert tomllib.loads(dumps({"t": {"s": s}}))["t"]["s"] == s


def test_empty_tables_are_kept() -> None:
    assert tomllib.loads(dumps({"a": {}, "b": {"c": {}}})) == {"a": {}, "b": {"c": {}}}


@pytest.mark.parametrize("bad", [1.5, None, [{"x": 1}], b"bytes"])
def test_refuses_values_it_cannot_write(bad) -> None:
    with pytest.raises(TypeError):
        dumps({"t": {"v": bad}})
