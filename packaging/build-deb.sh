#!/usr/bin/env bash
# build-deb.sh OUTDIR: build cfsdeploy_<version>_all.deb from this checkout into OUTDIR.
# Installs the build dependencies first (apt, as root or through sudo).  The build
# runs in a scratch copy of the sources, so the checkout stays as it was.
set -euo pipefail
[ $# = 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
src=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)

# Debian's own Python and tools, never a python3 that a pyenv or virtualenv puts first.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
# What packaging/debian/control's Build-Depends names, and dpkg-buildpackage's own.
build_deps=(debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools dpkg-dev)
missing=()
for p in "${build_deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# What the package is built from; nothing of a developer's .venv or build/ leaks in.
mkdir "$scratch/cfsdeploy"
cp -r "$src/deploy" "$src/hooks" "$src/pyproject.toml" "$src/README.md" "$scratch/cfsdeploy/"
cp -r "$src/packaging/debian" "$scratch/cfsdeploy/debian"
find "$scratch/cfsdeploy" -name __pycache__ -prune -exec rm -rf {} +
(cd "$scratch/cfsdeploy" && dpkg-buildpackage -b -us -uc) >"$scratch/build.log" 2>&1 || {
    tail -n 40 "$scratch/build.log" >&2
    echo "build-deb.sh: dpkg-buildpackage failed (log above)" >&2
    exit 1
}
# -b writes the .deb, .buildinfo and .changes beside the source directory.
cp "$scratch"/cfsdeploy_*_all.deb "$out/"
ls "$out"/cfsdeploy_*_all.deb
