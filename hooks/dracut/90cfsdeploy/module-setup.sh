#!/bin/bash
# dracut module: cfsdeploy-prepare-root as a pre-pivot hook, which runs once the
# physical root is mounted on $NEWROOT (/sysroot), with or without systemd in
# the initramfs.  Install as /usr/lib/dracut/modules.d/90cfsdeploy/ (see ../../README.md).

check() {
    require_binaries fsverity mount umount /usr/lib/cfsdeploy/cfsdeploy-prepare-root || return 1
    # only when asked for: add_dracutmodules+=" cfsdeploy "
    return 255
}

depends() {
    return 0
}

installkernel() {
    # crc32c_generic first where it exists: erofs's libcrc32c needs a crc32c.
    hostonly='' instmods crc32c_generic loop erofs overlay
}

install() {
    inst_multiple fsverity mount umount mkdir rmdir readlink rm sync
    inst_script /usr/lib/cfsdeploy/cfsdeploy-prepare-root
    # shellcheck disable=SC2154 # dracut sets moddir
    inst_hook pre-pivot 50 "$moddir/cfsdeploy-pre-pivot.sh"
}
