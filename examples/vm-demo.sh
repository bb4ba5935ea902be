#!/usr/bin/env bash
# cfsdeploy in a real machine: build a Debian 13 root filesystem (cached in
# /var/tmp/cfsdeploy-vm), commit it with cfsdeploy's initramfs hooks, deploy it onto
# a GPT disk (ESP with systemd-boot, ext4 root with fs-verity) and boot it in QEMU
# with no network.  A unit inside reports what it sees: / an overlay of the
# deployment's erofs image over the repository's objects, /etc and /var writable,
# /usr not, `cfsdeploy status`, failed units.  Where this cfsdeploy has
# `verity enable`, the guest enables fs-verity, one object is then corrupted on the
# disk, and a second boot must require fs-verity and refuse that object.
# Needs root.  Usage: bash examples/vm-demo.sh [WORKDIR]   (takes a few minutes)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/.ci/setup"
cd "$here"
exec .venv/bin/python -m tests.vm demo "$@"
