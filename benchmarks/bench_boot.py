"""Boot time: the same Debian 13 tree booted as a cfsdeploy composefs root and plainly
from ext4, in one run, on the same QEMU machine (OVMF, systemd-boot, no network).

    python benchmarks/bench_boot.py [--runs 3] [--work DIR]

The tree is tests/vm.py's (cached debootstrap, cfsdeploy and its initramfs hooks
installed, one initramfs for both).  The composefs disk gets release 1 deployed as a
machine gets it (`cfsdeploy install to-disk`); one untimed boot runs `cfsdeploy
verity enable`, so every timed composefs boot mounts with verity=require.  The
plain disk is a copy of it with the same tree on a plain ext4 root, booted by an
entry without cfsdeploy's arguments (the hook stands aside), with the same loader
timeout.  Boots
alternate, `--runs` of each; the figures are medians:

  - from QEMU's start to the kernel's first line, and to multi-user.target (the
    check unit starting), timed by the host on the serial console;
  - systemd's own account: from the kernel's start until systemd starts on the
    real root (kernel and initramfs together: initramfs-tools runs no systemd), and
    from then until multi-user.target;
  - prepare-root's own time, as the hook reports it.

QEMU uses KVM where a probe boot shows it works, else software emulation (TCG),
which stretches every figure but alike for both roots.  Needs root.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cfsdeploy.util.run import run  # noqa: E402
from tests import vm  # noqa: E402

PHASES = ("kernel+initramfs", "userspace")


def figures(b: vm.Boot) -> dict[str, float]:
    """One boot's figures by name (seconds)."""
    times = b["times"]
    assert isinstance(times, dict)
    out = {"QEMU start to kernel": b.milestones["kernel"],
           "QEMU start to multi-user": b.milestones["check unit"],
           **{f"systemd: {p}": float(times[p]) for p in PHASES}}
    if b.prepare_root is not None:
        out["prepare-root"] = b.prepare_root
    return out


def make_plain_disk(disk: vm.Disk, work: Path) -> vm.Disk:
    """The installed disk with its root partition remade as plain ext4 holding the
    tree, and an entry made the default that boots the same kernel and initramfs
    with the same arguments, without cfsdeploy's (so the hook stands aside)."""
    plain = work / "plain.img"
    run(["cp", "--sparse=always", disk.path, plain])
    root = vm.partitions(plain)["root"]
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "root", "-E", f"offset={root.start}", "-d", disk.tree.path,
         plain, f"{root.size // 1024}k"])
    esp = vm.extract_esp(plain, work / "plain-esp.img")
    (name,) = vm.mtools("mdir", "-b", "-i", esp, "::/loader/entries").split()
    lines = dict(line.split(" ", 1) for line in vm.mtools("mtype", "-i", esp, name).splitlines() if " " in line)
    options = " ".join(a for a in lines["options"].split() if not a.startswith("cfsdeploy"))
    entry, conf = work / "plain.conf", work / "loader.conf"
    entry.write_text(f"title Debian 13 on plain ext4\nlinux {lines['linux']}\ninitrd {lines['initrd']}\n"
                     f"options {options}\n")
    # the same menu timeout as the installed disk's
    conf.write_text(vm.mtools("mtype", "-i", esp, "::/loader/loader.conf") + "default plain.conf\n")
    vm.mtools("mcopy", "-i", esp, entry, "::/loader/entries/plain.conf")
    vm.mtools("mcopy", "-o", "-i", esp, conf, "::/loader/loader.conf")
    vm.replace_esp(plain, esp)
    esp.unlink()
    vars_ = plain.with_suffix(".vars")
    shutil.copyfile(vm.OVMF_VARS, vars_)
    return vm.Disk(plain, vars_, disk.tree, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, help="working directory (default: a new one under /var/tmp)")
    args = ap.parse_args()
    if reason := vm.missing_requirements():
        sys.exit(f"cannot boot a VM here: {reason}")
    work = args.work or Path(tempfile.mkdtemp(prefix="cfsdeploy-bench-boot.", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"working in {work}; accelerator {vm.accel()}")
    with vm.machine(work) as m:
        plain = make_plain_disk(m.disk, work)
        setup = m.boot("setup", ["cfsdeploy verity enable"])
        if setup.steps[0]["rc"] != 0:
            sys.exit(f"verity enable failed in the guest:\n{setup.tail()}")
        results: dict[str, list[dict[str, float]]] = {"composefs": [], "plain ext4": []}
        for i in range(args.runs):
            for kind, disk in (("composefs", m.disk), ("plain ext4", plain)):
                b = vm.boot(disk, work, name=f"{kind.replace(' ', '-')}-{i}")
                if kind == "composefs" and b.results.get("root.verity") != "require":
                    sys.exit(f"the composefs boot did not use verity=require:\n{b.tail()}")
                results[kind].append(figures(b))
                print(f"  {kind} run {i + 1}: multi-user after {b.milestones['check unit']:.1f} s")
    names = list(results["composefs"][0])
    print(f"\nmedians of {args.runs} boots (s)      composefs   plain ext4   ratio")
    for name in names:
        c = statistics.median(r[name] for r in results["composefs"])
        if name not in results["plain ext4"][0]:
            print(f"{name:32} {c:10.2f}")
            continue
        p = statistics.median(r[name] for r in results["plain ext4"])
        print(f"{name:32} {c:10.2f} {p:12.2f}   {c / p if p else float('nan'):5.2f}")


if __name__ == "__main__":
    main()
