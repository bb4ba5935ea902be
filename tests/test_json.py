"""The --json documents: schema 1, and exactly the keys docs/json.md documents."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cfsdeploy.boot.bootloader import BootEntry
from cfsdeploy.sysroot.booted import RECORD_ENV
from cfsdeploy.sysroot.deploy import deploy
from cfsdeploy.sysroot.layout import Sysroot

from .sysroots import BRANCH, OS, ROOT_KARGS, boot_mount, commit_tree, make_os_tree
from .test_recover import interrupt_a_switch

DOC = Path(__file__).parent.parent / "docs/json.md"


def documented(command: str) -> dict[str, set[str]]:
    """The keys of each object of a command's section of docs/json.md, by heading."""
    text = DOC.read_text()
    section = text.split(f"## `cfsdeploy {command} --json`\n", 1)[1].split("\n## ", 1)[0]
    tables = {}
    for part in section.split("\n### ")[1:]:
        heading, _, body = part.partition("\n")
        tables[heading.strip()] = set(re.findall(r"^\| `(\w+)` \|", body, re.M))
    return tables


@pytest.fixture
def machine(tmp_path: Path):
    root = tmp_path / "sysroot"
    with boot_mount(root / "boot"):
        s = Sysroot.init(str(root), OS, karg_list=ROOT_KARGS)
        yield SimpleNamespace(sysroot=s, root=root, boot=root / "boot", tmp=tmp_path, tree=tmp_path / "tree")


def release(m: SimpleNamespace, version: str) -> None:
    make_os_tree(m.tree, version=version)
    commit_tree(m.sysroot, m.tree, version=version)


def status_json(m: SimpleNamespace) -> dict[str, object]:
    env = dict(os.environ, CFSDEPLOY_SYSROOT=str(m.root), CFSDEPLOY_CMDLINE=str(m.tmp / "cmdline"),
               **{RECORD_ENV: str(m.tmp / "booted")})
    p = subprocess.run([sys.executable, "-m", "cfsdeploy.cli", "status", "--json"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert isinstance(doc, dict)
    return doc


def test_status_json_has_schema_1_and_exactly_the_documented_keys(machine: SimpleNamespace) -> None:
    """A machine booted into its default, with a rollback, a staged deployment, an entry
    that names no deployment and a damaged one: every object status --json has."""
    release(machine, "1")
    deploy(machine.sysroot, BRANCH, os_name=OS)
    release(machine, "2")
    deploy(machine.sysroot, BRANCH, os_name=OS)
    (machine.tmp / "cmdline").write_text(machine.sysroot.state(OS).entries[0].options + "\n")
    release(machine, "3")
    deploy(Sysroot(str(machine.root), cmdline=(machine.tmp / "cmdline").read_text()), BRANCH, os_name=OS,
           stage=True)
    entries = machine.boot / "loader/entries"
    e = machine.sysroot.state(OS).entries[0]
    nowhere = re.sub(r"cfsdeploy=\S+", f"cfsdeploy=/cfsdeploy/deploy/{OS}/0123456789ab.0", e.options)
    for index, options, extra in ((7, nowhere, b""), (8, e.options, b"linux /evil\n")):
        entry = BootEntry(OS, index, e.title, e.linux, e.initrd, options)
        (entries / entry.filename).write_bytes(entry.render() + extra)
    doc = status_json(machine)
    keys = documented("status")
    assert doc["schema"] == 1 and list(doc)[0] == "schema"
    assert set(doc) == keys["status"]
    deployments, staged, verity = doc["deployments"], doc["staged"], doc["booted_verity"]
    assert isinstance(deployments, list) and isinstance(staged, dict) and isinstance(verity, dict)
    assert len(deployments) == 2 and deployments[0]["booted"] is True
    for d in deployments:
        assert set(d) == keys["deployment status"] | keys["deployment"]
        assert set(d["origin"]) == keys["origin"]
        assert re.fullmatch(r"[0-9a-f]{64}", d["image_digest"]) and d["created"].endswith("+00:00")
    assert set(staged) == keys["staged"] and staged["state"] == "pending"
    assert set(staged["deployment"]) == keys["deployment"]
    assert set(verity) == keys["booted verity"] and isinstance(verity["verified"], bool)
    assert [set(e) for e in doc["broken_entries"]] == [keys["broken entry"]]
    assert [set(e) for e in doc["damaged"]] == [keys["damaged record"]]
    assert doc["repairs"] == []


def test_status_json_repairs_have_exactly_the_documented_keys(machine: SimpleNamespace) -> None:
    release(machine, "1")
    deploy(machine.sysroot, BRANCH, os_name=OS)
    interrupt_a_switch(machine)
    doc = status_json(machine)
    assert doc["schema"] == 1
    assert [set(r) for r in doc["repairs"]] == [documented("status")["repair"]]  # type: ignore[union-attr]
