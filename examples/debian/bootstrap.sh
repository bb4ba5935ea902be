#!/usr/bin/env bash
# bootstrap.sh TREE [MIRROR]: a Debian 13 (trixie) root filesystem with what a
# cfsdeploy machine needs, made with debootstrap (about 2 minutes).  Needs root.
# MIRROR defaults to $MIRROR, else deb.debian.org.
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then echo "usage: $0 TREE [MIRROR]" >&2; exit 2; fi
tree=$1
mirror=${2:-${MIRROR:-http://deb.debian.org/debian}}
packages=(
    # the kernel, and systemd as init
    linux-image-amd64 systemd systemd-sysv udev kmod util-linux mount e2fsprogs
    # systemd-boot: systemd-bless-boot, which marks a boot good once
    # boot-complete.target is reached (boot counting); systemd-boot-efi: the loader
    systemd-boot systemd-boot-efi dosfstools
    # what cfsdeploy's package depends on, named here because debootstrap resolves
    # no virtual packages (python3-cffi-backend provides what python3-pygit2 needs)
    initramfs-tools zstd fsverity gpgv gnupg
    python3 python3-pygit2 python3-cffi-backend python3-gnupg python3-click
)
IFS=,
debootstrap --variant=minbase --include="${packages[*]}" trixie "$tree" "$mirror"
