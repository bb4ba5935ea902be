"""Kernel command lines: cfsdeploy's own arguments, and the user's edits to the rest."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import CfsError

DEPLOYMENT = "cfsdeploy"
DIGEST = "cfsdeploy.digest"
VERITY = "cfsdeploy.verity"
VERITY_MODES = ("require", "try", "off")
OWN = (DEPLOYMENT, DIGEST, VERITY)


class KargsError(CfsError):
    pass


def split(cmdline: str) -> list[str]:
    """Words of a command line; double quotes group (`a="b c"`), as the kernel reads them."""
    return re.findall(r'(?:[^\s"]|"[^"]*")+', cmdline)


def key(arg: str) -> str:
    return arg.partition("=")[0]


def value(args: list[str], name: str) -> str | None:
    """The value of the last `name=` argument (the kernel's rule when one repeats)."""
    found = None
    for a in args:
        k, sep, v = a.partition("=")
        if k == name and sep:
            found = v.strip('"')
    return found


def check(arg: str) -> str:
    if split(arg) != [arg]:
        raise KargsError(f"invalid kernel argument {arg!r}")
    if key(arg) in OWN:
        raise KargsError(f"{key(arg)}= is set by cfsdeploy, not by hand")
    return arg


def edit(args: list[str], *, append: tuple[str, ...] = (), delete: tuple[str, ...] = (),
         replace: tuple[str, ...] = ()) -> list[str]:
    """Apply the user's edits.  `delete` takes `key` (every value) or `key=value`;
    `replace` takes `key=old=new` or `key=new` (every value of key)."""
    out = [a for a in args if key(a) not in OWN]
    for d in delete:
        before = len(out)
        out = [a for a in out if a != d and (("=" in d) or key(a) != d)]
        if len(out) == before:
            raise KargsError(f"no kernel argument {d!r} to delete")
    for r in replace:
        k, sep, rest = r.partition("=")
        if not sep:
            raise KargsError(f"--replace wants key=new or key=old=new, not {r!r}")
        old, sep2, new = rest.partition("=")
        if sep2:
            targets = [i for i, a in enumerate(out) if a == f"{k}={old}"]
            replacement = f"{k}={new}"
        else:
            targets = [i for i, a in enumerate(out) if key(a) == k]
            replacement = check(r)
        if not targets:
            raise KargsError(f"no kernel argument {k!r} to replace")
        for i in targets:
            out[i] = replacement
    for a in append:
        out.append(check(a))
    return out


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
