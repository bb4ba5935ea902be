#!/bin/sh
# dracut pre-pivot hook, sourced by dracut: compose the deployment named by
# cfsdeploy= (or, in a sealed boot, by cfsdeploy.digest=) on $NEWROOT, where the
# physical root is mounted.  Without either on the command line this is not a
# cfsdeploy boot.

# shellcheck source=/dev/null
command -v getarg >/dev/null || . /lib/dracut-lib.sh

if getarg cfsdeploy= >/dev/null || getarg cfsdeploy.digest= >/dev/null; then
    # die shows the message on the console, then halts (or gives a shell with rd.shell).
    /usr/lib/cfsdeploy/cfsdeploy-prepare-root "$NEWROOT" "$NEWROOT" ||
        die "cfsdeploy: this deployment cannot boot (see the messages above)"
fi
