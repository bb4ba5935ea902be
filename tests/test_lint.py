"""cfsdeploy lint: what stops a tree from deploying or booting, one rule at a time."""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cfsdeploy.boot import initramfs
from cfsdeploy.repo.repository import Repository
from cfsdeploy.sysroot.lint import Finding, Rule, Severity, lint_commit, lint_dir

from .sysroots import KVER, make_os_tree

HOOK_FILES = ("usr/lib/cfsdeploy/cfsdeploy-prepare-root", "scripts/local-bottom/cfsdeploy")
MODULE_FILES = tuple(f"usr/lib/modules/{KVER}/kernel/{p}" for p in (
    "fs/erofs/erofs.ko.xz", "fs/overlayfs/overlay.ko.xz", "drivers/block/loop.ko.xz"))


def cpio(names: tuple[str, ...] | list[str]) -> bytes:
    """A newc archive of small files, as initramfs builders write it."""
    out = b""
    for ino, name in enumerate([*names, "TRAILER!!!"], 1):
        data = b"" if name == "TRAILER!!!" else name.encode() * 3
        fields = [ino, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data + b"\0" * (-len(data) % 4)
    return out + b"\0" * (-len(out) % 512)


def zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


COMPRESS = {"gzip": gzip.compress, "xz": lzma.compress, "zstd": zstd}


def initrd(names: tuple[str, ...] = HOOK_FILES + MODULE_FILES, compress: str = "gzip") -> bytes:
    """An early microcode archive, uncompressed, then the main one compressed."""
    return cpio(["kernel", "kernel/x86", "kernel/x86/microcode/GenuineIntel.bin"]) + COMPRESS[compress](cpio(names))


def clean_tree(top: Path) -> Path:
    """make_os_tree, with all that lint asks of a tree."""
    make_os_tree(top)
    (top / f"usr/lib/modules/{KVER}/initramfs.img").write_bytes(initrd())
    for tool in ("cfsdeploy", "gpgv"):
        (top / "usr/bin" / tool).write_text("#!/bin/sh\n")
    (top / "etc/fstab").write_text("# static\nUUID=1 / ext4 ro 0 1\nUUID=2 /boot/efi vfat umask=077 0 2\n")
    (top / "etc/machine-id").write_text("")
    shutil.rmtree(top / "var/lib/app")
    (top / "usr/lib/rel").symlink_to("../../etc/hostname")
    return top


@pytest.fixture
def tree(tmp_path) -> Path:
    return clean_tree(tmp_path / "tree")


def rules(findings: list[Finding]) -> list[tuple[Rule, str | None]]:
    return [(f.rule, f.path) for f in findings]


def only(tree: Path, rule: Rule) -> Finding:
    findings = lint_dir(str(tree))
    assert [f.rule for f in findings] == [rule]
    return findings[0]


def test_clean_tree_has_no_findings(tree) -> None:
    assert lint_dir(str(tree)) == []


def test_no_sysroot(tree) -> None:
    (tree / "sysroot").rmdir()
    assert only(tree, Rule.NO_SYSROOT).severity == Severity.ERROR


def test_no_kernel_names_the_paths_searched(tree) -> None:
    shutil.rmtree(tree / f"usr/lib/modules/{KVER}")
    f = only(tree, Rule.NO_KERNEL)
    assert (f.severity, f.facts["searched"][0]) == (Severity.ERROR, "/usr/lib/modules/<kver>/vmlinuz")


def test_several_kernels_warn_which_boots(tree) -> None:
    shutil.copytree(tree / f"usr/lib/modules/{KVER}", tree / "usr/lib/modules/6.11.0")
    f = only(tree, Rule.SEVERAL_KERNELS)
    assert (f.severity, f.facts) == (Severity.WARNING, {"kvers": ["6.11.0", KVER], "chosen": KVER})


def test_kernel_without_initramfs(tree) -> None:
    (tree / "boot").mkdir()
    (tree / "boot/vmlinuz-6.99").write_bytes(b"k" * 5000)
    assert only(tree, Rule.KERNEL_WITHOUT_INITRAMFS).facts == {"kver": "6.99"}


def test_kernel_version_that_is_no_plain_version(tree) -> None:
    shutil.copytree(tree / f"usr/lib/modules/{KVER}", tree / "usr/lib/modules/.6.1")
    f = only(tree, Rule.INVALID_KERNEL_VERSION)
    assert (f.severity, f.path) == (Severity.ERROR, "/usr/lib/modules/.6.1/vmlinuz")


@pytest.mark.parametrize("compress", COMPRESS)
def test_initramfs_without_hook(tree, compress) -> None:
    (tree / f"usr/lib/modules/{KVER}/initramfs.img").write_bytes(initrd(MODULE_FILES, compress))
    f = only(tree, Rule.INITRAMFS_NO_HOOK)
    assert (f.severity, f.path) == (Severity.ERROR, f"/usr/lib/modules/{KVER}/initramfs.img")


def test_dracut_hook_counts(tree) -> None:
    dracut = ("usr/lib/cfsdeploy/cfsdeploy-prepare-root", "var/lib/dracut/hooks/pre-pivot/50-cfsdeploy-pre-pivot.sh")
    (tree / f"usr/lib/modules/{KVER}/initramfs.img").write_bytes(initrd(dracut + MODULE_FILES, "xz"))
    assert lint_dir(str(tree)) == []


@pytest.mark.parametrize("compress", COMPRESS)
def test_initramfs_without_modules(tree, compress) -> None:
    (tree / f"usr/lib/modules/{KVER}/initramfs.img").write_bytes(initrd(HOOK_FILES + MODULE_FILES[1:], compress))
    f = only(tree, Rule.INITRAMFS_NO_MODULE)
    assert (f.severity, f.facts) == (Severity.ERROR, {"kver": KVER, "module": "erofs"})


def test_built_in_modules_count(tree) -> None:
    (tree / f"usr/lib/modules/{KVER}/initramfs.img").write_bytes(initrd(HOOK_FILES))
    (tree / f"usr/lib/modules/{KVER}/modules.builtin").write_text(
        "kernel/fs/erofs/erofs.ko\nkernel/fs/overlayfs/overlay.ko\nkernel/drivers/block/loop.ko\n")
    assert lint_dir(str(tree)) == []


@pytest.mark.parametrize(("data", "reason"), [
    (b"070701" + b"0" * 20, initramfs.Damage.TRUNCATED),
    (b"070701" + b"zz" * 60, initramfs.Damage.BAD_HEADER),
    (gzip.compress(cpio(HOOK_FILES))[:-20], initramfs.Damage.TRUNCATED),
    (b"\x1f\x8b" + b"\xff" * 100, initramfs.Damage.BAD_COMPRESSION),
    (b"\x28\xb5\x2f\xfd" + b"\xff" * 100, initramfs.Damage.BAD_COMPRESSION),
    (b"BZh9" + b"\xff" * 100, initramfs.Damage.UNKNOWN_FORMAT),
], ids=["short-header", "bad-header", "short-gzip", "bad-gzip", "bad-zstd", "bzip2"])
def test_damaged_initramfs_is_a_finding(tree, data, reason) -> None:
    (tree / f"usr/lib/modules/{KVER}/initramfs.img").write_bytes(cpio(["early"]) + data)
    f = only(tree, Rule.INITRAMFS_UNREADABLE)
    assert (f.severity, f.facts) == (Severity.ERROR, {"kver": KVER, "reason": reason.value})


def test_initramfs_unpacking_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(initramfs, "MAX_UNPACKED", 1000)
    with pytest.raises(initramfs.InitramfsDamaged) as e:
        initramfs.names(gzip.compress(cpio([f"f{i}" for i in range(100)])))
    assert e.value.damage == initramfs.Damage.TOO_LARGE


@pytest.mark.parametrize("tool", ["cfsdeploy", "gpgv"])
def test_missing_tool(tree, tool) -> None:
    (tree / "usr/bin" / tool).unlink()
    f = only(tree, Rule.NO_CLI if tool == "cfsdeploy" else Rule.NO_GPGV)
    assert f.severity == Severity.WARNING


def test_fstab_mounting_root_read_write(tree) -> None:
    (tree / "etc/fstab").write_text("UUID=1 / ext4 defaults 0 1\nUUID=2 /boot vfat umask=077 0 2\n")
    assert only(tree, Rule.FSTAB_ROOT_RW).facts == {"line": 1}


def test_fstab_without_the_esp(tree) -> None:
    (tree / "etc/fstab").write_text("UUID=1 / ext4 ro 0 1\n")
    assert only(tree, Rule.FSTAB_NO_ESP).path == "/etc/fstab"


def test_machine_id_that_is_set(tree) -> None:
    (tree / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    assert only(tree, Rule.MACHINE_ID).path == "/etc/machine-id"


def test_machine_id_uninitialized_is_fine(tree) -> None:
    (tree / "etc/machine-id").write_text("uninitialized\n")
    assert lint_dir(str(tree)) == []


def test_var_content_seeded_once(tree) -> None:
    (tree / "var/lib/app").mkdir()
    (tree / "var/lib/app/state").write_text("x")
    (tree / "var/lib/app/more").write_text("y")
    assert only(tree, Rule.VAR_CONTENT).facts == {"entries": 2}


def test_var_content_tmpfiles_makes_at_every_boot_is_fine(tree) -> None:
    (tree / "usr/lib/tmpfiles.d").mkdir(parents=True)
    (tree / "usr/lib/tmpfiles.d/app.conf").write_text(
        "L+ /var/run - - - - ../run\nf /var/log/wtmp 0664 root utmp -\nC /var/lib/app - - - - /usr/share/app\n")
    (tree / "var/run").symlink_to("../run")
    (tree / "var/log").mkdir()
    (tree / "var/log/wtmp").write_text("")
    (tree / "var/lib/app").mkdir()
    (tree / "var/lib/app/state").write_text("x")
    assert lint_dir(str(tree)) == []


def test_var_content_a_tmpfiles_glob_or_specifier_does_not_cover(tree) -> None:
    (tree / "etc/tmpfiles.d").mkdir(parents=True)
    (tree / "etc/tmpfiles.d/app.conf").write_text("f /var/lib/app/* - - - -\nf /var/lib/%u - - - -\n")
    (tree / "var/lib/app").mkdir()
    (tree / "var/lib/app/state").write_text("x")
    assert only(tree, Rule.VAR_CONTENT).facts == {"entries": 1}


@pytest.mark.parametrize("target", ["../../../../etc/passwd", "/../../etc/passwd"])
def test_symlink_that_escapes(tree, target) -> None:
    (tree / "usr/lib/evil").symlink_to(target)
    f = only(tree, Rule.SYMLINK_ESCAPES)
    assert (f.path, f.facts) == ("/usr/lib/evil", {"target": target})


def test_commit_is_linted_from_its_manifest(tree, tmp_path) -> None:
    repo = Repository.init(tmp_path / "repo")
    (tree / "sysroot").rmdir()
    repo.commit(tree, "os/stable", "build")
    assert rules(lint_commit(repo, "os/stable")) == [(Rule.NO_SYSROOT, "/sysroot")]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cfsdeploy.cli", *args], capture_output=True, text=True)


def test_cli_json_has_the_documented_keys(tree) -> None:
    (tree / "sysroot").rmdir()
    (tree / "etc/machine-id").write_text("x\n")
    p = cli("lint", str(tree), "--json")
    doc = json.loads(p.stdout)
    assert p.returncode == 1
    assert list(doc) == ["schema", "findings"] and doc["schema"] == 1
    assert doc["findings"] == [
        {"rule": "no_sysroot", "severity": "error", "path": "/sysroot", "facts": {}},
        {"rule": "machine_id", "severity": "warning", "path": "/etc/machine-id", "facts": {}}]


def test_cli_warnings_alone_exit_0_one_line_each(tree) -> None:
    (tree / "usr/bin/gpgv").unlink()
    p = cli("lint", str(tree))
    assert (p.returncode, p.stdout.count("\n"), p.stdout.startswith("warning: no gpgv")) == (0, 1, True)


def test_commit_lint_refuses_a_tree_with_errors(tree, tmp_path) -> None:
    Repository.init(tmp_path / "repo")
    (tree / "sysroot").rmdir()
    p = cli("commit", "--repo", str(tmp_path / "repo"), "--tree", str(tree), "-b", "os/stable", "-m", "x", "--lint")
    assert p.returncode == 1 and "error: /sysroot: no /sysroot directory" in p.stderr
    assert "refs/heads/os/stable" not in Repository(str(tmp_path / "repo")).git.references


def test_commit_lint_commits_a_clean_tree(tree, tmp_path) -> None:
    Repository.init(tmp_path / "repo")
    p = cli("commit", "--repo", str(tmp_path / "repo"), "--tree", str(tree), "-b", "os/stable", "-m", "x", "--lint")
    assert p.returncode == 0, p.stderr
    assert str(Repository(str(tmp_path / "repo")).resolve("os/stable").id) == p.stdout.strip()


def test_cli_line_of_a_hostile_name_stays_one_line(tree) -> None:
    (tree / "usr/lib/evil\nerror: fake").symlink_to("../../../../x\x1b[2J")
    p = cli("lint", str(tree))
    assert p.stdout.splitlines() == ["warning: /usr/lib/evil\\nerror: fake: symlink to ../../../../x\\x1b[2J "
                                     "climbs above the tree's root"]
