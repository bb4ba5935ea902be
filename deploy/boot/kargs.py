"""Kernel command lines: cfsdeploy's own arguments, and the user's edits to the rest.

One reading of a command line everywhere (the user's arguments, an entry's options
line, /proc/cmdline): the kernel's own, lib/cmdline.c next_arg().  Words split at
whitespace outside double quotes; a quote opens or closes anywhere in a word; the
quotes around a whole word, or around a value (`key="a b"`), are not part of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..util.errors import UsageError

DEPLOYMENT = "cfsdeploy"
DIGEST = "cfsdeploy.digest"
VERITY = "cfsdeploy.verity"
VERITY_MODES = ("require", "try", "off")
OWN = (DEPLOYMENT, DIGEST, VERITY)
# The kernel's isspace() in ASCII (it also counts Latin-1 0xa0: arguments are ASCII only).
SPACE = " \t\n\v\f\r"
# One argument, and a whole command line: x86's COMMAND_LINE_SIZE is 2048, less room for
# what boot loaders add (GRUB's BOOT_IMAGE=...); beyond it the kernel cuts silently.
# cfsdeploy's own three arguments take at most OWN_MAX of it.
MAX_ARG = 1024
MAX_LINE = 1792
OWN_MAX = 256
# Printable ASCII, a space only inside quotes (checked apart); no ' or \, which
# systemd's reading of the command line (extract_first_word) takes as quotes and
# escapes where the kernel does not.
_ARG_CHARS = re.compile(r"[\x21\x23-\x26\x28-\x5b\x5d-\x7e \"]+")


class KargsError(UsageError):
    pass


def split(cmdline: str) -> list[str]:
    """The words of a command line, as the kernel's next_arg() splits them."""
    words = []
    i, n = 0, len(cmdline)
    while i < n:
        if cmdline[i] in SPACE:
            i += 1
            continue
        start, quoted = i, False
        while i < n and (quoted or cmdline[i] not in SPACE):
            quoted ^= cmdline[i] == '"'
            i += 1
        words.append(cmdline[start:i])
    return words


def param(word: str) -> tuple[str, str | None]:
    """A word's key and value (None without '='), quotes removed as next_arg() does."""
    quoted = word.startswith('"')
    body = word[1:] if quoted else word
    eq = body.find("=", 1)  # next_arg() takes '=' at the word's first place for "none"
    if eq < 0:
        return (body[:-1] if quoted and body.endswith('"') else body), None
    k, v = body[:eq], body[eq + 1:]
    if v.startswith('"'):
        v = v[1:]
        quoted = True
    if quoted and v.endswith('"'):
        v = v[:-1]
    return k, v


def key(word: str) -> str:
    return param(word)[0]


def value(args: list[str], name: str) -> str | None:
    """The value of the last `name=` argument (the last one wins, in the kernel and in
    the initramfs hook alike)."""
    found = None
    for a in args:
        k, v = param(a)
        if k == name and v is not None:
            found = v
    return found


def check(arg: object) -> str:
    """A kernel argument fit to be written into a boot entry, or KargsError."""
    if not isinstance(arg, str):
        raise KargsError(f"a kernel argument must be text, not {arg!r}")
    if not arg or len(arg) > MAX_ARG or not _ARG_CHARS.fullmatch(arg):
        raise KargsError(f"invalid kernel argument {arg!r}: 1 to {MAX_ARG} printable ASCII "
                         "characters, without ' or \\")
    if arg.count('"') % 2 or split(arg) != [arg]:
        raise KargsError(f"invalid kernel argument {arg!r}: one word, spaces only inside "
                         "balanced double quotes")
    if param(arg) == ("--", None):
        raise KargsError("kernel argument '--' would hand what follows it, cfsdeploy's own "
                         "arguments included, to init")
    # However the quotes are read (the kernel's way, or the initramfs shell's word
    # splitting, which ignores them), no piece may be one of cfsdeploy's own.
    for piece in arg.replace('"', " ").split():
        if piece.partition("=")[0] in OWN:
            raise KargsError(f"{piece.partition('=')[0]}= is set by cfsdeploy, not by hand "
                             f"(in {arg!r})")
    return arg


def check_line(args: list[str]) -> list[str]:
    """Arguments whose command line, with cfsdeploy's own appended, the kernel reads whole."""
    if len(" ".join(args)) > MAX_LINE - OWN_MAX:
        raise KargsError(f"the kernel arguments are {len(' '.join(args))} characters long; "
                         f"at most {MAX_LINE - OWN_MAX} fit beside cfsdeploy's own")
    return args


def _partition_unquoted(text: str) -> tuple[str, str, str]:
    """text.partition("=") at the first '=' outside double quotes."""
    quoted = False
    for i, c in enumerate(text):
        if c == '"':
            quoted = not quoted
        elif c == "=" and not quoted:
            return text[:i], "=", text[i + 1:]
    return text, "", ""


def edit(args: list[str], *, append: tuple[str, ...] = (), delete: tuple[str, ...] = (),
         replace: tuple[str, ...] = ()) -> list[str]:
    """Apply the user's edits.  `delete` takes `key` (every value) or `key=value`;
    `replace` takes `key=old=new` or `key=new` (every value of key).  Every argument of
    the result is checked, those kept from before included."""
    out = [a for a in args if key(a) not in OWN]
    for d in delete:
        before = len(out)
        out = [a for a in out if a != d and (("=" in d) or key(a) != d)]
        if len(out) == before:
            raise KargsError(f"no kernel argument {d!r} to delete")
    for r in replace:
        k, sep, rest = _partition_unquoted(r)
        if not sep:
            raise KargsError(f"a replacement is key=new or key=old=new, not {r!r}")
        old, sep2, new = _partition_unquoted(rest)
        if sep2:
            targets = [i for i, a in enumerate(out) if a == f"{k}={old}"]
            replacement = check(f"{k}={new}")
        else:
            targets = [i for i, a in enumerate(out) if key(a) == k]
            replacement = check(r)
        if not targets:
            raise KargsError(f"no kernel argument {k!r} to replace")
        for i in targets:
            out[i] = replacement
    for a in out:  # what was on the command line before, too
        try:
            check(a)
        except KargsError as e:
            raise KargsError(f"{e}; it is on the command line now",
                             hint="remove it with `cfsdeploy kargs --delete`, or `deploy --karg-delete`") from None
    return check_line(out + [check(a) for a in append])


@dataclass(frozen=True)
class Own:
    """cfsdeploy's three arguments on a command line."""
    deployment: str
    digest: str
    verity: str

    def args(self) -> list[str]:
        return [f"{DEPLOYMENT}={self.deployment}", f"{DIGEST}={self.digest}", f"{VERITY}={self.verity}"]


def own(args: list[str]) -> Own | None:
    dep, digest = value(args, DEPLOYMENT), value(args, DIGEST)
    if dep is None or digest is None:
        return None
    return Own(dep, digest, value(args, VERITY) or "require")
