"""hooks/cfsdeploy-prepare-root, the real script, run as the initramfs would run it.

Each boot happens in a private mount namespace (unshare -m): a tmpfs on /run as
in an initramfs, a tmpfs holding a copy of the test sysroot as the physical
root, mounted read-only as initramfs-tools does, then the script.  The namespace
is held open while the test looks at it through /proc/PID/root and
/proc/PID/mountinfo, and everything goes when it exits.

This host's kernel may lack fs-verity, and tmpfs never has it, so the boots that
succeed use cfsdeploy.verity=off or try, but a sealed one (verity=require only),
which gets an fsverity command that measures by computing (see SEALED_FSVERITY).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cfsdeploy.composefs.tree import Inode, lookup
from cfsdeploy.repo.checkout import checkout
from cfsdeploy.repo.repository import Repository, image_digest_of, manifest_of

from .fstree import compare_trees

# Every boot needs the sysroot fixture, and so root, loop devices, erofs and overlayfs
# (it skips, saying why, where they are missing); the static script checks at the
# end need none of it but are selected along with the boots.
pytestmark = pytest.mark.root

SCRIPT = Path(__file__).resolve().parent.parent / "hooks" / "cfsdeploy-prepare-root"
OS = "testos"
MTIME_NS = 1_700_000_000_123_456_789
# Holds the namespace: sets up the initramfs-like mounts, runs the script with its
# output to $OUT, says its exit status, and waits for stdin to close.
HOLDER = r"""
set -e
mount -t tmpfs -o mode=0755 run /run
mount -t tmpfs -o mode=0755 physroot "$PHYS"
cp -a "$SYSROOT/." "$PHYS/"
cd "$PHYS"; eval "$BREAK"; cd /
mount -o remount,ro "$PHYS"
set +e
PATH="$TOOLS$PATH" $SHELL_CMD "$SCRIPT" "$PHYS" "$NEW" >"$OUT" 2>&1
echo $?
exec cat >/dev/null
"""


def make_os_tree(root: Path, *, sysroot_dir: bool = True) -> None:
    """A small root filesystem: files inline and in objects, a hardlink, a symlink,
    a device, owners, modes and xattrs, and the directories a deployment needs."""
    for d in ("usr/bin", "usr/lib", "usr/share/doc", "etc/default", "var", "dev", "proc", "sys", "run", "tmp"):
        (root / d).mkdir(parents=True)
    if sysroot_dir:
        (root / "sysroot").mkdir()
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho tool\n" * 10)
    os.chmod(root / "usr/bin/tool", 0o4755)
    (root / "usr/lib/libbig.so").write_bytes(os.urandom(1 << 20))
    (root / "usr/share/doc/small").write_bytes(b"inline")
    (root / "usr/share/doc/empty").write_bytes(b"")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-again")
    os.symlink("usr/bin", root / "bin")
    os.mknod(root / "dev/null", 0o20666, os.makedev(1, 3))
    os.chown(root / "usr/share/doc/small", 1000, 1000)
    os.setxattr(root / "usr/lib/libbig.so", b"user.origin", b"test")
    os.chmod(root / "tmp", 0o1777)
    (root / "etc/hostname").write_bytes(b"cfsdeploy-test\n")
    (root / "etc/default/secret").write_bytes(b"key=value\n")
    os.chmod(root / "etc/default/secret", 0o600)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames + [""]:
            os.utime(os.path.join(dirpath, name), ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)


@dataclass(frozen=True)
class Deployment:
    path: str  # /cfsdeploy/deploy/<os>/<name>, as on the command line
    digest: str  # of the image


@dataclass(frozen=True)
class Sysroot:
    path: Path  # built here; each boot copies it into a tmpfs
    tree: Path  # what was committed
    good: Deployment
    no_sysroot: Deployment  # its image lacks /sysroot
    object_digest: str  # an object that is a file, not an image


def deploy(repo: Repository, branch: str, sysroot: Path) -> Deployment:
    """Lay out SYSROOT/cfsdeploy/deploy/<os>/<name>/etc as the contract says."""
    commit = repo.resolve(branch)
    name = f"{str(commit.id)[:12]}.0"
    depdir = sysroot / "cfsdeploy/deploy" / OS / name
    depdir.mkdir(parents=True)
    etc = lookup(manifest_of(repo, branch), b"/etc")
    assert isinstance(etc, Inode)
    checkout(etc, repo.objects, depdir / "etc")
    return Deployment(f"/cfsdeploy/deploy/{OS}/{name}", image_digest_of(commit).hex())


@pytest.fixture(scope="module")
def sysroot(tmp_path_factory: pytest.TempPathFactory, requires_mount: None) -> Sysroot:
    top = tmp_path_factory.mktemp("prepare-root")
    tree, bare = top / "tree", top / "bare"
    make_os_tree(tree)
    make_os_tree(bare, sysroot_dir=False)
    path = top / "sysroot"
    repo = Repository.init(path / "cfsdeploy/repo")
    repo.commit(tree, f"{OS}/stable", "test os")
    repo.commit(bare, f"{OS}/bare", "test os without /sysroot")
    var = path / "cfsdeploy/deploy" / OS / "var"
    (var / "lib").mkdir(parents=True)
    (var / "lib/state").write_bytes(b"kept across deployments\n")
    lib = lookup(manifest_of(repo, f"{OS}/stable"), b"/usr/lib/libbig.so")
    assert isinstance(lib, Inode) and lib.digest is not None
    good = deploy(repo, f"{OS}/stable", path)
    # What deploy writes for a sealed commit: the image's deployment, by digest.
    (path / "cfsdeploy/by-digest").mkdir()
    (path / "cfsdeploy/by-digest" / good.digest).symlink_to(f"..{good.path.removeprefix('/cfsdeploy')}")
    return Sysroot(path, tree, good, deploy(repo, f"{OS}/bare", path), lib.digest.hex())


@dataclass(frozen=True)
class Mount:
    root: str  # the path inside its filesystem that is mounted
    target: str
    options: str  # per-mount
    fstype: str
    source: str
    super_options: str


@dataclass
class Boot:
    status: int
    output: str
    pid: int
    phys: str
    new: str

    def path(self, inside: str) -> Path:
        """A path as the booted namespace sees it."""
        return Path(f"/proc/{self.pid}/root{inside}")

    def mounts(self) -> dict[str, Mount]:
        """The namespace's mounts by target (the topmost where they stack)."""
        found = {}
        with open(f"/proc/{self.pid}/mountinfo") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                _, _, _, root, target, options, *_ = fields.split()
                fstype, source, super_options = rest.split()
                target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), target)
                found[target] = Mount(root, target, options, fstype, source, super_options)
        return found

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", *argv], capture_output=True, text=True)


def cmdline(dep: Deployment | None = None, *, verity: str | None = "off", **override: str) -> str:
    """A kernel command line naming dep; override replaces or (with "") drops arguments."""
    args = {"root": "/dev/vda2", "ro": None, "quiet": None}
    if dep is not None:
        args |= {"cfsdeploy": dep.path, "cfsdeploy.digest": dep.digest}
    if verity is not None:
        args["cfsdeploy.verity"] = verity
    for key, value in override.items():
        key = key.replace("_", ".")
        if value == "":
            args.pop(key, None)
        else:
            args[key] = value
    return " ".join(k if v is None else f"{k}={v}" for k, v in args.items()) + "\n"


@contextlib.contextmanager
def boot(sysroot: Sysroot, tmp_path: Path, line: str, *, same_root: bool = True, breakage: str = ":",
         shell: str = "sh", tools: Path | None = None) -> Iterator[Boot]:
    """Run the script in a fresh mount namespace and hold it there for the test."""
    phys = tmp_path / "physroot"
    new = phys if same_root else tmp_path / "newroot"
    phys.mkdir()
    new.mkdir(exist_ok=True)
    (tmp_path / "cmdline").write_text(line)
    out = tmp_path / "out"
    env = dict(os.environ, PHYS=str(phys), NEW=str(new), SYSROOT=str(sysroot.path), BREAK=breakage,
               SCRIPT=str(SCRIPT), OUT=str(out), SHELL_CMD=shell, TOOLS=f"{tools}:" if tools else "",
               CFSDEPLOY_CMDLINE=str(tmp_path / "cmdline"))
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", HOLDER],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout is not None
        status = proc.stdout.readline()
        if not status:
            raise AssertionError(f"the namespace did not come up: {proc.communicate()[1]}")
        yield Boot(int(status), out.read_text(), proc.pid, str(phys), str(new))
    finally:
        proc.communicate(timeout=30)


@pytest.fixture
def booted(sysroot: Sysroot, tmp_path: Path) -> Iterator[Boot]:
    with boot(sysroot, tmp_path, cmdline(sysroot.good)) as b:
        assert b.status == 0, b.output
        yield b


def failed(b: Boot, message: str) -> None:
    """b failed saying message, and left the physical root where it was, alone.
    (Mounts elsewhere may come from the host: the namespace starts as its copy.)"""
    assert b.status == 1
    assert message in b.output
    assert "the root filesystem was NOT prepared" in b.output
    mounts = b.mounts()
    assert mounts[b.phys].fstype == "tmpfs" and mounts[b.phys].source == "physroot"
    assert [m.target for m in mounts.values() if m.target.startswith(b.phys + "/")] == []
    assert [m.target for m in mounts.values() if m.target.startswith("/run/cfsdeploy")] == []
    assert b.new == b.phys or b.new not in mounts


def loops_backed_by(name: str) -> list[str]:
    """The loop devices whose backing file's name is name."""
    found = []
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(FileNotFoundError):
            if Path(f.read_text().rstrip("\n").removesuffix(" (deleted)")).name == name:
                found.append(f.parent.parent.name)
    return found


# --- a good boot ------------------------------------------------------------


def test_root_holds_the_committed_tree(booted: Boot, sysroot: Sysroot) -> None:
    diffs = compare_trees(sysroot.tree, booted.path(booted.new))
    assert [d for d in diffs if not re.match(r"/(etc|var|sysroot)[/:]", d)] == []


def test_root_is_a_read_only_overlay_of_the_image_over_the_objects(booted: Boot, sysroot: Sysroot) -> None:
    root = booted.mounts()[booted.new]
    assert root.fstype == "overlay"
    assert root.options.split(",")[0] == "ro"
    opts = root.super_options.split(",")
    assert f"lowerdir=/run/cfsdeploy/image::{booted.phys}/cfsdeploy/repo/objects" in opts
    assert {"metacopy=on", "redirect_dir=on"} <= set(opts)
    assert not any(o.startswith("verity=") for o in opts)


def test_image_is_mounted_through_a_read_only_loop_device(booted: Boot, sysroot: Sysroot) -> None:
    (loop,) = loops_backed_by(sysroot.good.digest[2:])
    assert Path(f"/sys/block/{loop}/ro").read_text() == "1\n"
    assert Path(f"/sys/block/{loop}/loop/autoclear").read_text() == "1\n"


def test_usr_is_read_only(booted: Boot) -> None:
    with pytest.raises(OSError) as e:
        booted.path(f"{booted.new}/usr/new-file").write_bytes(b"x")
    assert e.value.errno == errno.EROFS


def test_etc_is_the_deployments_own_and_writable(booted: Boot, sysroot: Sysroot) -> None:
    etc = booted.mounts()[f"{booted.new}/etc"]
    assert etc.root == f"{sysroot.good.path}/etc" and etc.options.startswith("rw")
    assert compare_trees(sysroot.tree / "etc", booted.path(f"{booted.new}/etc")) == []
    booted.path(f"{booted.new}/etc/motd").write_bytes(b"hello\n")
    kept = booted.path(f"{booted.new}/sysroot{sysroot.good.path}/etc/motd")
    assert kept.read_bytes() == b"hello\n"


def test_var_is_the_oss_own_and_writable(booted: Boot) -> None:
    var = booted.mounts()[f"{booted.new}/var"]
    assert var.root == f"/cfsdeploy/deploy/{OS}/var" and var.options.startswith("rw")
    assert booted.path(f"{booted.new}/var/lib/state").read_bytes() == b"kept across deployments\n"
    booted.path(f"{booted.new}/var/log").mkdir()
    assert booted.path(f"{booted.new}/sysroot/cfsdeploy/deploy/{OS}/var/log").is_dir()


def test_sysroot_is_the_physical_root_made_writable(booted: Boot) -> None:
    sysroot = booted.mounts()[f"{booted.new}/sysroot"]
    assert (sysroot.fstype, sysroot.source, sysroot.root) == ("tmpfs", "physroot", "/")
    assert sysroot.options.startswith("rw") and sysroot.super_options.startswith("rw")
    assert booted.path(f"{booted.new}/sysroot/cfsdeploy/repo/config.toml").is_file()


def test_nothing_else_is_left_mounted(booted: Boot) -> None:
    new = booted.new
    under = sorted(t for t in booted.mounts() if t == new or t.startswith((new + "/", "/run/cfsdeploy")))
    assert under == [new, f"{new}/etc", f"{new}/sysroot", f"{new}/var"]


def test_says_how_long_it_took_on_one_line(booted: Boot, sysroot: Sysroot) -> None:
    (line,) = booted.output.splitlines()
    assert re.fullmatch(rf"cfsdeploy: root prepared in \d+\.\d\d s: {sysroot.good.path}, "
                        rf"image {sysroot.good.digest} \(computed\), verity=off", line)


def test_physical_root_can_be_unmounted_and_its_filesystem_made_read_only(booted: Boot) -> None:
    # What shutdown does: unmount /sysroot (nothing may keep it busy), then remount
    # the filesystem read-only through the mounts left on it.
    done = booted.run("umount", f"{booted.new}/sysroot")
    assert done.returncode == 0, done.stderr
    done = booted.run("mount", "-o", "remount,ro", f"{booted.new}/etc")
    assert done.returncode == 0, done.stderr
    assert booted.mounts()[f"{booted.new}/var"].super_options.startswith("ro")
    assert booted.path(f"{booted.new}/usr/bin/tool").read_bytes().startswith(b"#!/bin/sh")


def test_new_root_may_be_another_directory(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, cmdline(sysroot.good), same_root=False) as b:
        assert b.status == 0, b.output
        mounts = b.mounts()
        assert mounts[b.new].fstype == "overlay"
        assert b.phys not in mounts
        assert mounts[f"{b.new}/sysroot"].source == "physroot"


def test_verity_try_without_fs_verity_checks_the_computed_digest(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, cmdline(sysroot.good, verity="try")) as b:
        assert b.status == 0, b.output
        assert "(computed: no fs-verity here), verity=try" in b.output
        assert "verity=" not in b.mounts()[b.new].super_options


def test_boot_records_what_it_checked_for_status(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, cmdline(sysroot.good, verity="try")) as b:
        assert b.status == 0, b.output
        assert b.path("/run/cfsdeploy-booted").read_text() == (
            f"deployment={sysroot.good.path} digest={sysroot.good.digest} verity=try fs-verity=no sealed=no\n")


def test_a_boot_that_failed_records_nothing(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, cmdline(sysroot.good, verity="require")) as b:
        failed(b, "cfsdeploy.verity=require but")
        assert not b.path("/run/cfsdeploy-booted").exists()


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
def test_works_with_busybox_sh_and_mount(sysroot: Sysroot, tmp_path: Path) -> None:
    tools = tmp_path / "busybox"
    tools.mkdir()
    for name in ("mount", "umount", "mkdir", "rmdir", "cat"):
        (tools / name).symlink_to(shutil.which("busybox"))
    with boot(sysroot, tmp_path, cmdline(sysroot.good), shell="busybox sh", tools=tools) as b:
        assert b.status == 0, b.output
        assert b.mounts()[b.new].fstype == "overlay"
        assert compare_trees(sysroot.tree / "usr", b.path(f"{b.new}/usr")) == []


def test_the_namespace_leaves_no_loop_device_behind(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, cmdline(sysroot.good)):
        assert loops_backed_by(sysroot.good.digest[2:])
    deadline = time.monotonic() + 10
    while loops_backed_by(sysroot.good.digest[2:]) and time.monotonic() < deadline:
        time.sleep(0.05)  # the kernel frees the mounts, then the loop device, after the exit
    assert loops_backed_by(sysroot.good.digest[2:]) == []


# --- failures: each stops with a message and leaves the physical root alone --


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"cfsdeploy": "/cfsdeploy/deploy/"}, "expected /cfsdeploy/deploy/<os>/<deployment>"),
        ({"cfsdeploy_digest": ""}, "no cfsdeploy.digest= on the kernel command line"),
        ({"cfsdeploy_digest": "AB" * 32}, "not 64 lowercase hex digits"),
        ({"cfsdeploy_digest": "ab" * 31}, "not 64 lowercase hex digits"),
        ({"cfsdeploy_digest": "ag" * 32}, "not 64 lowercase hex digits"),
        ({"cfsdeploy": "/ostree/deploy/x/y"}, "expected /cfsdeploy/deploy/<os>/<deployment>"),
        ({"cfsdeploy": f"/cfsdeploy/deploy/{OS}/../../repo"}, "expected /cfsdeploy/deploy/<os>/<deployment>"),
        ({"cfsdeploy": f"/cfsdeploy/deploy/{OS}/var"}, "expected /cfsdeploy/deploy/<os>/<deployment>"),
        ({"cfsdeploy_verity": "maybe"}, "cfsdeploy.verity=maybe: expected require, try or off"),
    ],
    ids=["empty-deployment", "no-digest", "uppercase-digest", "short-digest", "non-hex-digest",
         "deployment-elsewhere", "deployment-climbing", "deployment-var", "unknown-verity"],
)
def test_missing_or_malformed_argument_stops(sysroot: Sysroot, tmp_path: Path, override: dict[str, str],
                                             message: str) -> None:
    with boot(sysroot, tmp_path, cmdline(sysroot.good, **override)) as b:
        failed(b, message)


def test_missing_deployment_stops(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, cmdline(sysroot.good), breakage=f"rm -r .{sysroot.good.path}") as b:
        failed(b, f"deployment {sysroot.good.path} not found on the physical root")


def test_missing_image_stops(sysroot: Sysroot, tmp_path: Path) -> None:
    digest = sysroot.good.digest
    with boot(sysroot, tmp_path, cmdline(sysroot.good),
              breakage=f"rm cfsdeploy/repo/objects/{digest[:2]}/{digest[2:]}") as b:
        failed(b, f"image {digest} not found")


def test_image_not_matching_its_digest_stops(sysroot: Sysroot, tmp_path: Path) -> None:
    digest = sysroot.good.digest
    with boot(sysroot, tmp_path, cmdline(sysroot.good),
              breakage=f"echo tampered >> cfsdeploy/repo/objects/{digest[:2]}/{digest[2:]}") as b:
        failed(b, f"image digest mismatch: cfsdeploy.digest={digest} but")


def test_verity_require_without_fs_verity_stops(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, cmdline(sysroot.good, verity="require")) as b:
        failed(b, "cfsdeploy.verity=require but the image has no fs-verity digest the kernel can measure")
        assert "cfsdeploy.verity=try or off" in b.output


def test_verity_defaults_to_require(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, cmdline(sysroot.good, verity=None)) as b:
        failed(b, "cfsdeploy.verity=require but")


def test_digest_of_an_object_that_is_no_image_stops_after_undoing_its_mounts(
        sysroot: Sysroot, tmp_path: Path) -> None:
    not_an_image = Deployment(sysroot.good.path, sysroot.object_digest)
    with boot(sysroot, tmp_path, cmdline(not_an_image)) as b:
        failed(b, f"cannot mount image {b.phys}/cfsdeploy/repo/objects/{not_an_image.digest[:2]}/")


def test_image_without_sysroot_directory_stops_after_undoing_its_mounts(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, cmdline(sysroot.no_sysroot), same_root=False) as b:
        failed(b, "the image has no /sysroot directory")


# --- sealed boots: no cfsdeploy=, the deployment from cfsdeploy/by-digest/ ----

# This kernel has no fs-verity: an fsverity command that answers `measure` as a
# kernel would for a file whose fs-verity digest it holds, by computing it.  The
# overlay's verity=require still mounts here; only reading a file would fail.
# The VM test boots a sealed release with the real thing.
SEALED_FSVERITY = """#!/bin/sh
[ "$1" = measure ] && shift && set -- digest "$@"
{enable}exec {real} "$@"
"""
# With it, `fsverity enable` succeeds and does nothing: how the verity-pending pass
# goes on once every object has fs-verity, as far as this kernel lets it be seen.
ENABLE_AS_NOTHING = '[ "$1" = enable ] && echo "$@" >>"$0.enabled" && exit 0\n'


def sealed(dep: Deployment, extra: str = "", **override: str) -> str:
    """A sealed command line (the UKI's) for dep's image, with extra words appended."""
    return cmdline(dep, verity="require", cfsdeploy="", **override).rstrip("\n") + extra + "\n"


def sealed_tools(tmp_path: Path, *, enable: str = "") -> Path:
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "fsverity").write_text(SEALED_FSVERITY.format(real=shutil.which("fsverity"), enable=enable))
    (tools / "fsverity").chmod(0o755)
    return tools


def test_sealed_boot_composes_the_deployment_its_image_links_to(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, sealed(sysroot.good), tools=sealed_tools(tmp_path)) as b:
        assert b.status == 0, b.output
        mounts = b.mounts()
        assert "verity=require" in mounts[b.new].super_options.split(",")
        assert mounts[f"{b.new}/etc"].root == f"{sysroot.good.path}/etc"
        assert f": {sysroot.good.path}, image {sysroot.good.digest} (measured by the kernel), verity=require" \
            in b.output


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
def test_sealed_boot_works_with_busybox(sysroot: Sysroot, tmp_path: Path) -> None:
    tools = sealed_tools(tmp_path)
    for name in ("mount", "umount", "mkdir", "rmdir", "cat", "readlink"):
        (tools / name).symlink_to(shutil.which("busybox"))
    with boot(sysroot, tmp_path, sealed(sysroot.good), shell="busybox sh", tools=tools) as b:
        assert b.status == 0, b.output
        assert b.mounts()[f"{b.new}/etc"].root == f"{sysroot.good.path}/etc"


def test_sealed_boot_is_recorded_as_sealed(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, sealed(sysroot.good), tools=sealed_tools(tmp_path)) as b:
        assert b.status == 0, b.output
        assert b.path("/run/cfsdeploy-booted").read_text() == (
            f"deployment={sysroot.good.path} digest={sysroot.good.digest} verity=require fs-verity=yes sealed=yes\n")


def test_sealed_boot_without_a_link_for_its_image_stops(sysroot: Sysroot, tmp_path: Path) -> None:
    d = sysroot.good.digest
    with boot(sysroot, tmp_path, sealed(sysroot.good), breakage=f"rm cfsdeploy/by-digest/{d}") as b:
        failed(b, f"sealed boot: no deployment of image {d} ({b.phys}/cfsdeploy/by-digest/{d} is missing")


def test_sealed_boot_whose_link_is_no_symlink_stops(sysroot: Sysroot, tmp_path: Path) -> None:
    d = sysroot.good.digest
    with boot(sysroot, tmp_path, sealed(sysroot.good),
              breakage=f"rm cfsdeploy/by-digest/{d} && mkdir -p cfsdeploy/by-digest/{d}/etc") as b:
        failed(b, "is missing or not a symlink")


def test_sealed_boot_whose_link_leads_out_of_the_deployments_stops(sysroot: Sysroot, tmp_path: Path) -> None:
    d = sysroot.good.digest
    with boot(sysroot, tmp_path, sealed(sysroot.good), breakage=f"ln -sfn ../../etc cfsdeploy/by-digest/{d}") as b:
        failed(b, f"cfsdeploy/by-digest/{d} -> ../../etc: expected ../deploy/<os>/<deployment>")


@pytest.mark.parametrize("target", [f"../deploy/{OS}/..", f"../deploy/{OS}/var", f"../deploy/{OS}/x/../..",
                                    "../deploy/../deploy", f"../deploy/{OS}/a:b", f"/cfsdeploy/deploy/{OS}/x"],
                         ids=["dotdot", "var", "deeper", "os-dotdot", "colon", "absolute"])
def test_sealed_boot_whose_link_names_no_plain_deployment_stops(sysroot: Sysroot, tmp_path: Path,
                                                               target: str) -> None:
    d = sysroot.good.digest
    with boot(sysroot, tmp_path, sealed(sysroot.good), breakage=f"ln -sfn '{target}' cfsdeploy/by-digest/{d}") as b:
        failed(b, f"-> {target}: expected ../deploy/<os>/<deployment>")


@pytest.mark.parametrize("verity", ["try", "off"])
def test_sealed_boot_with_verity_other_than_require_stops(sysroot: Sysroot, tmp_path: Path, verity: str) -> None:
    with boot(sysroot, tmp_path, sealed(sysroot.good, cfsdeploy_verity=verity)) as b:
        failed(b, f"cfsdeploy.verity={verity} in a sealed boot (no cfsdeploy=): only require is sealed")


def test_sealed_boot_without_fs_verity_stops_with_no_advice_to_lower_verity(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, sealed(sysroot.good)) as b:
        failed(b, "cfsdeploy.verity=require but the image has no fs-verity digest the kernel can measure")
        assert "A sealed release boots only a measured image." in b.output
        assert "try or off" not in b.output


def test_sealed_boot_without_a_digest_stops(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, sealed(sysroot.good, cfsdeploy_digest="")) as b:
        failed(b, "no cfsdeploy.digest= on the kernel command line")


@pytest.mark.parametrize("key", ["cfsdeploy.digest", "cfsdeploy.verity"])
def test_sealed_argument_given_again_stops_even_with_the_same_value(sysroot: Sysroot, tmp_path: Path,
                                                                    key: str) -> None:
    again = {"cfsdeploy.digest": sysroot.good.digest, "cfsdeploy.verity": "require"}[key]
    with boot(sysroot, tmp_path, sealed(sysroot.good, f" console=ttyS0 {key}={again}")) as b:
        failed(b, f"{key}= given twice on the kernel command line")


def test_deployment_given_again_stops(sysroot: Sysroot, tmp_path: Path) -> None:
    line = cmdline(sysroot.good).rstrip("\n") + f" cfsdeploy={sysroot.no_sysroot.path}\n"
    with boot(sysroot, tmp_path, line) as b:
        failed(b, "cfsdeploy= given twice on the kernel command line")


def test_deployment_added_to_a_sealed_command_line_stops(sysroot: Sysroot, tmp_path: Path) -> None:
    # Not an unsealed boot of whatever it names: the sealed line's mode must hold.
    with boot(sysroot, tmp_path, sealed(sysroot.good, f" cfsdeploy={sysroot.good.path} cfsdeploy.verity=off")) as b:
        failed(b, "cfsdeploy.verity= given twice on the kernel command line")


def test_quoted_argument_stops(sysroot: Sysroot, tmp_path: Path) -> None:
    # The kernel reads "cfsdeploy.verity=off" as cfsdeploy.verity: it is no other word.
    with boot(sysroot, tmp_path, sealed(sysroot.good, ' "cfsdeploy.verity=off"')) as b:
        failed(b, "cfsdeploy's arguments are never quoted")


# --- a first boot of objects without fs-verity (SYSROOT/cfsdeploy/verity-pending) --
# Only the refusal can be seen here (no fs-verity in this kernel): the VM test
# shows the objects enabled, the marker gone and the boot measured.

PENDING = "cfsdeploy/verity-pending"


def objects_in(sysroot: Sysroot) -> int:
    return sum(1 for f in (sysroot.path / "cfsdeploy/repo/objects").glob("??/*") if f.is_file())


def test_pending_verity_is_enabled_on_every_object_and_stops_where_it_cannot_be(
        sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, sealed(sysroot.good), breakage=f"touch {PENDING}") as b:
        failed(b, f"cannot enable fs-verity on an object (ERROR: FS_IOC_ENABLE_VERITY failed on '{b.phys}/")
        assert f"{b.phys}/{PENDING} stays: the next boot tries again" in b.output
        assert f"cfsdeploy: enabling fs-verity on {objects_in(sysroot)} objects (first boot)" in b.output
        assert b.path(f"{b.phys}/{PENDING}").exists()


def test_pending_verity_once_enabled_on_every_object_is_dropped_and_the_boot_goes_on(
        sysroot: Sysroot, tmp_path: Path) -> None:
    tools = sealed_tools(tmp_path, enable=ENABLE_AS_NOTHING)
    with boot(sysroot, tmp_path, sealed(sysroot.good), breakage=f"touch {PENDING}", tools=tools) as b:
        assert b.status == 0, b.output
        assert not b.path(f"{b.new}/sysroot/{PENDING}").exists()
        total = objects_in(sysroot)
        assert b.output.splitlines()[:2] == [
            f"cfsdeploy: enabling fs-verity on {total} objects (first boot); this may take minutes",
            f"cfsdeploy: fs-verity enabled on all {total} objects"]
        enabled = (tools / "fsverity.enabled").read_text().splitlines()
        objects = f"{b.phys}/cfsdeploy/repo/objects/"
        assert len(enabled) == total
        assert all(e.startswith(f"enable --hash-alg=sha256 --block-size=4096 {objects}") for e in enabled)


def test_pending_verity_is_left_alone_without_require(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, cmdline(sysroot.good, verity="try"), breakage=f"touch {PENDING}") as b:
        assert b.status == 0, b.output
        assert "enabling" not in b.output
        assert b.path(f"{b.new}/sysroot/{PENDING}").exists()


def test_without_the_marker_require_enables_nothing(sysroot: Sysroot, tmp_path: Path) -> None:
    with boot(sysroot, tmp_path, cmdline(sysroot.good, verity="require")) as b:
        failed(b, "cfsdeploy.verity=require but the image has no fs-verity digest")
        assert "enabling" not in b.output


HOOKS = SCRIPT.parent
POSIX_SCRIPTS = [SCRIPT, HOOKS / "initramfs-tools/hooks/cfsdeploy",
                 HOOKS / "initramfs-tools/scripts/local-bottom/cfsdeploy",
                 HOOKS / "dracut/90cfsdeploy/cfsdeploy-pre-pivot.sh"]


@pytest.mark.parametrize("script", POSIX_SCRIPTS, ids=lambda p: str(p.relative_to(HOOKS)))
def test_boot_scripts_are_posix_sh(script: Path) -> None:
    assert os.access(script, os.X_OK)
    done = subprocess.run(["sh", "-n", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if shutil.which("checkbashisms") is None:
        pytest.skip("checkbashisms (devscripts) not installed; only sh -n checked")
    done = subprocess.run(["checkbashisms", "--posix", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", [*POSIX_SCRIPTS, HOOKS / "dracut/90cfsdeploy/module-setup.sh"],
                         ids=lambda p: str(p.relative_to(HOOKS)))
def test_boot_scripts_pass_shellcheck(script: Path) -> None:
    dialect = "bash" if script.name == "module-setup.sh" else "sh"
    done = subprocess.run(["shellcheck", "-s", dialect, script], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
