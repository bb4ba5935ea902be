#!/usr/bin/env bash
# build.sh OUTDIR: the Debian 13 OS tree of mkosi.conf, with cfsdeploy installed, at
# OUTDIR/tree (OUTDIR also gets the package, mkosi's package cache and its scratch
# space).  Needs root, mkosi 14 (Debian 12: apt install mkosi), debootstrap and
# systemd-nspawn.  The mirror: $MIRROR, else the one apt uses on this host.
set -euo pipefail
[ $# = 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" = 0 ] || { echo "build.sh: mkosi 14 builds as root" >&2; exit 1; }
for tool in mkosi:mkosi debootstrap:debootstrap systemd-nspawn:systemd-container; do
    command -v "${tool%%:*}" >/dev/null || {
        echo "build.sh: ${tool%%:*} not found (Debian package ${tool#*:})" >&2; exit 1; }
done
# mkosi.conf is written for 14: later versions changed its sections and keys.
version=$(mkosi --version | awk '{print $2}')
[ "$version" = 14 ] || { echo "build.sh: mkosi $version found; this configuration is for mkosi 14" >&2; exit 1; }

mirror=${MIRROR:-}
if [ -z "$mirror" ]; then
    # As tests/vm.py's mirror(): the first deb822 source of apt whose URI ends in /debian.
    mirror=$(sed -n 's|^URIs:[[:space:]]*\([^[:space:]]*/debian\)/\?[[:space:]]*$|\1|p' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
    mirror=${mirror:-http://deb.debian.org/debian}
fi

mkdir -p "$1"
out=$(cd "$1" && pwd)
[ ! -e "$out/tree" ] || { echo "build.sh: $out/tree exists; remove it first" >&2; exit 1; }

# The package goes in as a second extra tree, at /cfsdeploy-debs/ (mkosi.postinst
# installs it and removes the directory); naming one on the command line makes
# mkosi 14 skip its mkosi.extra/, so both are named.
rm -rf "$out/extra"
mkdir -p "$out/extra/cfsdeploy-debs" "$out/cache"
bash "$here/../../packaging/build-deb.sh" "$out/extra/cfsdeploy-debs" >/dev/null

mkosi_argv=(mkosi -C "$here" --mirror "$mirror" --output "$out/tree" --cache "$out/cache"
            --extra-tree "$here/mkosi.extra" --extra-tree "$out/extra" build)
if [ "$(stat -f -c %T /run)" = tmpfs ]; then
    exec "${mkosi_argv[@]}"
fi
# systemd-nspawn refuses to clean up below a /run that is no tmpfs (a container's):
# give it one, in a mount namespace of its own.
mkdir -p /run/systemd/nspawn
exec unshare --mount --propagation private sh -c \
    'mount -t tmpfs -o mode=0755 tmpfs /run/systemd/nspawn && exec "$@"' sh "${mkosi_argv[@]}"
