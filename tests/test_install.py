"""cfsdeploy install to-disk / to-filesystem: a machine's disk made from a commit,
inspected from the host (sfdisk for the GPT, mtools for the ESP, a loop mount for
the root), and each refusal one line with the target left as it was."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfsdeploy.repo.repository import Repository
from cfsdeploy.sysroot.install import ARCHES, ESP_TYPE, MIB

from .pullkit import builder_key  # noqa: F401
from .sysroots import BRANCH, KVER, OS, make_os_tree
from .test_json import documented
from .test_lint import clean_tree

pytestmark = pytest.mark.usefixtures("requires_mount")

BROKEN = "testos/broken"
SIGNED = "testos/signed"
UPDATE_URL = "https://updates.example/repo"
SIZE = "1G"
# the os, and its commits unsigned: --gpg-import or this is required
UNSIGNED = ("--os", OS, "--no-gpg-verify")


def cfsdeploy(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cfsdeploy.cli", *map(str, args)], capture_output=True,
                          text=True, env=env)


def mtools(*args: str | Path) -> str:
    return subprocess.run(list(map(str, args)), check=True, capture_output=True, text=True,
                          env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, builder_key) -> Path:  # noqa: F811
    """A repository with the test OS on BRANCH, and signed by the builder on SIGNED,
    and a tree without a kernel (which fails lint) on BROKEN."""
    top = tmp_path_factory.mktemp("source")
    repo = Repository.init(top / "repo")
    repo.commit(clean_tree(top / "tree"), BRANCH, "build 1", version="1")
    repo.commit(top / "tree", SIGNED, "build 1", version="1", sign_key=builder_key.email,
                gpg_homedir=builder_key.home)
    broken = make_os_tree(top / "broken")
    shutil.rmtree(broken / "usr/lib/modules")
    repo.commit(broken, BROKEN, "no kernel")
    return top / "repo"


def partitions(image: Path) -> list[dict[str, str]]:
    out = subprocess.run(["sfdisk", "--json", image], check=True, capture_output=True, text=True).stdout
    parts: list[dict[str, str]] = json.loads(out)["partitiontable"]["partitions"]
    return parts


@contextlib.contextmanager
def mounted_partition(image: Path, part: dict[str, str], where: Path) -> Iterator[Path]:
    offset, size = int(part["start"]) * 512, int(part["size"]) * 512
    where.mkdir()
    subprocess.run(["mount", "-o", f"loop,ro,offset={offset},sizelimit={size}", image, where], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", where], check=True)


def extract_esp(image: Path, part: dict[str, str], out: Path) -> Path:
    subprocess.run(["dd", f"if={image}", f"of={out}", "bs=512", f"skip={part['start']}", f"count={part['size']}",
                    "status=none"], check=True)
    return out


@pytest.fixture(scope="module")
def installed(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    image = tmp_path_factory.mktemp("disk") / "disk.img"
    r = cfsdeploy("install", "to-disk", image, "--size", SIZE, "--repo", source, BRANCH, *UNSIGNED,
                  "--update-url", UPDATE_URL, "--console", "ttyS0", "--karg", "quiet", "--tries", "2")
    assert r.returncode == 0, r.stderr
    return image, r


def test_to_disk_writes_a_gpt_with_the_dps_types(installed) -> None:
    image, _ = installed
    esp, root = partitions(image)
    assert (esp["type"].lower(), esp["name"]) == (ESP_TYPE, "esp")
    assert (root["type"].lower(), root["name"]) == (ARCHES[platform.machine()].root_type, "root")
    assert int(esp["size"]) * 512 == 512 * MIB
    assert os.path.getsize(image) == 1024 * MIB


def test_to_disk_esp_boots_systemd_boot_into_the_root_partition(installed, source, tmp_path) -> None:
    image, _ = installed
    esp, root = partitions(image)
    fat = extract_esp(image, esp, tmp_path / "esp.img")
    efi = ARCHES[platform.machine()].efi
    assert f"BOOT{efi.upper()}.EFI" in mtools("mdir", "-b", "-i", fat, "::/EFI/BOOT")
    assert f"systemd-boot{efi}.efi" in mtools("mdir", "-b", "-i", fat, "::/EFI/systemd")
    assert mtools("mtype", "-i", fat, "::/loader/loader.conf") == "timeout 3\neditor no\n"
    entries = [e for e in mtools("mdir", "-b", "-i", fat, "::/loader/entries").split() if e.endswith(".conf")]
    assert len(entries) == 1 and entries[0].endswith("+2.conf")  # --tries 2
    entry = mtools("mtype", "-i", fat, entries[0])
    options = next(line for line in entry.splitlines() if line.startswith("options "))
    assert f"root=PARTUUID={root['uuid'].lower()}" in options.split()
    assert {"console=ttyS0", "quiet", "rw"} <= set(options.split())
    linux = next(line.split()[1] for line in entry.splitlines() if line.startswith("linux "))
    mtools("mcopy", "-i", fat, "::" + linux, tmp_path / "vmlinuz")
    assert (tmp_path / "vmlinuz").read_bytes() == (source.parent / f"tree/usr/lib/modules/{KVER}/vmlinuz").read_bytes()


def test_to_disk_root_holds_the_deployment_following_the_update_url(installed, tmp_path) -> None:
    image, r = installed
    commit = r.stdout.split("\n")[1].split()[1]
    _, root = partitions(image)
    with mounted_partition(image, root, tmp_path / "root") as mnt:
        assert [d.name for d in (mnt / "cfsdeploy/deploy" / OS).iterdir() if d.name != "var"] == [f"{commit}.0"]
        assert (mnt / "cfsdeploy/config.toml").exists()
        remotes = cfsdeploy("remote", "list", "--repo", mnt / "cfsdeploy/repo")
        assert remotes.stdout.startswith(f"origin\t{UPDATE_URL}\t{BRANCH}\t"), remotes.stderr


@pytest.fixture(scope="module")
def installed_json(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    image = tmp_path_factory.mktemp("disk") / "disk.img"
    r = cfsdeploy("install", "to-disk", image, "--size", SIZE, "--repo", source, BRANCH, *UNSIGNED, "--json")
    assert r.returncode == 0, r.stderr
    doc: dict[str, object] = json.loads(r.stdout)
    return doc


def test_to_disk_json_has_schema_1_and_exactly_the_documented_keys(installed_json) -> None:
    keys = documented("install to-disk")
    assert installed_json["schema"] == 1 and list(installed_json)[0] == "schema"
    assert set(installed_json) == keys["install to-disk"]
    assert set(installed_json["deployment"]) == documented("status")["deployment"]
    assert [set(p) for p in installed_json["phases"]] == [keys["phase"]] * 7


def test_to_disk_reports_its_phases_in_order(installed_json) -> None:
    phases = installed_json["phases"]
    assert isinstance(phases, list)
    assert [p["name"] for p in phases] == ["check", "partition", "mkfs", "pull", "deploy", "esp", "sync"]
    assert all(isinstance(p["seconds"], float) and p["seconds"] >= 0 for p in phases)


def test_to_disk_refuses_a_disk_with_partitions_without_wipe(installed, source, tmp_path) -> None:
    image = tmp_path / "copy.img"
    subprocess.run(["cp", "--sparse=always", installed[0], image], check=True)
    before = partitions(image)
    r = cfsdeploy("install", "to-disk", image, "--repo", source, BRANCH, *UNSIGNED)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--wipe" in r.stderr
    assert partitions(image) == before


def test_to_disk_refuses_a_too_small_target_and_creates_nothing(source, tmp_path) -> None:
    image = tmp_path / "small.img"
    r = cfsdeploy("install", "to-disk", image, "--size", "600M", "--repo", source, BRANCH, *UNSIGNED)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "too small" in r.stderr
    assert not image.exists()


def test_to_disk_refuses_a_mounted_image(source, tmp_path) -> None:
    image = tmp_path / "busy.img"
    with open(image, "wb") as f:
        f.truncate(1024 * MIB)
    subprocess.run(["mkfs.ext4", "-q", image], check=True)
    (tmp_path / "mnt").mkdir()
    subprocess.run(["mount", "-o", "loop", image, tmp_path / "mnt"], check=True)
    try:
        r = cfsdeploy("install", "to-disk", image, "--wipe", "--repo", source, BRANCH, *UNSIGNED)
    finally:
        subprocess.run(["umount", tmp_path / "mnt"], check=True)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "in use" in r.stderr
    assert subprocess.run(["blkid", "-o", "value", "-s", "TYPE", image], capture_output=True,
                          text=True).stdout == "ext4\n"


def test_to_disk_refuses_a_mounted_block_device(source, tmp_path) -> None:
    image = tmp_path / "busy.img"
    with open(image, "wb") as f:
        f.truncate(1024 * MIB)
    subprocess.run(["mkfs.ext4", "-q", image], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", image], check=True, capture_output=True,
                         text=True).stdout.strip()
    (tmp_path / "mnt").mkdir()
    try:
        subprocess.run(["mount", dev, tmp_path / "mnt"], check=True)
        try:
            r = cfsdeploy("install", "to-disk", dev, "--wipe", "--repo", source, BRANCH, *UNSIGNED)
        finally:
            subprocess.run(["umount", tmp_path / "mnt"], check=True)
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)
    assert r.returncode != 0
    assert r.stderr == f"cfsdeploy: {dev}: is mounted or in use\n"


def test_to_disk_refuses_a_commit_that_fails_lint(source, tmp_path) -> None:
    image = tmp_path / "disk.img"
    r = cfsdeploy("install", "to-disk", image, "--size", SIZE, "--repo", source, BROKEN, *UNSIGNED)
    assert r.returncode == 1
    assert r.stderr.splitlines()[0].startswith(f"cfsdeploy: {BROKEN}: fails lint")
    assert not image.exists()


@pytest.mark.parametrize(("tool", "package"), [("sfdisk", "fdisk"), ("mcopy", "mtools"),
                                               ("mkfs.vfat", "dosfstools"), ("mkfs.ext4", "e2fsprogs")])
def test_to_disk_names_a_missing_tool_with_its_package(source, tmp_path, tool: str, package: str) -> None:
    # a PATH with every tool the install runs but one
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sfdisk", "wipefs", "losetup", "mkfs.vfat", "mcopy", "dd", "fallocate", "mount", "umount",
                 "mkfs.ext4", "sync"):
        if name != tool:
            (bin_dir / name).symlink_to(shutil.which(name) or "/missing")
    image = tmp_path / "disk.img"
    r = cfsdeploy("install", "to-disk", image, "--size", SIZE, "--repo", source, BRANCH, *UNSIGNED,
                  env=dict(os.environ, PATH=str(bin_dir)))
    assert r.returncode == 6
    assert r.stderr == f"cfsdeploy: {tool}: command not found (install package {package}?)\n"
    assert not image.exists()


def test_to_disk_from_a_remote_checks_and_keeps_its_key(source, builder_key, tmp_path) -> None:  # noqa: F811
    image = tmp_path / "disk.img"
    r = cfsdeploy("install", "to-disk", image, "--size", SIZE, "--from", f"file://{source}", "--branch", SIGNED,
                  "--gpg-import", builder_key.public, "--os", OS, "--filesystem", "xfs", "--root-by-label")
    assert r.returncode == 0, r.stderr
    assert "root=LABEL=root" in r.stdout
    _, root = partitions(image)
    with mounted_partition(image, root, tmp_path / "root") as mnt:
        remotes = cfsdeploy("remote", "list", "--repo", mnt / "cfsdeploy/repo").stdout
    assert remotes.startswith(f"origin\tfile://{source}\t{SIGNED}\tgpg-verify, trusted keys: 1")


def test_to_disk_failing_after_partitioning_leaves_no_partition_table(source, tmp_path) -> None:
    image = tmp_path / "blank.img"
    with open(image, "wb") as f:
        f.truncate(1024 * MIB)
    # from a remote, lint can only look at the commit once it is pulled onto the new root
    r = cfsdeploy("install", "to-disk", image, "--from", f"file://{source}", "--branch", BROKEN,
                  *UNSIGNED)
    assert r.returncode == 1
    assert f"{BROKEN}: fails lint" in r.stderr
    assert subprocess.run(["wipefs", "--noheadings", image], capture_output=True, text=True).stdout == ""


@pytest.fixture
def target_root(tmp_path: Path) -> Iterator[Path]:
    """An ext4 filesystem mounted as a builder's layout would have it, its ESP a
    directory below it."""
    image = tmp_path / "root.img"
    with open(image, "wb") as f:
        f.truncate(256 * MIB)
    subprocess.run(["mkfs.ext4", "-q", image], check=True)
    mnt = tmp_path / "target"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", image, mnt], check=True)
    (mnt / "efi").mkdir()
    yield mnt
    subprocess.run(["umount", mnt], check=True)


def test_to_filesystem_finds_the_root_device_with_findmnt(source, target_root) -> None:
    r = cfsdeploy("install", "to-filesystem", target_root, "--boot-dir", target_root / "efi",
                  "--repo", source, BRANCH, *UNSIGNED)
    assert r.returncode == 0, r.stderr
    device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", target_root], capture_output=True,
                            text=True).stdout.strip()
    assert f"kernel command line: root={device} rw" in r.stdout
    entries = list((target_root / "efi/loader/entries").iterdir())
    assert len(entries) == 1 and f"root={device}" in entries[0].read_text()
    assert (target_root / "efi/loader/loader.conf").read_bytes() == b"timeout 3\neditor no\n"
    assert 'boot-dir = "/efi"' in (target_root / "cfsdeploy/config.toml").read_text()


def test_to_filesystem_takes_root_karg_as_given(source, target_root) -> None:
    r = cfsdeploy("install", "to-filesystem", target_root, "--boot-dir", target_root / "efi",
                  "--repo", source, BRANCH, *UNSIGNED, "--root-karg", "root=/dev/mapper/vg-root")
    assert r.returncode == 0, r.stderr
    assert "kernel command line: root=/dev/mapper/vg-root rw" in r.stdout


def test_to_disk_with_wipe_reinstalls_a_disk_with_partitions(installed, source, tmp_path) -> None:
    image = tmp_path / "copy.img"
    subprocess.run(["cp", "--sparse=always", installed[0], image], check=True)
    before = {p["uuid"] for p in partitions(image)}
    r = cfsdeploy("install", "to-disk", image, "--wipe", "--repo", source, BRANCH, *UNSIGNED)
    assert r.returncode == 0, r.stderr
    assert {p["uuid"] for p in partitions(image)}.isdisjoint(before)


def test_to_disk_refuses_a_bad_kernel_argument_before_writing(source, tmp_path) -> None:
    image = tmp_path / "disk.img"
    r = cfsdeploy("install", "to-disk", image, "--size", SIZE, "--repo", source, BRANCH, *UNSIGNED,
                  "--karg", "a'b")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert not image.exists()


def test_to_filesystem_failing_leaves_no_sysroot(source, target_root) -> None:
    r = cfsdeploy("install", "to-filesystem", target_root, "--boot-dir", target_root / "efi",
                  "--from", f"file://{source}", "--branch", BROKEN, *UNSIGNED)
    assert r.returncode == 1
    assert f"{BROKEN}: fails lint" in r.stderr
    assert sorted(p.name for p in target_root.iterdir()) == ["efi", "lost+found"]
    assert list((target_root / "efi").iterdir()) == []


def test_install_asks_for_keys_or_an_explicit_no_gpg_verify(source, tmp_path) -> None:
    image = tmp_path / "disk.img"
    r = cfsdeploy("install", "to-disk", image, "--size", SIZE, "--from", f"file://{source}", "--branch", BRANCH,
                  "--os", OS)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--no-gpg-verify" in r.stderr
    assert not image.exists()


def test_to_filesystem_refuses_a_root_holding_a_sysroot(source, target_root) -> None:
    args = ("install", "to-filesystem", target_root, "--boot-dir", target_root / "efi", "--repo", source, BRANCH,
            *UNSIGNED, "--root-karg", "root=LABEL=root")
    assert cfsdeploy(*args).returncode == 0
    r = cfsdeploy(*args)
    assert r.returncode == 2
    assert r.stderr == f"cfsdeploy: {target_root}: holds a sysroot already\n"


def test_to_disk_installs_onto_a_block_device(source, tmp_path) -> None:
    image = tmp_path / "backing.img"
    with open(image, "wb") as f:
        f.truncate(1024 * MIB)
    dev = subprocess.run(["losetup", "--find", "--show", image], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        r = cfsdeploy("install", "to-disk", dev, "--repo", source, BRANCH, *UNSIGNED)
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)
    esp, root = partitions(image)
    assert (esp["name"], root["name"]) == ("esp", "root")
    assert f"root=PARTUUID={root['uuid'].lower()}" in r.stdout


def test_to_disk_esp_leaves_nothing_of_what_the_disk_held(source, tmp_path) -> None:
    image = tmp_path / "used.img"
    with open(image, "wb") as f:
        f.truncate(3072 * MIB)
        # junk where the ESP's FAT has only free (zero) entries, a whole MiB of them
        f.seek(2 * MIB)
        f.write(b"\xa5" * (3 * MIB))
    r = cfsdeploy("install", "to-disk", image, "--esp-size", "2048M", "--repo", source, BRANCH, *UNSIGNED)
    assert r.returncode == 0, r.stderr
    fat = extract_esp(image, partitions(image)[0], tmp_path / "esp.img")
    check = subprocess.run(["fsck.vfat", "-n", fat], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
