"""What a crash or a power cut leaves in the boot directory is repaired by the next
cfsdeploy command, and `status` says what it repaired."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cfsdeploy.boot import bootloader
from cfsdeploy.boot.bootloader import Plan, RepairKind
from cfsdeploy.sysroot.deploy import deploy
from cfsdeploy.sysroot.entries import recover
from cfsdeploy.sysroot.layout import Sysroot

from .sysroots import BRANCH, OS, ROOT_KARGS, boot_mount, commit_tree, make_os_tree


@pytest.fixture
def machine(tmp_path):
    root = tmp_path / "sysroot"
    with boot_mount(root / "boot"):
        s = Sysroot.init(str(root), OS, karg_list=ROOT_KARGS)
        commit_tree(s, make_os_tree(tmp_path / "tree"))
        deploy(s, BRANCH, os_name=OS)
        yield SimpleNamespace(sysroot=s, root=root, boot=root / "boot")


def status(m, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cfsdeploy.cli", "status", "--sysroot", str(m.root), *args],
                          capture_output=True, text=True)


def interrupt_a_switch(m) -> Plan:
    """What a power cut right after recording a switch leaves: the record, and the
    boot directory as it was (the default's entry retitled, under a new number)."""
    [old] = m.sysroot.state(OS).entries
    [new] = bootloader.number([bootloader.BootEntry(old.os, 0, "retitled", old.linux, old.initrd, old.options)],
                              [old])
    plan = Plan(OS, [(new.filename, new.render())], [old.id])
    Path(m.sysroot.switch_record).write_text(json.dumps(plan.to_json()))
    return plan


def test_status_finishes_an_interrupted_switch_and_says_so(machine) -> None:
    interrupt_a_switch(machine)
    r = status(machine)
    assert r.returncode == 0
    assert "repaired: finished an interrupted switch of the boot entries" in r.stderr
    assert [e.title for e in machine.sysroot.state(OS).entries] == ["retitled"]
    assert not os.path.exists(machine.sysroot.switch_record)


def test_status_json_lists_the_repairs(machine) -> None:
    interrupt_a_switch(machine)
    doc = json.loads(status(machine, "--json").stdout)
    assert [r["kind"] for r in doc["repairs"]] == ["finished_switch"]


def test_status_with_nothing_to_repair_takes_no_lock(machine) -> None:
    with machine.sysroot.lock():
        r = status(machine, "--wait-lock", "0")
    assert r.returncode == 0 and "repaired" not in r.stderr


def test_a_change_repairs_first_and_says_so(machine) -> None:
    interrupt_a_switch(machine)
    r = subprocess.run([sys.executable, "-m", "cfsdeploy.cli", "kargs", "--append", "quiet",
                        "--sysroot", str(machine.root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "repaired: finished an interrupted switch" in r.stderr
    [e] = machine.sysroot.state(OS).entries
    assert e.title == "retitled" and "quiet" in e.options.split()


def test_a_torn_kernel_an_entry_names_is_put_back(machine) -> None:
    [e] = machine.sysroot.state(OS).entries
    k = bootloader.kernel_of(e)
    assert k is not None
    kdir = machine.boot / k.relpath
    good = (kdir / "initramfs.img").read_bytes()
    os.unlink(kdir / "complete")
    (kdir / "initramfs.img").write_bytes(good[:100])
    repairs = recover(machine.sysroot)
    assert [r.kind for r in repairs] == [RepairKind.REINSTALLED_KERNEL]
    assert (kdir / "initramfs.img").read_bytes() == good


def test_a_damaged_switch_record_is_set_aside_not_acted_on(machine) -> None:
    Path(machine.sysroot.switch_record).write_text("{not json")
    r = status(machine)
    assert r.returncode == 0
    assert "set a damaged switch record aside" in r.stderr
    assert os.path.exists(machine.sysroot.switch_record + ".damaged")
    assert len(machine.sysroot.state(OS).entries) == 1
