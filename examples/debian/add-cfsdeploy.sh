#!/usr/bin/env bash
# add-cfsdeploy.sh TREE DEB: make a Debian root filesystem (bootstrap.sh's) an OS
# tree cfsdeploy can commit and boot.  Needs root.
#   - cfsdeploy's package (DEB, built by packaging/build-deb.sh) installed with apt,
#     which rebuilds the initramfs with cfsdeploy's hook in it;
#   - /etc/fstab mounting the ESP on /boot, by the partition name `cfsdeploy install
#     to-disk` gives it (/ itself is the read-only image: no line for it);
#   - an empty /etc/machine-id, so each machine makes its own at its first boot;
#   - /sysroot, where the machine's real root filesystem is mounted;
#   - no apt lists, caches or logs: not part of an image.
set -euo pipefail
[ $# = 2 ] || { echo "usage: $0 TREE DEB" >&2; exit 2; }
tree=$(cd "$1" && pwd)
deb=$2
name=$(basename "$deb")

mounted=()
cleanup() {
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}"; done
    rm -f "$tree/tmp/$name"
}
trap cleanup EXIT
mount -t proc proc "$tree/proc" && mounted+=("$tree/proc")
mount -t sysfs sysfs "$tree/sys" && mounted+=("$tree/sys")
mount --bind /dev "$tree/dev" && mounted+=("$tree/dev")
cp "$deb" "$tree/tmp/$name"
DEBIAN_FRONTEND=noninteractive chroot "$tree" apt-get install -y -q --no-install-recommends "/tmp/$name"

printf 'PARTLABEL=esp /boot vfat umask=0077 0 0\n' >"$tree/etc/fstab"
rm -f "$tree/etc/machine-id"
: >"$tree/etc/machine-id"
chmod 444 "$tree/etc/machine-id"
mkdir -p "$tree/sysroot"
rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/*.bin "$tree"/var/cache/apt/archives/*.deb \
    "$tree"/var/log/apt "$tree"/var/log/dpkg.log "$tree"/var/log/alternatives.log "$tree"/var/log/bootstrap.log
