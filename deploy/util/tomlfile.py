"""Writing TOML for humans: the settings files (tomllib reads them back).

Only what cfsdeploy's settings hold: tables (nested as [a.b]) of strings,
integers, booleans and lists of those, in the order given, with optional end-of-line
comments.  tomllib.loads(dumps(doc)) == doc for every document dumps accepts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

Value = str | int | bool | list[str] | list[int] | list[bool]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _key(k: str) -> str:
    if not isinstance(k, str):
        raise TypeError(f"TOML keys are strings, not {type(k).__name__}")
    return k if _BARE_KEY.fullmatch(k) else _string(k)


def _value(v: object) -> str:
    # bool before int: bool is a subclass of int.
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in v if _scalar(item)) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _scalar(v: object) -> bool:
    if isinstance(v, (bool, int, str)):
        return True
    raise TypeError(f"TOML lists here hold strings, integers or booleans, not {type(v).__name__}")


def dumps(doc: Mapping[str, object], *, header: str | None = None,
          comments: Mapping[str, str] | None = None) -> str:
    """The TOML text of doc.  `header` becomes comment lines on top; `comments` maps
    dotted key paths ("boot.verity") to end-of-line comments."""
    comments = comments or {}
    out: list[str] = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    body_start = len(out)

    def table(path: list[str], t: Mapping[str, object]) -> None:
        scalars = [(k, v) for k, v in t.items() if not isinstance(v, Mapping)]
        subtables = [(k, v) for k, v in t.items() if isinstance(v, Mapping)]
        # A table with only subtables needs no header of its own: theirs define it.
        if path and (scalars or not subtables):
            if len(out) > body_start:
                out.append("")
            out.append("[" + ".".join(_key(p) for p in path) + "]")
        for k, v in scalars:
            line = f"{_key(k)} = {_value(v)}"
            note = comments.get(".".join([*path, k]))
            out.append(f"{line}  # {note}" if note else line)
        for k, v in subtables:
            table([*path, k], v)

    table([], doc)
    return "\n".join(out) + "\n"
