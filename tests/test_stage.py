"""Staged deployments: written now, made bootable at shutdown by finalize_staged, with
/etc merged again so edits made in between are kept (OSTree's `deploy --stage`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cfsdeploy.sysroot import staged
from cfsdeploy.sysroot.cleanup import cleanup
from cfsdeploy.sysroot.cmdline import set_kargs
from cfsdeploy.sysroot.deploy import DeployResult, FinalizeUnit
from cfsdeploy.sysroot.deployment import Origin
from cfsdeploy.sysroot.finalize import DiscardReason, finalize_staged
from cfsdeploy.sysroot.layout import StagedState, staged_status
from cfsdeploy.sysroot.rollback import rollback, undeploy
from cfsdeploy.sysroot.upgrade import UpgradeOutcome, upgrade
from cfsdeploy.util.errors import CommandError

from .sysroots import BRANCH, OS, commit_tree, make_os_tree
from .test_deploy import aside, booted_into, cli, deploy, entries_files, machine, names, new_version  # noqa: F401

UNIT = Path(__file__).parent.parent / "hooks/systemd" / staged.FINALIZE_UNIT


def os_dir(m) -> Path:
    return m.root / "cfsdeploy/deploy" / OS


def installed_and_booted(m) -> DeployResult:
    """A machine running its first deployment, with version 2 committed."""
    commit_tree(m.sysroot, m.tree)
    r = deploy(m)
    m.sysroot = booted_into(m)
    new_version(m, "2")
    return r


def stage(m, **kw) -> DeployResult:
    return deploy(m, stage=True, **kw)


def test_staging_leaves_the_entries_unchanged(machine) -> None:
    installed_and_booted(machine)
    before = entries_files(machine)
    r = stage(machine)
    assert r.staged and r.index == 0
    # Only the machine's own sysroot is finalized by the unit, at shutdown.
    assert r.finalize_unit == FinalizeUnit.NOT_DEFAULT_SYSROOT
    assert entries_files(machine) == before
    assert (os_dir(machine) / r.deployment.name / "etc/hostname").is_file()


def test_status_shows_the_staged_deployment(machine) -> None:
    installed_and_booted(machine)
    d = stage(machine).deployment
    s = staged_status(machine.sysroot, OS)
    assert s.deployment == d and s.state == StagedState.PENDING and s.record.default


def test_finalize_makes_it_the_default_and_keeps_the_rollback(machine) -> None:
    a = installed_and_booted(machine).deployment
    d = stage(machine, tries=2).deployment
    r = finalize_staged(machine.sysroot)
    assert r.deployment == d and r.index == 0 and r.merged_from == a
    assert names(machine) == [d.name, a.name]
    assert machine.sysroot.state(OS).entries[0].tries_left == 2
    assert staged_status(machine.sysroot, OS) is None


def test_finalized_entry_is_what_a_plain_deploy_writes(machine) -> None:
    installed_and_booted(machine)
    stage(machine)
    finalize_staged(machine.sysroot)
    finalized = machine.sysroot.state(OS).entries[0]
    deploy(machine)
    plain = machine.sysroot.state(OS).entries[0]
    assert finalized.title == plain.title and finalized.linux == plain.linux
    assert finalized.options.split()[:-3] == plain.options.split()[:-3]
    assert finalized.options.split()[-1] == plain.options.split()[-1]


def test_etc_edit_made_after_staging_reaches_the_finalized_deployment(machine) -> None:
    a = installed_and_booted(machine).deployment
    stage(machine)
    (os_dir(machine) / a.name / "etc/hostname").write_text("edited after staging\n")
    (os_dir(machine) / a.name / "etc/added-later").write_text("new\n")
    r = finalize_staged(machine.sysroot)
    etc = os_dir(machine) / r.deployment.name / "etc"
    assert (etc / "hostname").read_text() == "edited after staging\n"
    assert (etc / "added-later").read_text() == "new\n"
    assert (etc / "default/app").read_text() == "SETTING=2\n"
    assert r.etc.modified == [b"/etc/hostname"] and r.etc.added == [b"/etc/added-later"]
    assert not [p for p in os_dir(machine).iterdir() if p.name.startswith(".")]


def test_finalize_with_nothing_staged_does_nothing(machine) -> None:
    installed_and_booted(machine)
    before = entries_files(machine)
    assert finalize_staged(machine.sysroot) is None
    assert entries_files(machine) == before


def test_staging_twice_keeps_only_the_last(machine) -> None:
    installed_and_booted(machine)
    first = stage(machine).deployment
    make_os_tree(machine.tree, version="3", kernel_seed=b"k3")
    commit_tree(machine.sysroot, machine.tree, version="3")
    second = stage(machine)
    assert second.discarded == first.name
    assert first.name not in os.listdir(os_dir(machine))
    assert f"refs/deployments/{OS}/{first.name}" not in machine.sysroot.repo.git.references
    assert len(os.listdir(machine.boot / "cfsdeploy" / OS)) == 2  # the booted one's and the last's
    assert finalize_staged(machine.sysroot).deployment == second.deployment


def test_plain_deploy_discards_the_staged_one(machine) -> None:
    installed_and_booted(machine)
    s = stage(machine).deployment
    r = deploy(machine)
    assert r.discarded == s.name and staged_status(machine.sysroot, OS) is None
    assert s.name not in os.listdir(os_dir(machine))
    assert names(machine)[0] == r.deployment.name
    assert finalize_staged(machine.sysroot) is None


@pytest.mark.parametrize("change", [
    lambda s: rollback(s, OS),
    lambda s: undeploy(s, OS, 1),
    lambda s: set_kargs(s, OS, append=("quiet",)),
], ids=["rollback", "undeploy", "kargs"])
def test_a_change_of_the_entries_discards_the_staged_one(machine, change) -> None:
    commit_tree(machine.sysroot, machine.tree)
    deploy(machine)
    new_version(machine, "2")
    deploy(machine)
    new_version(machine, "3")
    s = stage(machine).deployment
    assert change(machine.sysroot).discarded == s.name
    assert s.name not in os.listdir(os_dir(machine)) and staged_status(machine.sysroot, OS) is None


def test_cleanup_keeps_the_staged_deployment(machine) -> None:
    installed_and_booted(machine)
    d = stage(machine)
    cleanup(machine.sysroot, OS)
    assert (os_dir(machine) / d.deployment.name / "deployment.json").is_file()
    assert (machine.boot / d.kernel.relpath / "vmlinuz").is_file()
    assert f"refs/deployments/{OS}/{d.deployment.name}" in machine.sysroot.repo.git.references
    assert machine.sysroot.repo.objects.has(bytes.fromhex(d.deployment.image_digest))
    assert finalize_staged(machine.sysroot).deployment == d.deployment


def test_no_default_staged_goes_after_the_default(machine) -> None:
    a = installed_and_booted(machine).deployment
    d = stage(machine, make_default=False).deployment
    st = staged_status(machine.sysroot, OS)
    assert st.state == StagedState.PENDING and not st.record.default
    assert finalize_staged(machine.sysroot).index == 1
    assert names(machine) == [a.name, d.name]


def test_record_naming_a_vanished_deployment_is_discarded_with_a_message(machine) -> None:
    installed_and_booted(machine)
    d = stage(machine).deployment
    before = entries_files(machine)
    shutil.rmtree(os_dir(machine) / d.name)
    r = finalize_staged(machine.sysroot)
    assert r.deployment is None and r.discarded == DiscardReason.DEPLOYMENT_GONE
    assert entries_files(machine) == before and staged_status(machine.sysroot, OS) is None


def test_record_of_an_earlier_boot_is_discarded(machine) -> None:
    installed_and_booted(machine)
    d = stage(machine)
    record = machine.root / "cfsdeploy" / staged.RECORD
    record.write_text(json.dumps(json.loads(record.read_text()) | {"boot_id": "an-earlier-boot"}))
    assert staged_status(machine.sysroot, OS).state == StagedState.STALE
    cleanup(machine.sysroot, OS, prune_objects=False)
    assert not record.exists() and d.deployment.name not in os.listdir(os_dir(machine))


def test_upgrade_stage_stages_the_head_once(machine) -> None:
    installed_and_booted(machine)
    r = upgrade(machine.sysroot, OS, origin=Origin(BRANCH), stage=True)
    assert r.outcome == UpgradeOutcome.STAGED and r.deployed.deployment.commit == r.commit
    again = upgrade(machine.sysroot, OS, origin=Origin(BRANCH), stage=True)
    assert again.outcome == UpgradeOutcome.PENDING_REBOOT and again.deployed is None
    assert staged_status(machine.sysroot, OS).deployment == r.deployed.deployment


def test_finalize_unit_is_not_started_without_systemd(tmp_path) -> None:
    assert staged.start_finalize_unit(str(tmp_path / "no-systemd")) is False


def test_finalize_unit_start_failure_is_a_clear_error(tmp_path) -> None:
    if os.path.isdir(staged.SYSTEMD_RUNNING):
        pytest.skip("systemd runs here: starting the unit would really start it")
    with pytest.raises(CommandError, match="systemctl"):
        staged.start_finalize_unit(str(tmp_path))


def test_finalize_unit_passes_systemd_analyze_verify(tmp_path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze missing (Debian package systemd)")
    # A root of its own, holding the command the unit runs.
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/cfsdeploy").write_text("#!/bin/sh\n")
    (tmp_path / "usr/bin/cfsdeploy").chmod(0o755)
    units = tmp_path / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units)
    p = subprocess.run(["systemd-analyze", "verify", f"--root={tmp_path}", str(units / UNIT.name)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_cli_stage_status_finalize(machine) -> None:
    commit_tree(machine.sysroot, machine.tree)
    (machine.tmp / "cmdline").write_text("quiet\n")
    assert cli(machine, "deploy", BRANCH).returncode == 0
    new_version(machine, "2")
    p = cli(machine, "deploy", BRANCH, "--stage")
    assert p.returncode == 0, p.stderr
    assert "run `cfsdeploy finalize-staged` before rebooting" in p.stdout
    st = json.loads(cli(machine, "status", "--json").stdout)
    assert st["staged"]["deployment"]["version"] == "2" and st["staged"]["becomes_default"]
    assert len(st["deployments"]) == 1
    assert ": becomes the default at shutdown" in cli(machine, "status").stdout
    p = cli(machine, "finalize-staged")
    assert p.returncode == 0 and "it is now the default" in p.stdout, p.stderr
    st = json.loads(cli(machine, "status", "--json").stdout)
    assert st["staged"] is None and st["deployments"][0]["version"] == "2"
    p = cli(machine, "finalize-staged")
    assert p.returncode == 0 and p.stdout == "nothing is staged\n"


# --- a damaged record: reported, set aside, never a reason to delete -----------------------


def rewrite_record(m, **changes: object) -> Path:
    record = m.root / "cfsdeploy" / staged.RECORD
    record.write_text(json.dumps(json.loads(record.read_text()) | changes))
    return record


@pytest.mark.parametrize("change", [
    {"os": ""}, {"os": "../x"}, {"name": "../x"}, {"kernel": ".6.12-0123456789ab"}, {"kernel": "6.1/../../x"},
    {"title": "a\nlinux /evil"}, {"verity": "maybe"}, {"tries": "3"}, {"tries": 0}, {"default": 1},
    {"merge_from": "x"}, {"boot_id": "a\nb"}, {"extra": 1},
])
def test_staged_record_is_checked_field_by_field(machine, change) -> None:
    installed_and_booted(machine)
    stage(machine)
    rewrite_record(machine, **change)
    with pytest.raises(staged.StagedError, match="malformed"):
        staged.load(str(machine.root / "cfsdeploy"))


def test_staged_record_naming_an_empty_os_makes_nothing_deleted(machine) -> None:
    a = installed_and_booted(machine)
    d = stage(machine, make_default=False)
    record = rewrite_record(machine, os="", boot_id=staged.current_boot_id())
    set_kargs(machine.sysroot, OS, append=("quiet",))
    assert os.listdir(machine.root / "cfsdeploy/deploy") == [OS]
    assert {a.deployment.name, d.deployment.name} <= set(os.listdir(os_dir(machine)))
    assert {a.kernel.dirname, d.kernel.dirname} <= set(os.listdir(machine.boot / "cfsdeploy" / OS))
    assert not record.exists() and aside(machine)[0].startswith(staged.RECORD)


def test_damaged_staged_record_is_reported_and_blocks_no_command(machine) -> None:
    installed_and_booted(machine)
    stage(machine)
    record = machine.root / "cfsdeploy" / staged.RECORD
    record.write_text("{not json")
    p = cli(machine, "status")
    assert p.returncode == 0 and f"WARNING: damaged staged record {record}: malformed" in p.stderr
    assert [d["kind"] for d in json.loads(cli(machine, "status", "--json").stdout)["damaged"]] == ["staged"]
    p = cli(machine, "finalize-staged")
    assert p.returncode == 4 and p.stderr.count("\n") == 1 and "nothing is finalized" in p.stderr
    assert not record.exists() and len(aside(machine)) == 1
    for command in (["status"], ["finalize-staged"], ["deploy", BRANCH, "--stage"], ["cleanup"], ["finalize-staged"]):
        p = cli(machine, *command)
        assert p.returncode == 0, p.stderr
    st = json.loads(cli(machine, "status", "--json").stdout)
    assert st["staged"] is None and st["deployments"][0]["version"] == "2"
