"""Type #1 boot entries, their names and order, kernels in the boot directory, the switch."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest

from cfsdeploy.boot import bootloader
from cfsdeploy.boot.bootloader import (
    BootEntry,
    BootError,
    Kind,
    Plan,
    RepairKind,
    number,
    parse_entry,
    read_entries,
    recover,
    scan_entries,
    switch_entries,
)

from .sysroots import boot_mount, bootctl_list, bootctl_reads


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


def good_lines(**changes: str) -> bytes:
    """An entry file's lines, some changed (a value None: the line left out)."""
    fields = entry(1).fields() | changes
    return "".join(f"{k} {v}\n" for k, v in fields.items() if v is not None).encode()


@pytest.mark.parametrize("data, why", [
    (b"", "missing title"),
    (good_lines() + b"linux /evil\n", "two linux lines"),
    (good_lines() + b"options x\n", "two options lines"),
    (good_lines() + b"efi /EFI/evil.efi\n", "neither"),
    (good_lines(title="Deb\x85 1"), "not one plain line"),
    (good_lines(title="Deb\u2028linux /evil"), "not one plain line"),
    (good_lines(options="root=/dev/vda\rlinux /evil"), "not one plain line"),
    (good_lines().replace(b"Deb 1", b"Deb \xff"), "not UTF-8"),
    (good_lines(version="7"), "version or sort-key"),
    (good_lines(**{"sort-key": "aaa"}), "version or sort-key"),
    (good_lines(linux="/cfsdeploy/deb/../../x/vmlinuz"), "not a plain path"),
    (good_lines(initrd="relative/initramfs.img"), "not a plain path"),
    (good_lines(options='a="b cfsdeploy=/d/1'), "unbalanced quote"),
])
def test_damaged_entry_is_refused_whole(data, why) -> None:
    with pytest.raises(BootError, match=why):
        parse_entry("cfsdeploy-deb-1.conf", data)


@pytest.mark.parametrize("field, text", [("title", "a\nlinux /evil"), ("options", "x\noptions y"),
                                         ("linux", "/k\ninitrd /x"), ("initrd", "/i\r"), ("title", "")])
def test_render_refuses_a_field_that_is_not_one_plain_line(field, text) -> None:
    with pytest.raises(BootError, match="not one plain line"):
        entry(1, **{field: text}).render()


def test_option_reads_the_options_as_the_kernel_does() -> None:
    e = entry(1, options='systemd.setenv="A=1 cfsdeploy=/evil" cfsdeploy=/d/1 cfsdeploy.verity="try"')
    assert (e.option("cfsdeploy"), e.option("cfsdeploy.verity"), e.option("quiet")) == ("/d/1", "try", None)


def test_damaged_entries_are_listed_apart_and_the_rest_read(tmp_path) -> None:
    d = tmp_path / "loader/entries"
    d.mkdir(parents=True)
    (d / "cfsdeploy-deb-3.conf").write_bytes(entry(3).render())
    (d / "cfsdeploy-deb-2.conf").write_bytes(b"")
    (d / "cfsdeploy-deb-1.conf").write_bytes(b"\xff" + entry(1).render())
    (d / "cfsdeploy-deb-4.conf").symlink_to("cfsdeploy-deb-3.conf")
    good, damaged = scan_entries(str(tmp_path), "deb")
    assert good == [entry(3)]
    assert [(x.kind, os.path.basename(x.path)) for x in damaged] == [
        (Kind.ENTRY, f"cfsdeploy-deb-{n}.conf") for n in (1, 2, 4)]
    assert [x.reason for x in damaged] == ["not UTF-8", "missing title, version, sort-key, options, initrd, linux",
                                           "cannot be read (Too many levels of symbolic links)"]


def test_entries_sharing_a_number_are_both_damaged(tmp_path) -> None:
    d = tmp_path / "loader/entries"
    d.mkdir(parents=True)
    (d / "cfsdeploy-deb-2.conf").write_bytes(entry(2).render())
    (d / "cfsdeploy-deb-2+1.conf").write_bytes(entry(2, tries_left=1).render())
    (d / "cfsdeploy-deb-1.conf").write_bytes(entry(1).render())
    good, damaged = scan_entries(str(tmp_path), "deb")
    assert good == [entry(1)]
    assert sorted(os.path.basename(x.path) for x in damaged) == ["cfsdeploy-deb-2+1.conf", "cfsdeploy-deb-2.conf"]
    assert damaged[0].reason == "another entry has its number 2"


def test_bootctl_reads_quoted_arguments_as_meant(tmp_path) -> None:
    args = ['a="b  c"', 'systemd.setenv="A=1 B=2"', '"quiet"', "cfsdeploy=/d/1"]
    with boot_mount(tmp_path / "esp") as esp:
        switch_entries(str(esp), "deb", [entry(1, options=" ".join(args))], record(tmp_path))
        bootctl_reads(esp, {e.filename: ("Deb 1", args) for e in read_entries(str(esp), "deb")})


@pytest.mark.parametrize("name", ["6.12.0-1-amd64", "6.1.0+deb12~rc1", "a"])
def test_plain_kernel_versions_pass(name) -> None:
    assert bootloader.check_kver(name) == name


@pytest.mark.parametrize("name", ["6.1\noptions systemd.unit=rescue.target x=", ".6.12", "..", "6.1/../x",
                                  "6.1 x", "-6.1", "a" * 129, "6..1", ""])
def test_kernel_version_that_is_no_plain_name_is_refused(name) -> None:
    with pytest.raises(BootError, match="invalid kernel version"):
        bootloader.check_kver(name)


def test_title_text_is_made_one_plain_line() -> None:
    assert bootloader.clean_title("Deb\nlinux /evil\u2028 \t 13\x00") == "Deb linux /evil 13"
    assert len(bootloader.clean_title("x" * 500)) == bootloader.MAX_TITLE


def test_kernel_of_an_entry_names_only_plain_directories() -> None:
    assert bootloader.kernel_of(entry(1, linux="/cfsdeploy/deb/6.1-0123456789ab/vmlinuz")) == \
        bootloader.Kernel("deb", "6.1-0123456789ab")
    assert bootloader.kernel_of(entry(1, linux="/cfsdeploy/deb/.6.1-0123456789ab/vmlinuz")) is None


def test_numbering_gives_the_first_the_highest_number() -> None:
    assert [e.index for e in number([entry(1), entry(7), entry(2)])] == [3, 2, 1]


def test_numbering_keeps_unchanged_entries_that_still_sort_in_order() -> None:
    old = [entry(5), entry(3)]
    assert [e.index for e in number([entry(0, title="new"), *old], old)] == [6, 5, 3]


def test_numbering_puts_a_moved_entry_above_every_existing_number() -> None:
    old = [entry(5), entry(3)]
    assert [e.index for e in number([old[1], old[0]], old)] == [6, 5]


def test_numbering_never_reuses_a_number_taken_by_any_file() -> None:
    assert [e.index for e in number([entry(0)], above=9)] == [10]


def record(tmp_path) -> str:
    return str(tmp_path / "boot-switch.json")


def test_switch_replaces_our_entries_and_keeps_foreign_ones(tmp_path) -> None:
    boot = str(tmp_path)
    os.makedirs(tmp_path / "loader/entries")
    (tmp_path / "loader/entries/windows.conf").write_text("title Windows\nefi /EFI/x.efi\n")
    (tmp_path / "loader/entries/cfsdeploy-other-1.conf").write_bytes(entry(1, os="other").render())
    switch_entries(boot, "deb", [entry(0), entry(0)], record(tmp_path))
    switch_entries(boot, "deb", [entry(0, title="new")], record(tmp_path))
    assert sorted(os.listdir(tmp_path / "loader/entries")) == [
        "cfsdeploy-deb-3.conf", "cfsdeploy-other-1.conf", "windows.conf"]
    assert [e.title for e in read_entries(boot, "deb")] == ["new"]


def test_entries_sort_the_same_for_grub_names_and_systemd_boot(tmp_path) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        entries = number([entry(0, title=f"t{i}") for i in range(12)])
        for e in entries:
            for p in (e.linux, e.initrd):
                os.makedirs(esp / os.path.dirname(p[1:]), exist_ok=True)
                (esp / p[1:]).write_bytes(b"x")
        switch_entries(str(esp), "deb", entries, record(tmp_path))
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
                                         entry(1, title="old")], record(tmp_path))
        assert [json.loads(x)["title"] for x in bootctl_list(esp).splitlines()] == ["old", "new"]


def inodes(boot) -> dict[str, int]:
    d = boot / "loader/entries"
    return {n: os.lstat(d / n).st_ino for n in os.listdir(d)}


def test_a_switch_writes_only_the_entries_that_changed(tmp_path) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        old = switch_entries(str(esp), "deb", [entry(0, title="b"), entry(0, title="a")], record(tmp_path))
        before = inodes(esp)
        switch_entries(str(esp), "deb", [entry(0, title="c"), *old], record(tmp_path))
        after = inodes(esp)
        assert {n: i for n, i in after.items() if n in before} == before
        assert [e.title for e in read_entries(str(esp), "deb")] == ["c", "b", "a"]


def test_the_switch_record_is_gone_once_the_switch_returns(tmp_path) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        switch_entries(str(esp), "deb", [entry(0)], record(tmp_path))
        assert not os.path.exists(record(tmp_path))
        assert os.listdir(esp / "loader") == ["entries"]


def interrupted(tmp_path, esp, write_new: int) -> Plan:
    """A switch from [a] to [c, a'] (a' with another title) whose record was made and
    whose first `write_new` new files were written when the machine stopped."""
    [a] = switch_entries(str(esp), "deb", [entry(0, title="a")], record(tmp_path))
    new = number([entry(0, title="c"), entry(0, title="a2")], [a])
    plan = Plan("deb", [(e.filename, e.render()) for e in new], [a.id])
    (tmp_path / "boot-switch.json").write_text(json.dumps(plan.to_json()))
    for name, data in plan.write[:write_new]:
        (esp / "loader/entries" / name).write_bytes(data)
    return plan


@pytest.mark.parametrize("written", [0, 1, 2])
def test_recover_finishes_an_interrupted_switch(tmp_path, written) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        interrupted(tmp_path, esp, written)
        [r] = recover(str(esp), record(tmp_path))
        assert r.kind == RepairKind.FINISHED_SWITCH
        assert [e.title for e in read_entries(str(esp), "deb")] == ["c", "a2"]
        assert not os.path.exists(record(tmp_path))


def test_recover_rewrites_a_new_entry_the_cut_tore(tmp_path) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        plan = interrupted(tmp_path, esp, 1)
        (esp / "loader/entries" / plan.write[0][0]).write_bytes(b"title c\nlin")
        recover(str(esp), record(tmp_path))
        assert [e.title for e in read_entries(str(esp), "deb")] == ["c", "a2"]


def test_recover_keeps_a_new_entry_that_boot_counting_renamed(tmp_path) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        plan = interrupted(tmp_path, esp, 2)
        name, data = plan.write[0]
        os.rename(esp / "loader/entries" / name, esp / "loader/entries" / name.replace(".conf", "+1-1.conf"))
        recover(str(esp), record(tmp_path))
        assert [(e.title, e.tries_left) for e in read_entries(str(esp), "deb")] == [("c", 1), ("a2", None)]


def test_recover_sets_a_damaged_record_aside_and_changes_no_entry(tmp_path) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        switch_entries(str(esp), "deb", [entry(0, title="a")], record(tmp_path))
        (tmp_path / "boot-switch.json").write_text('{"os": "deb", "write": [["../../x.conf", "x"]], "remove": []}')
        [r] = recover(str(esp), record(tmp_path))
        assert r.kind == RepairKind.DAMAGED_RECORD and r.path == record(tmp_path) + ".damaged"
        assert [e.title for e in read_entries(str(esp), "deb")] == ["a"]


def test_recover_removes_the_staging_directory_older_versions_left(tmp_path) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        switch_entries(str(esp), "deb", [entry(0, title="a")], record(tmp_path))
        (esp / "loader/entries.staged").mkdir()
        (esp / "loader/entries.staged/cfsdeploy-deb-9.conf").write_bytes(entry(9).render())
        [r] = recover(str(esp), record(tmp_path))
        assert r.kind == RepairKind.REMOVED_LEFTOVER
        assert os.listdir(esp / "loader") == ["entries"]


def test_recover_leaves_a_staging_directory_that_may_share_clusters_with_the_entries(tmp_path) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        switch_entries(str(esp), "deb", [entry(0, title="a")], record(tmp_path))
        shutil.copytree(esp / "loader/entries", esp / "loader/entries.staged")
        [r] = recover(str(esp), record(tmp_path))
        assert r.kind == RepairKind.SUSPECT_LEFTOVER
        assert [e.title for e in read_entries(str(esp), "deb")] == ["a"]


def test_a_full_boot_directory_undoes_the_switch_and_keeps_the_old_entries(tmp_path) -> None:
    with boot_mount(tmp_path / "esp", size_mib=1) as esp:
        switch_entries(str(esp), "deb", [entry(0, title="a")], record(tmp_path))
        (esp / "filler").write_bytes(b"x" * ((1 << 20) - 8192))
        with pytest.raises(BootError, match="full"):
            big = [entry(0, title=f"t{i}" * 100, options="x" * 1500) for i in range(8)]
            switch_entries(str(esp), "deb", big, record(tmp_path))
        assert [e.title for e in read_entries(str(esp), "deb")] == ["a"]
        assert not os.path.exists(record(tmp_path))


def test_durable_removal_removes_a_symlink_and_never_what_it_points_to(tmp_path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/keep").write_text("x")
    (tmp_path / "boot/cfsdeploy/deb/k").mkdir(parents=True)
    (tmp_path / "boot/cfsdeploy/deb/k/link").symlink_to(tmp_path / "outside")
    bootloader.remove_unused_kernels(str(tmp_path / "boot"), "deb", [])
    assert (tmp_path / "outside/keep").read_text() == "x"
    assert os.listdir(tmp_path / "boot/cfsdeploy/deb") == []


def test_kernel_installed_once_per_distinct_pair(tmp_path) -> None:
    k1 = bootloader.install_kernel(str(tmp_path), "deb", "6.1", io.BytesIO(b"kernel"), io.BytesIO(b"initrd"))
    again = bootloader.install_kernel(str(tmp_path), "deb", "6.1", io.BytesIO(b"kernel"), io.BytesIO(b"initrd"))
    other = bootloader.install_kernel(str(tmp_path), "deb", "6.1", io.BytesIO(b"kernel"), io.BytesIO(b"initrd2"))
    assert k1 == again != other
    assert (tmp_path / k1.relpath / "vmlinuz").read_bytes() == b"kernel"
    assert (tmp_path / k1.relpath / "initramfs.img").read_bytes() == b"initrd"
    assert k1.linux == f"/cfsdeploy/deb/{k1.dirname}/vmlinuz" and k1.dirname.startswith("6.1-")


def test_a_kernel_directory_a_crash_left_without_its_mark_is_written_again(tmp_path) -> None:
    k = bootloader.install_kernel(str(tmp_path), "deb", "6.1", io.BytesIO(b"kernel"), io.BytesIO(b"initrd"))
    os.unlink(tmp_path / k.relpath / "complete")
    (tmp_path / k.relpath / "initramfs.img").write_bytes(b"init")
    again = bootloader.install_kernel(str(tmp_path), "deb", "6.1", io.BytesIO(b"kernel"), io.BytesIO(b"initrd"))
    assert again == k and (tmp_path / k.relpath / "initramfs.img").read_bytes() == b"initrd"


def test_a_kernel_directory_of_an_older_version_is_checked_once_and_marked(tmp_path) -> None:
    k = bootloader.install_kernel(str(tmp_path), "deb", "6.1", io.BytesIO(b"kernel"), io.BytesIO(b"initrd"))
    os.unlink(tmp_path / k.relpath / "complete")
    assert bootloader.kernel_complete(str(tmp_path), k)
    assert (tmp_path / k.relpath / "complete").exists()


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


def test_recover_sets_aside_a_switch_record_that_is_a_symlink(tmp_path) -> None:
    with boot_mount(tmp_path / "esp") as esp:
        plan = interrupted(tmp_path, esp, 0)
        os.rename(record(tmp_path), tmp_path / "elsewhere.json")
        os.symlink(tmp_path / "elsewhere.json", record(tmp_path))
        [r] = recover(str(esp), record(tmp_path))
        assert r.kind == RepairKind.DAMAGED_RECORD
        assert [e.title for e in read_entries(str(esp), "deb")] == ["a"] and plan.write
