#!/usr/bin/env bash
# The Debian example, end to end, and a machine's life after it, in QEMU with OVMF
# and systemd-boot, no network.  The vendor, as README.md here tells it:
#   bootstrap.sh (debootstrap, cached in /var/tmp/cfsdeploy-vm), cfsdeploy's Debian
#   package built and installed with apt (add-cfsdeploy.sh), `cfsdeploy commit
#   --lint` signed; the new machine's disk made with `cfsdeploy install to-disk`
#   (ESP with systemd-boot, ext4 root with fs-verity).  Then, boot by boot, a unit
#   inside reports what it sees and runs what the machine's operator would:
#   1  / is the deployment's erofs image over the objects (every new deployment is
#      on trial, 2 tries, and blessed once a boot completes); `cfsdeploy verity
#      enable`; a local edit in /etc
#   2  verity=require; an object corrupted on the disk reads as EIO; release 2 is
#      offered on a second disk (a file:// remote): `cfsdeploy upgrade && reboot`
#   3  release 2, the /etc edit kept, blessed: `cfsdeploy rollback && reboot`
#   4  release 1; release 3 (never completes a boot) offered:
#      `cfsdeploy upgrade --stage && reboot`
#   5-6  release 3 on trial, its tries counted down by systemd-boot
#   7  the loader falls back to release 1 by itself; `cfsdeploy status` says why
# Needs root.  Usage: bash examples/debian/run.sh [WORKDIR]
# Takes about 15 minutes under software emulation (plus 2 for the first debootstrap).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
bash "$here/.ci/setup"
cd "$here"
exec .venv/bin/python -m tests.vm demo "$@"
