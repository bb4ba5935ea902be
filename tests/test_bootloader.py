"""Type #1 boot entries, their names and order, kernels in the boot directory, the switch."""

from __future__ import annotations

import io
import json
import os

import pytest

from cfsdeploy import bootloader
from cfsdeploy.bootloader import BootEntry, BootError, number, parse_entry, read_entries, switch_entries

from .sysroots import bootctl_list, boot_mount


def entry(index: int, **kw: object) -> BootEntry:
    fields = dict(os="deb", index=index, title=f"Deb {index}", linux="/cfsdeploy/deb/k-1/vmlinuz",
                  initrd="/cfsdeploy/deb/k-1/initramfs.img", options=f"root=/dev/vda cfsdeploy=/d/{index}")
    fields.update(kw)
    return BootEntry(**fields)  # type: ignore[arg-type]


def test_entry_renders_and_parses_back() -> None:
    e = entry(3, tries_left=2, tries_done=1)
    assert parse_entry(e.filename, e.render()) == e
    assert e.render().decode().splitlines()[:3] == ["title Deb 3", "version 3", "sort-key cfsdeploy-deb"]


@pytest.mark.parametrize("left, done, name", [(None, None, "cfsdeploy-deb-3.conf"),
                                              (3, None, "cfsdeploy-deb-3+3.conf"),
                                              (0, 3, "cfsdeploy-deb-3+0-3.conf")])
def test_file_name_carries_boot_counting(left, done, name) -> None:
    assert entry(3, tries_left=left, tries_done=done).filename == name


def test_os_names_with_digits_and_dots_parse() -> None:
    e = entry(12, os="debian13.x")
    assert parse_entry(e.filename, e.render()).os == "debian13.x"


def test_entry_missing_a_key_is_rejected() -> None:
    with pytest.raises(BootError, match="missing linux"):
        parse_entry("cfsdeploy-deb-1.conf", b"title x\nversion 1\nsort-key cfsdeploy-deb\ninitrd /i\noptions a\n")


def test_numbering_gives_the_first_the_highest_number() -> None:
    assert [e.index for e in number([entry(1), entry(7), entry(2)])] == [3, 2, 1]


def test_switch_replaces_our_entries_and_keeps_foreign_ones(tmp_path) -> None:
    boot = str(tmp_path)
    os.makedirs(tmp_path / "loader/entries")
    (tmp_path / "loader/entries/windows.conf").write_text("title Windows\nefi /EFI/x.efi\n")
    (tmp_path / "loader/entries/cfsdeploy-other-1.conf").write_bytes(entry(1, os="other").render())
    switch_entries(boot, "deb", number([entry(0), entry(0)]))
    switch_entries(boot, "deb", number([entry(0, title="new")]))
    assert sorted(os.listdir(tmp_path / "loader/entries")) == [
        "cfsdeploy-deb-1.conf", "cfsdeploy-other-1.conf", "windows.conf"]
    assert [e.title for e in read_entries(boot, "deb")[0]] == ["new"]
    assert not (tmp_path / "loader/entries.staged").exists()


def test_entries_sort_the_same_for_grub_names_and_systemd_boot(tmp_path) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        entries = number([entry(0, title=f"t{i}") for i in range(12)])
        for e in entries:
            for p in (e.linux, e.initrd):
                os.makedirs(esp / os.path.dirname(p[1:]), exist_ok=True)
                (esp / p[1:]).write_bytes(b"x")
        switch_entries(str(esp), "deb", entries)
        listed = [json.loads(line) for line in bootctl_list(esp).splitlines()]
        # systemd-boot's order (sort-key, then version descending) is ours ...
        assert [e["title"] for e in listed] == [f"t{i}" for i in range(12)]
        # ... and so is GRUB's: file names compared as versions, highest first.
        by_name = sorted(os.listdir(esp / "loader/entries"),
                         key=lambda n: int(n.split("-")[-1].split(".")[0]), reverse=True)
        assert [parse_entry(n, (esp / "loader/entries" / n).read_bytes()).title for n in by_name] == \
               [f"t{i}" for i in range(12)]


def test_failed_entry_sorts_last_for_systemd_boot(tmp_path) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        switch_entries(str(esp), "deb", [entry(2, title="new", tries_left=0, tries_done=3),
                                         entry(1, title="old")])
        assert [json.loads(x)["title"] for x in bootctl_list(esp).splitlines()] == ["old", "new"]


def test_switch_exchanges_whole_directories(tmp_path) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        switch_entries(str(esp), "deb", [entry(1)])
        switch_entries(str(esp), "deb", number([entry(0, title="b"), entry(0, title="a")]))
        assert [e.title for e in read_entries(str(esp), "deb")[0]] == ["b", "a"]
        assert os.listdir(esp / "loader") == ["entries"]


def test_kernel_installed_once_per_distinct_pair(tmp_path) -> None:
    k1 = bootloader.install_kernel(str(tmp_path), "deb", "6.1", io.BytesIO(b"kernel"), io.BytesIO(b"initrd"))
    again = bootloader.install_kernel(str(tmp_path), "deb", "6.1", io.BytesIO(b"kernel"), io.BytesIO(b"initrd"))
    other = bootloader.install_kernel(str(tmp_path), "deb", "6.1", io.BytesIO(b"kernel"), io.BytesIO(b"initrd2"))
    assert k1 == again != other
    assert (tmp_path / k1.relpath / "vmlinuz").read_bytes() == b"kernel"
    assert (tmp_path / k1.relpath / "initramfs.img").read_bytes() == b"initrd"
    assert k1.linux == f"/cfsdeploy/deb/{k1.dirname}/vmlinuz" and k1.dirname.startswith("6.1-")


def test_unused_kernels_and_leftovers_are_removed(tmp_path) -> None:
    keep = bootloader.install_kernel(str(tmp_path), "deb", "6.1", io.BytesIO(b"a"), io.BytesIO(b"b"))
    drop = bootloader.install_kernel(str(tmp_path), "deb", "6.2", io.BytesIO(b"c"), io.BytesIO(b"d"))
    os.mkdir(tmp_path / "cfsdeploy/deb/.6.3-x.tmp")
    removed = bootloader.remove_unused_kernels(str(tmp_path), "deb", [keep])
    assert removed == [".6.3-x.tmp", drop.dirname]
    assert os.listdir(tmp_path / "cfsdeploy/deb") == [keep.dirname]


def test_full_boot_directory_is_a_clear_error_and_leaves_nothing(tmp_path) -> None:
    with boot_mount(tmp_path / "esp", size_mib=2) as esp:
        big = io.BytesIO(os.urandom(3 << 20))
        with pytest.raises(BootError, match="full"):
            bootloader.install_kernel(str(esp), "deb", "6.1", big, io.BytesIO(b"i"))
        assert os.listdir(esp / "cfsdeploy/deb") == []
