"""The Debian package: packaging/debian, built once by packaging/build-deb.sh.

What the .deb holds and where, what it depends on, how it asks for a new
initramfs, and that the command runs from its files with Debian's own Python
and the Debian packages it depends on (.ci/setup installs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "packaging" / "build-deb.sh"
DEBIAN_PYTHON = "/usr/bin/python3"
DIST = "usr/lib/python3/dist-packages"

# Installed path -> the file of this repository it must be, byte for byte.
BOOT_FILES = {
    "usr/lib/cfsdeploy/cfsdeploy-prepare-root": "hooks/cfsdeploy-prepare-root",
    "usr/share/initramfs-tools/hooks/cfsdeploy": "hooks/initramfs-tools/hooks/cfsdeploy",
    "usr/share/initramfs-tools/scripts/local-bottom/cfsdeploy":
        "hooks/initramfs-tools/scripts/local-bottom/cfsdeploy",
    "usr/lib/dracut/modules.d/90cfsdeploy/module-setup.sh": "hooks/dracut/90cfsdeploy/module-setup.sh",
    "usr/lib/dracut/modules.d/90cfsdeploy/cfsdeploy-pre-pivot.sh":
        "hooks/dracut/90cfsdeploy/cfsdeploy-pre-pivot.sh",
    "usr/lib/dracut/dracut.conf.d/cfsdeploy.conf": "hooks/dracut/cfsdeploy.conf",
    "usr/lib/systemd/system/cfsdeploy-finalize-staged.service":
        "hooks/systemd/cfsdeploy-finalize-staged.service",
}


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("dpkg-buildpackage") is None or (os.geteuid() != 0 and shutil.which("dh") is None):
        pytest.skip("dpkg-buildpackage/debhelper not installed (.ci/setup installs them)")
    out = tmp_path_factory.mktemp("deb")
    p = subprocess.run(["bash", str(BUILD), str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    [package] = out.glob("cfsdeploy_*_all.deb")
    return package


@pytest.fixture(scope="module")
def listing(deb: Path) -> dict[str, str]:
    """Path (without the leading ./) -> mode string, as `dpkg-deb -c` lists them."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    entries = {}
    for line in out.splitlines():
        mode, _owner, _size, _date, _time, name = line.split(maxsplit=5)
        entries[name.split(" -> ")[0].removeprefix("./").rstrip("/")] = mode
    return entries


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def control_file(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-I", str(deb), name], capture_output=True, text=True,
                          check=True).stdout


def test_the_command_is_usr_bin_cfsdeploy(listing: dict[str, str]) -> None:
    assert listing["usr/bin/cfsdeploy"] == "-rwxr-xr-x"


def test_every_module_of_deploy_is_in_the_package(listing: dict[str, str]) -> None:
    source = ROOT / "deploy"
    expected = {f"{DIST}/cfsdeploy/{p.relative_to(source)}" for p in source.rglob("*.py")
                if "__pycache__" not in p.parts}
    packaged = {name for name in listing if name.startswith(f"{DIST}/cfsdeploy/") and name.endswith(".py")}
    assert packaged == expected


@pytest.mark.parametrize("installed", sorted(BOOT_FILES))
def test_boot_file_is_where_its_consumer_looks(listing: dict[str, str], unpacked: Path, installed: str) -> None:
    source = ROOT / BOOT_FILES[installed]
    assert (unpacked / installed).read_bytes() == source.read_bytes()
    executable = os.access(source, os.X_OK)
    assert listing[installed] == ("-rwxr-xr-x" if executable else "-rw-r--r--")


def test_depends_names_what_cfsdeploy_and_its_hooks_run(deb: Path) -> None:
    groups = {frozenset(alt.split()[0] for alt in group.split("|"))
              for group in field(deb, "Depends").split(",")}
    for needed in ({"python3-pygit2"}, {"python3-gnupg"}, {"python3-click"}, {"gpgv"}, {"fsverity"},
                   {"initramfs-tools", "dracut"}):
        assert frozenset(needed) in groups


def test_package_is_architecture_all_at_the_version_of_pyproject(deb: Path) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert (field(deb, "Architecture"), field(deb, "Version")) == ("all", version)


def test_installing_or_removing_it_triggers_an_initramfs_rebuild(deb: Path) -> None:
    # initramfs-tools and Debian's dracut are both interested in this trigger.
    lines = [line for line in control_file(deb, "triggers").splitlines() if not line.startswith("#")]
    assert lines == ["activate-noawait update-initramfs"]


def test_no_maintainer_script_starts_or_stops_the_finalize_unit(deb: Path) -> None:
    # Stopping it finalizes a staged deployment: only staging and shutdown may.
    for script in ("preinst", "postinst", "prerm", "postrm"):
        p = subprocess.run(["dpkg-deb", "-I", str(deb), script], capture_output=True, text=True)
        assert "cfsdeploy-finalize-staged" not in p.stdout


def test_package_imports_with_debian_python_from_its_files(unpacked: Path, tmp_path: Path) -> None:
    p = subprocess.run([DEBIAN_PYTHON, "-s", "-c", "import cfsdeploy.cli; print(cfsdeploy.cli.__file__)"],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(unpacked / DIST)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(unpacked / DIST / "cfsdeploy" / "cli.py")


def test_command_runs_on_debian_python(unpacked: Path) -> None:
    assert (unpacked / "usr/bin/cfsdeploy").read_text().splitlines()[0] == f"#!{DEBIAN_PYTHON}"


def test_command_prints_its_help_from_the_unpacked_package(unpacked: Path, tmp_path: Path) -> None:
    p = subprocess.run([str(unpacked / "usr/bin/cfsdeploy"), "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(unpacked / DIST)})
    assert p.returncode == 0, p.stderr
    assert "upgrade" in p.stdout and "finalize-staged" in p.stdout


def test_package_is_lintian_clean(deb: Path, tmp_path: Path) -> None:
    # Pedantic and experimental tags too; what is left is overridden, with the
    # reason, in packaging/debian/cfsdeploy.lintian-overrides.  Info tags are
    # checked in the output: `--fail-on info` also fails on the tag lintian's own
    # screen masks (dist-info metadata outside /usr/share/doc).
    if shutil.which("lintian", path="/usr/bin") is None:
        pytest.skip("lintian not installed (.ci/setup installs it)")
    p = subprocess.run(["/usr/bin/lintian", "--info", "--display-info", "--display-experimental", "--pedantic",
                        "--fail-on", "error,warning,pedantic,experimental", str(deb)],
                       capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin:/usr/sbin"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert [line for line in p.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:", "X:")] == []
