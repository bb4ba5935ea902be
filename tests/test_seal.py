"""Sealed commits, the build side: `commit --seal` makes a signed UKI of the tree's
systemd-stub, kernel, initramfs and os-release whose command line names the commit's
image, signs the tree's systemd-boot with the same key, and stores both as objects
that fsck, verify, prune and pull treat as the commit's own.

Real parts: the host's systemd-stub and systemd-boot in the tree, objcopy, sbsign
and sbverify with throwaway keys, gpg for the commit's signature."""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

import pygit2
import pytest
from click.testing import CliRunner

from cfsdeploy.boot import uki
from cfsdeploy.cli import main
from cfsdeploy.composefs.fsverity import Digest
from cfsdeploy.composefs.tree import Inode, lookup
from cfsdeploy.repo.fsck import ProblemKind, fsck
from cfsdeploy.repo.repository import (
    TRAILER_SEALED_LOADER,
    TRAILER_SEALED_UKI,
    CommitResult,
    Repository,
    Sealed,
    TrailerError,
    manifest_of,
    prune,
    verify_commit,
)
from cfsdeploy.repo.signing import SignatureError
from cfsdeploy.sysroot.seal import (
    SealIntegrityError,
    SealNotFoundError,
    SealUsageError,
    make_sealer,
    uki_problem,
    verify_seal,
)

from . import secureboot
from .sealing import LOADER, STUB, sealable_tree
from .sysroots import KVER
from .test_signing import signer_home  # noqa: F401  (a fixture)

BRANCH = "testos/stable"
DOC = Path(__file__).parent.parent / "docs/json.md"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[secureboot.KeyPair, secureboot.KeyPair]:
    d = tmp_path_factory.mktemp("sbkeys")
    return secureboot.make_key(d, "vendor"), secureboot.make_key(d, "stranger")


@pytest.fixture
def vendor(keys) -> secureboot.KeyPair:
    return keys[0]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return sealable_tree(tmp_path / "tree")


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


def seal(repo: Repository, tree: Path | str, vendor: secureboot.KeyPair, **kwargs) -> CommitResult:
    sealer = make_sealer(repo, str(vendor.key), str(vendor.cert), **kwargs)
    return repo.commit(tree, BRANCH, "sealed build", sealer=sealer)


@pytest.fixture
def sealed(repo: Repository, tree: Path, vendor: secureboot.KeyPair) -> CommitResult:
    return seal(repo, tree, vendor)


def uki_of(repo: Repository, r: CommitResult) -> str:
    assert r.sealed is not None
    return repo.objects.path_of(r.sealed.uki)


def loader_of(repo: Repository, r: CommitResult) -> str:
    assert r.sealed is not None
    return repo.objects.path_of(r.sealed.loader)


# --- what the seal is made of --------------------------------------------------------------


def test_the_ukis_command_line_names_the_image_and_requires_verity(repo, sealed) -> None:
    assert uki.cmdline_of(uki_of(repo, sealed)) == (
        f"root=LABEL=root rw cfsdeploy.digest={sealed.image_digest.hex()} cfsdeploy.verity=require")


def test_the_vendors_arguments_follow_and_its_root_replaces_the_default(repo, tree, vendor) -> None:
    r = seal(repo, tree, vendor, kargs=("console=ttyS0", "root=PARTUUID=1234", "quiet"))
    assert uki.cmdline_of(uki_of(repo, r)) == (
        f"root=PARTUUID=1234 rw cfsdeploy.digest={r.image_digest.hex()} cfsdeploy.verity=require "
        "console=ttyS0 quiet")


def test_the_uki_holds_the_trees_kernel_initramfs_os_release_and_kernel_version(repo, tree, sealed) -> None:
    got = uki.sections(uki_of(repo, sealed), (".linux", ".initrd", ".osrel", ".uname"))
    assert got == {".linux": (tree / f"usr/lib/modules/{KVER}/vmlinuz").read_bytes(),
                   ".initrd": (tree / f"usr/lib/modules/{KVER}/initramfs.img").read_bytes(),
                   ".osrel": (tree / "usr/lib/os-release").read_bytes(), ".uname": KVER.encode()}


def test_the_uki_is_made_of_the_trees_stub(repo, tree, sealed) -> None:
    stub = uki.sections(tree / STUB)
    assert {k: v for k, v in uki.sections(uki_of(repo, sealed)).items() if k in stub} == stub


def test_kver_picks_the_kernel_sealed(repo, tree, vendor) -> None:
    older = tree / "usr/lib/modules/6.1.0-old"
    older.mkdir()
    (older / "vmlinuz").write_bytes(b"old kernel" * 1000)
    (older / "initramfs.img").write_bytes(b"old initramfs" * 1000)
    r = seal(repo, tree, vendor, kver="6.1.0-old")
    assert uki.sections(uki_of(repo, r), (".uname", ".linux")) == {
        ".uname": b"6.1.0-old", ".linux": b"old kernel" * 1000}


def test_an_absolute_os_release_symlink_is_followed_inside_the_tree(repo, tree, vendor) -> None:
    (tree / "etc/os-release").unlink()
    (tree / "etc/os-release").symlink_to("/usr/lib/os-release")
    r = seal(repo, tree, vendor)
    assert uki.sections(uki_of(repo, r), (".osrel",))[".osrel"] == (tree / "usr/lib/os-release").read_bytes()


def test_an_os_release_symlink_climbing_out_stops_at_the_trees_root(repo, tree, vendor) -> None:
    (tree / "etc/os-release").unlink()
    (tree / "etc/os-release").symlink_to("../../../../../usr/lib/os-release")
    r = seal(repo, tree, vendor)
    assert uki.sections(uki_of(repo, r), (".osrel",))[".osrel"] == (tree / "usr/lib/os-release").read_bytes()


def test_a_tree_from_a_tar_archive_is_sealed_from_its_staged_objects(repo, tree, vendor, tmp_path) -> None:
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree, arcname=".")
    r = seal(repo, f"tar:{archive}", vendor)
    assert uki.sections(uki_of(repo, r), (".linux",))[".linux"] == (
        tree / f"usr/lib/modules/{KVER}/vmlinuz").read_bytes()


def test_the_uki_and_loader_verify_with_the_vendors_certificate_not_anothers(repo, sealed, keys) -> None:
    vendor, stranger = keys
    for path in (uki_of(repo, sealed), loader_of(repo, sealed)):
        assert uki.verify(path, vendor.cert)
        assert not uki.verify(path, stranger.cert)


def test_the_loader_is_the_trees_systemd_boot_signed(repo, tree, sealed) -> None:
    assert uki.read_headers(loader_of(repo, sealed)).signed
    assert uki.sections(loader_of(repo, sealed)) == uki.sections(tree / LOADER)


def test_sealing_the_same_tree_again_gives_the_same_images_but_for_the_signatures(repo, tree, vendor,
                                                                                 sealed) -> None:
    # sbsign's PKCS#7 signature carries its signing time, so the objects may differ
    again = seal(repo, tree, vendor)
    assert uki.sections(uki_of(repo, again)) == uki.sections(uki_of(repo, sealed))
    assert uki.sections(loader_of(repo, again)) == uki.sections(loader_of(repo, sealed))


def test_nothing_of_the_key_is_stored(repo, vendor, sealed) -> None:
    secret = vendor.key.read_bytes()
    for top, _, files in os.walk(repo.path):
        for name in files:
            assert secret not in Path(top, name).read_bytes()


def test_the_seal_leaves_nothing_in_tmp(repo, sealed) -> None:
    assert os.listdir(os.path.join(repo.path, "tmp")) == []


# --- refusals --------------------------------------------------------------------------------


def test_a_tree_without_a_stub_is_refused_and_nothing_committed(repo, tree, vendor) -> None:
    (tree / STUB).unlink()
    with pytest.raises(SealUsageError, match=r"no systemd-stub .*searched /usr/lib/systemd/boot/efi/linux\{x64,"):
        seal(repo, tree, vendor)
    assert repo.branch_head(BRANCH) is None


def test_a_tree_without_systemd_boot_is_refused(repo, tree, vendor) -> None:
    (tree / LOADER).unlink()
    with pytest.raises(SealUsageError, match="no boot loader /usr/lib/systemd/boot/efi/systemd-bootx64.efi"):
        seal(repo, tree, vendor)


def test_a_tree_without_a_kernel_is_refused(repo, tree, vendor) -> None:
    (tree / f"usr/lib/modules/{KVER}/initramfs.img").unlink()
    with pytest.raises(SealUsageError, match=r"no kernel with an initramfs to seal \(searched /usr/lib/modules/"):
        seal(repo, tree, vendor)


def test_a_kernel_version_the_tree_lacks_is_refused(repo, tree, vendor) -> None:
    with pytest.raises(SealUsageError, match=f"no kernel 9.9 with an initramfs.*; it has {KVER}"):
        seal(repo, tree, vendor, kver="9.9")


def test_a_tree_without_os_release_is_refused(repo, tree, vendor) -> None:
    (tree / "usr/lib/os-release").unlink()
    with pytest.raises(SealUsageError, match="no os-release .*searched /etc/os-release, /usr/lib/os-release"):
        seal(repo, tree, vendor)


@pytest.mark.parametrize("arg", ["cfsdeploy=/ostree/x", "cfsdeploy.digest=" + "0" * 64, "cfsdeploy.verity=off",
                                 "cfsdeploy.anything=1", 'x="a cfsdeploy.verity=try"'])
def test_a_cfsdeploy_argument_is_refused_before_the_commit(repo, vendor, arg) -> None:
    with pytest.raises(SealUsageError, match="cfsdeploy arguments of a sealed UKI are cfsdeploy's own"):
        make_sealer(repo, str(vendor.key), str(vendor.cert), kargs=(arg,))


@pytest.mark.parametrize("arg", ["it's", "a\\b", "", "two words", "--"])
def test_an_argument_that_is_no_plain_kernel_argument_is_refused(repo, vendor, arg) -> None:
    with pytest.raises(SealUsageError, match="sealed kernel argument"):
        make_sealer(repo, str(vendor.key), str(vendor.cert), kargs=(arg,))


def test_a_missing_key_file_is_refused_before_the_commit(repo, vendor, tmp_path) -> None:
    with pytest.raises(SealNotFoundError, match="Secure Boot key .*: no such file"):
        make_sealer(repo, str(tmp_path / "nokey"), str(vendor.cert))


def test_a_missing_certificate_file_is_refused(repo, vendor, tmp_path) -> None:
    with pytest.raises(SealNotFoundError, match="Secure Boot certificate .*: no such file"):
        make_sealer(repo, str(vendor.key), str(tmp_path / "nocert"))


def test_key_and_certificate_the_wrong_way_round_are_refused(repo, vendor) -> None:
    with pytest.raises(SealUsageError, match="no PEM key in it"):
        make_sealer(repo, str(vendor.cert), str(vendor.key))


def test_an_invalid_kernel_version_is_refused(repo, vendor) -> None:
    with pytest.raises(SealUsageError, match="kernel to seal"):
        make_sealer(repo, str(vendor.key), str(vendor.cert), kver="../x")


def test_a_corrupt_kernel_object_is_not_sealed(repo, tree, vendor) -> None:
    # committed once (objects stored), the kernel's object then damaged on disk
    first = repo.commit(tree, "plain", "unsealed")
    kernel = lookup(manifest_of(repo, first.commit), f"/usr/lib/modules/{KVER}/vmlinuz".encode())
    assert isinstance(kernel, Inode) and kernel.digest is not None
    path = repo.objects.path_of(kernel.digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"evil")
    (tree / "etc/hostname").write_text("changed\n")  # a new commit; the cache names the same object
    with pytest.raises(SealIntegrityError, match=f"/usr/lib/modules/{KVER}/vmlinuz: object .* is corrupt"):
        seal(repo, tree, vendor)


# --- the commit's signature covers the seal -------------------------------------------------


def test_the_seal_trailers_are_covered_by_the_gpg_signature(repo, tree, vendor, signer_home) -> None:  # noqa: F811
    sealer = make_sealer(repo, str(vendor.key), str(vendor.cert))
    r = repo.commit(tree, BRANCH, "sealed", sealer=sealer, sign_key="builder@example.com", gpg_homedir=signer_home)
    assert verify_commit(repo, BRANCH, gpg_homedir=signer_home)
    commit = repo.resolve(r.commit)
    signature, payload = commit.gpg_signature
    assert f"{TRAILER_SEALED_UKI}: {r.sealed.uki.hex()}".encode() in payload
    other = os.urandom(32).hex()
    tampered = payload.decode().replace(f"{TRAILER_SEALED_UKI}: {r.sealed.uki.hex()}", f"{TRAILER_SEALED_UKI}: {other}")
    oid = repo.git.create_commit_with_signature(tampered, signature.decode())
    repo.git.references.create("refs/heads/evil", oid)
    with pytest.raises(SignatureError, match="bad signature"):
        verify_commit(repo, "evil", gpg_homedir=signer_home)


# --- fsck, verify, prune ---------------------------------------------------------------------


def test_fsck_finds_a_sealed_commit_sound(repo, sealed) -> None:
    report = fsck(repo, seal_check=uki_problem)
    assert report.ok, report.problems


def test_fsck_catches_a_uki_whose_command_line_names_another_image(repo, tree, vendor) -> None:
    real = make_sealer(repo, str(vendor.key), str(vendor.cert))
    other = Digest(os.urandom(32))

    def seal_another(root: Inode, image: Digest) -> Sealed:
        return real(root, other)

    r = repo.commit(tree, BRANCH, "sealed for another image", sealer=seal_another)
    problems = fsck(repo, seal_check=uki_problem).problems
    assert [(p.kind, p.commit, p.object) for p in problems] == [
        (ProblemKind.SEAL_MISMATCH, r.commit, r.sealed.uki.hex())]
    assert f"names image {other.hex()}, not the commit's {r.image_digest.hex()}" in problems[0].detail


def test_fsck_reports_a_missing_sealed_loader(repo, sealed) -> None:
    os.unlink(loader_of(repo, sealed))
    problems = fsck(repo, quick=True).problems
    assert [(p.kind, p.object, p.sealed) for p in problems] == [
        (ProblemKind.MISSING_OBJECT, sealed.sealed.loader.hex(), "loader")]


def test_fsck_reports_damaged_seal_trailers(repo, sealed) -> None:
    c = repo.resolve(sealed.commit)
    message = c.message.replace(f"{TRAILER_SEALED_LOADER}: {sealed.sealed.loader.hex()}\n", "")
    half = repo.git.create_commit("refs/heads/half", c.author, c.committer, message, c.tree_id, [])
    problems = fsck(repo, quick=True).problems
    assert [(p.kind, p.commit) for p in problems] == [(ProblemKind.BAD_SEAL, str(half))]


def test_fsck_cli_says_the_uki_does_not_seal_the_image(repo, tree, vendor) -> None:
    real = make_sealer(repo, str(vendor.key), str(vendor.cert))
    repo.commit(tree, BRANCH, "sealed for another image", sealer=lambda root, image: real(root, Digest(b"\1" * 32)))
    r = CliRunner().invoke(main, ["fsck", "--repo", repo.path])
    assert r.exit_code == 4
    assert "does not seal its image: its command line names image " + "01" * 32 in r.output


def test_verify_seal_accepts_a_sound_seal_signed_with_the_certificate(repo, sealed, vendor) -> None:
    assert verify_seal(repo, repo.resolve(sealed.commit), cert=str(vendor.cert)) == sealed.sealed


def test_verify_seal_refuses_another_certificate(repo, sealed, keys) -> None:
    with pytest.raises(SealIntegrityError, match="its sealed UKI is not signed by"):
        verify_seal(repo, repo.resolve(sealed.commit), cert=str(keys[1].cert))


def test_verify_seal_refuses_a_corrupt_uki(repo, sealed) -> None:
    path = uki_of(repo, sealed)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\0evil\0")
    with pytest.raises(SealIntegrityError, match="its sealed UKI .* is corrupt"):
        verify_seal(repo, repo.resolve(sealed.commit))


def test_verify_seal_with_a_certificate_refuses_an_unsealed_commit(repo, tree, vendor) -> None:
    r = repo.commit(tree, "plain", "unsealed")
    with pytest.raises(SealIntegrityError, match="is not sealed"):
        verify_seal(repo, repo.resolve(r.commit), cert=str(vendor.cert))


def test_verify_seal_refuses_damaged_seal_trailers(repo, sealed) -> None:
    c = repo.resolve(sealed.commit)
    message = c.message.replace(f"{TRAILER_SEALED_UKI}: {sealed.sealed.uki.hex()}\n", "")
    half = repo.git.create_commit(None, c.author, c.committer, message, c.tree_id, [])
    with pytest.raises(TrailerError):
        verify_seal(repo, repo.git[half].peel(pygit2.Commit))


def test_prune_keeps_what_seals_a_commit(repo, sealed) -> None:
    prune(repo)
    assert repo.objects.has(sealed.sealed.uki) and repo.objects.has(sealed.sealed.loader)


# --- the command line -------------------------------------------------------------------------


def cli_commit(repo: Repository, tree: Path, *args: str):
    return CliRunner().invoke(main, ["commit", "--repo", repo.path, "--tree", str(tree), "-b", BRANCH, "-m", "build",
                                     *args])


def test_commit_seal_prints_the_commit_and_says_it_is_sealed(repo, tree, vendor) -> None:
    r = cli_commit(repo, tree, "--seal", "--secureboot-key", str(vendor.key), "--secureboot-cert", str(vendor.cert),
                   "--seal-karg", "console=ttyS0")
    assert r.exit_code == 0, r.output
    commit = repo.resolve(BRANCH)
    assert r.stdout.strip() == str(commit.id)
    assert re.search(r"^sealed: UKI [0-9a-f]{64} loader [0-9a-f]{64}$", r.stderr, re.M)
    assert uki.cmdline_of(repo.objects.path_of(bytes.fromhex(r.stderr.split("UKI ")[1].split()[0]))).endswith(
        "cfsdeploy.verity=require console=ttyS0")


def documented_commit_keys() -> set[str]:
    section = DOC.read_text().split("### `cfsdeploy commit --json`\n", 1)[1].split("\n### ", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", section, re.M))


def test_commit_json_has_exactly_the_documented_keys_and_the_seal(repo, tree, vendor) -> None:
    r = cli_commit(repo, tree, "--seal", "--secureboot-key", str(vendor.key), "--secureboot-cert", str(vendor.cert),
                   "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == documented_commit_keys()
    assert out["schema"] == 1 and out["commit"] == str(repo.resolve(BRANCH).id)
    assert set(out["sealed"]) == {"uki", "loader"}


def test_commit_json_of_an_unsealed_commit_says_null(repo, tree) -> None:
    out = json.loads(cli_commit(repo, tree, "--json").stdout)
    assert out["sealed"] is None and out["branch"] == BRANCH


@pytest.mark.parametrize("args", [["--seal"], ["--seal", "--secureboot-key", "k"],
                                  ["--secureboot-key", "k", "--secureboot-cert", "c"], ["--seal-karg", "quiet"],
                                  ["--kver", KVER]])
def test_seal_options_go_together_or_it_is_a_usage_error(repo, tree, args) -> None:
    r = cli_commit(repo, tree, *args)
    assert r.exit_code == 2 and r.output.count("\n") == 1


def test_commit_seal_with_a_missing_key_exits_3_before_scanning(repo, tree, vendor, tmp_path) -> None:
    r = cli_commit(repo, tree, "--seal", "--secureboot-key", str(tmp_path / "no"), "--secureboot-cert",
                   str(vendor.cert))
    assert r.exit_code == 3 and "no such file" in r.output
    assert repo.branch_head(BRANCH) is None and os.listdir(repo.objects.path) == []


def test_show_and_log_say_a_commit_is_sealed(repo, sealed) -> None:
    line = f"Sealed:  UKI {sealed.sealed.uki.hex()} loader {sealed.sealed.loader.hex()}"
    for command in ("show", "log"):
        r = CliRunner().invoke(main, [command, "--repo", repo.path, BRANCH])
        assert r.exit_code == 0 and line in r.output.splitlines()


def test_verify_cli_checks_the_seal_with_the_certificate(repo, tree, keys, signer_home) -> None:  # noqa: F811
    vendor, stranger = keys
    sealer = make_sealer(repo, str(vendor.key), str(vendor.cert))
    repo.commit(tree, BRANCH, "sealed", sealer=sealer, sign_key="builder@example.com", gpg_homedir=signer_home)
    base = ["verify", "--repo", repo.path, BRANCH, "--gpg-homedir", signer_home]
    ok = CliRunner().invoke(main, [*base, "--secureboot-cert", str(vendor.cert)])
    assert ok.exit_code == 0 and "sealed: UKI " in ok.output, ok.output
    bad = CliRunner().invoke(main, [*base, "--secureboot-cert", str(stranger.cert)])
    assert bad.exit_code == 4 and "not signed by" in bad.output

