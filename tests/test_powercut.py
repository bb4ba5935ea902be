"""Power cuts never leave a machine without a boot entry, nor lose a command that
returned: a real machine (QEMU, vfat ESP, ext4 sysroot) runs kargs, upgrade,
rollback, deploy, undeploy, cleanup and a staged deployment's finalize, and is cut
off at random moments during and after them (see tests/powercut.py).

Slow (several minutes under software emulation): select with `-m vm`.  The seed
of the moments is printed; `CFSDEPLOY_CUT_SEED=N` repeats a run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cfsdeploy.util.run import run

from . import powercut, vm
from .test_vm import report

pytestmark = pytest.mark.vm

MIN_CUTS = 20


@dataclass
class Result:
    run: powercut.Run
    inspections: list[powercut.Inspection]
    samples: list[powercut.Inspection]
    boots: list[vm.Boot]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Result]:
    if reason := vm.missing_requirements():
        pytest.skip(f"cannot boot a VM here: {reason}")
    work = tmp_path_factory.mktemp("powercut")

    def log(m: str) -> None:
        report(request, f"[powercut] {m}")

    seed = int(os.environ.get("CFSDEPLOY_CUT_SEED") or random.SystemRandom().randrange(1 << 31))
    log(f"seed {seed} (CFSDEPLOY_CUT_SEED={seed} repeats these moments)")
    with vm.machine(work, log=log) as m, powercut.scratch_xfs(work) as scratch:
        m.release(2)
        disk = scratch / "disk.img"
        run(["cp", "--sparse=always", m.disk.path, disk])
        r = powercut.boot_runner(disk, m.updates, work, seed=seed, rounds=1, cuts_dir=scratch, log=log)
        commands = r.commands()
        for i, e in sorted(r.ends().items()):
            log(f"command {i}: {commands[i]} -> exit {e['rc']} in {e['seconds']} s")
        inspections = []
        for cut in r.cuts:
            i = powercut.inspect(cut, work)
            inspections.append(i)
            where = (f"during command {cut.in_flight}" if cut.in_flight else f"after command {cut.done}")
            verdict = "; ".join(i.problems + ([why] if (why := powercut.lost(r, i)) else [])) or "ok"
            notes = f" (fsck.vfat: {', '.join(i.fsck_notes)})" if i.fsck_notes else ""
            log(f"cut {cut.number} at {cut.seconds:.0f} s {where}{' (kill)' if cut.killed else ''}: "
                f"{len(i.entries)} entries: {verdict}{notes}".replace("\n", " | "))
        # Boot the real kill and a cut taken in the middle of a command.
        rng = random.Random(seed)
        middle = [i for i in inspections if i.cut.in_flight is not None and not i.cut.killed and i.entries]
        samples = [i for i in inspections if i.cut.killed and i.entries] + rng.sample(middle, min(1, len(middle)))
        for i in inspections:
            if i not in samples:
                i.cut.path.unlink()
        boots = powercut.boot_samples([i.cut for i in samples], m.disk, work)
        for i, b in zip(samples, boots, strict=False):
            log(f"cut {i.cut.number} booted: {b.booted and b.booted['name']} "
                f"(multi-user.target {b.results.get('systemd.multi_user')})")
        yield Result(r, inspections, samples, boots)


def test_the_machine_is_cut_at_least_twenty_times(result: Result) -> None:
    assert len(result.run.cuts) >= MIN_CUTS


def test_every_command_in_the_guest_succeeds(result: Result) -> None:
    commands = result.run.commands()
    failed = {commands[i]: e["output"] for i, e in result.run.ends().items() if e["rc"] != 0}
    assert not failed


def test_cuts_fall_during_or_after_every_kind_of_command(result: Result) -> None:
    commands = result.run.commands()
    kinds = {c.split()[1] + (" --stage" if "--stage" in c else "") for c in commands.values()}
    hit = {commands[n].split()[1] + (" --stage" if "--stage" in commands[n] else "")
           for c in result.run.cuts for n in (c.in_flight, c.done) if n in commands}
    assert kinds <= hit


def test_every_cut_leaves_an_esp_fsck_vfat_finds_clean(result: Result) -> None:
    dirty = {i.cut.number: i.fsck_vfat for i in result.inspections if not i.fsck_vfat_ok}
    assert not dirty


def test_every_cut_leaves_entries_whose_kernels_and_deployments_are_there(result: Result) -> None:
    problems = {i.cut.number: i.problems for i in result.inspections
                if [p for p in i.problems if not p.startswith("fsck.vfat")]}
    assert not problems


def test_no_cut_loses_a_command_that_returned(result: Result) -> None:
    lost = {i.cut.number: why for i in result.inspections if (why := powercut.lost(result.run, i))}
    assert not lost


def test_a_machine_cut_off_boots_its_default_to_multi_user(result: Result) -> None:
    assert result.samples
    for i, b in zip(result.samples, result.boots, strict=False):
        assert b.results.get("systemd.multi_user") == "active", b.tail()
        assert b.booted is not None and f"/cfsdeploy/deploy/{vm.OS_NAME}/{b.booted['name']}" == \
            i.entries[0].deployment
