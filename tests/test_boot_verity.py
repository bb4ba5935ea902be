"""`status` says plainly whether the files of the booted deployment are checked as they
are read: from the boot hook's record (/run/cfsdeploy-booted) and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from cfsdeploy.boot.kargs import split
from cfsdeploy.sysroot.booted import RECORD_ENV, Reason, boot_verity
from cfsdeploy.sysroot.deploy import deploy
from cfsdeploy.sysroot.layout import Sysroot

from .sysroots import BRANCH, OS, ROOT_KARGS, boot_mount, commit_tree, make_os_tree

PATH = f"/cfsdeploy/deploy/{OS}/x"
DIGEST = "ab" * 32


def args(verity: str | None, path: str = PATH) -> list[str]:
    line = f"root=/dev/vda2 cfsdeploy={path} cfsdeploy.digest={DIGEST}"
    return split(line + (f" cfsdeploy.verity={verity}" if verity else ""))


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "booted"
    monkeypatch.setenv(RECORD_ENV, str(path))
    return path


def write(record: Path, verity: str, fs_verity: str, path: str = PATH, sealed: str = "no") -> None:
    record.write_text(f"deployment={path} digest={DIGEST} verity={verity} fs-verity={fs_verity} sealed={sealed}\n")


def test_try_recorded_by_an_older_hook_with_fs_verity_is_verified(record: Path) -> None:
    write(record, "try", "yes")  # that hook mounted the overlay with verity=on
    assert boot_verity(args("try")).verified


def test_try_is_not_verified(record: Path) -> None:
    write(record, "try", "no")
    v = boot_verity(args("try"))
    assert (v.verified, v.reason, v.mode) == (False, Reason.UNMEASURED, "try")


def test_try_without_a_record_is_not_verified(record: Path) -> None:
    v = boot_verity(args("try"))
    assert (v.verified, v.reason) == (False, Reason.NO_RECORD)


def test_off_is_not_verified(record: Path) -> None:
    v = boot_verity(args("off"))
    assert (v.verified, v.reason, v.mode) == (False, Reason.UNMEASURED, "off")


@pytest.mark.parametrize("verity", ["require", None])
def test_require_is_verified_without_a_record(record: Path, verity: str | None) -> None:
    assert boot_verity(args(verity)).verified


def test_record_of_an_older_hook_without_sealed_is_read(record: Path) -> None:
    record.write_text(f"deployment={PATH} digest={DIGEST} verity=try fs-verity=yes\n")
    assert boot_verity(args("try")).verified


def test_record_of_a_sealed_boot_is_matched_by_its_image(record: Path) -> None:
    # The sealed command line names no deployment; fs-verity=no shows the record is what counts.
    write(record, "require", "no", sealed="yes")
    v = boot_verity(split(f"root=LABEL=root cfsdeploy.digest={DIGEST} cfsdeploy.verity=require"))
    assert (v.verified, v.reason) == (False, Reason.UNMEASURED)


def test_record_of_another_deployment_is_ignored(record: Path) -> None:
    write(record, "try", "yes", path=f"/cfsdeploy/deploy/{OS}/other")
    assert not boot_verity(args("try")).verified


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"deployment=x digest=y verity=try fs-verity=maybe\n",
                                     b"deployment=x digest=y verity=try fs-verity=no sealed=maybe\n",
                                     b"deployment=x digest=y verity=try fs-verity=no sealed=no extra=1\n",
                                     b"\xff\xfe"])
def test_damaged_record_is_not_verified(record: Path, content: bytes) -> None:
    record.write_bytes(content)
    v = boot_verity(args("try"))
    assert (v.verified, v.reason) == (False, Reason.RECORD_DAMAGED) and v.message


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[SimpleNamespace]:
    root = tmp_path / "sysroot"
    with boot_mount(root / "boot"):
        s = Sysroot.init(str(root), OS, karg_list=ROOT_KARGS)
        commit_tree(s, make_os_tree(tmp_path / "tree"))
        d = deploy(s, BRANCH, os_name=OS).deployment
        yield SimpleNamespace(root=root, tmp=tmp_path, deployment=d)


def status(m: SimpleNamespace, verity: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`status` as the machine booted into the deployment with cfsdeploy.verity=verity sees it."""
    d = m.deployment
    (m.tmp / "cmdline").write_text(f"cfsdeploy={d.path} cfsdeploy.digest={d.image_digest} "
                                   f"cfsdeploy.verity={verity}\n")
    env = dict(os.environ, CFSDEPLOY_SYSROOT=str(m.root), CFSDEPLOY_CMDLINE=str(m.tmp / "cmdline"),
               **{RECORD_ENV: str(m.tmp / "booted")})
    return subprocess.run([sys.executable, "-m", "cfsdeploy.cli", "status", *extra], env=env,
                          capture_output=True, text=True)


def test_status_warns_that_the_booted_deployment_is_not_verified(machine: SimpleNamespace) -> None:
    p = status(machine, "off")
    assert p.returncode == 0, p.stderr
    assert "    Verity:  NOT VERIFIED: cfsdeploy.verity=off" in p.stdout
    assert p.stderr.startswith(f"WARNING: the booted deployment {machine.deployment.name} is NOT VERIFIED: ")


def test_status_says_a_verified_boot_is_verified_and_warns_of_nothing(machine: SimpleNamespace) -> None:
    p = status(machine, "require")
    assert p.returncode == 0 and p.stderr == ""
    assert "    Verity:  verified: the kernel measured the image" in p.stdout


def test_status_json_has_the_booted_verity(machine: SimpleNamespace) -> None:
    d = machine.deployment
    (machine.tmp / "booted").write_text(f"deployment={d.path} digest={d.image_digest} verity=try fs-verity=no\n")
    got = json.loads(status(machine, "try", "--json").stdout)["booted_verity"]
    assert got == {"verified": False, "reason": "unmeasured", "mode": "try", "record": str(machine.tmp / "booted"),
                   "message": None}


def test_status_of_a_system_not_booted_into_a_deployment_says_nothing_of_verity(machine: SimpleNamespace) -> None:
    (machine.tmp / "cmdline").write_text("quiet\n")
    env = dict(os.environ, CFSDEPLOY_SYSROOT=str(machine.root), CFSDEPLOY_CMDLINE=str(machine.tmp / "cmdline"))
    p = subprocess.run([sys.executable, "-m", "cfsdeploy.cli", "status", "--json"], env=env,
                       capture_output=True, text=True)
    assert json.loads(p.stdout)["booted_verity"] is None
