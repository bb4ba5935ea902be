#!/usr/bin/env bash
# The main job on a built-in example: make a small root filesystem tree, store its
# files by fs-verity digest, build the composefs image, mount it with the real
# kernel (erofs + overlayfs) and check every file against the source.
# Needs root for the mount.  Usage: bash examples/demo.sh [WORKDIR]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/.ci/setup"
cfs="$here/.venv/bin/cfsdeploy"

work="${1:-$(mktemp -d /tmp/cfsdeploy-demo.XXXXXX)}"
tree="$work/tree" objects="$work/objects" image="$work/image.cfs" mnt="$work/mnt"
rm -rf "$tree" "$objects" "$mnt"
mkdir -p "$tree"/{etc,usr/bin,usr/lib,var/log} "$mnt"
echo "demo" > "$tree/etc/hostname"
printf 'NAME="cfsdeploy demo"\n' > "$tree/usr/lib/os-release"
ln -s ../usr/lib/os-release "$tree/etc/os-release"
head -c 200000 /dev/urandom > "$tree/usr/bin/tool"
chmod 4755 "$tree/usr/bin/tool"
ln "$tree/usr/bin/tool" "$tree/usr/bin/tool-hardlink"
setfattr -n user.comment -v "kept in the image" "$tree/etc/hostname"
mkfifo "$tree/var/log/fifo"

echo "== building $image from $tree (objects in $objects)"
"$cfs" image build "$tree" "$image" --digest-store "$objects" --print-digest
echo "== manifest (composefs dumpfile) of the image"
"$cfs" image dump "$image" | head -n 20
echo "== mounting on $mnt"
"$cfs" image mount "$image" "$mnt" --basedir "$objects"
trap 'umount "$mnt" 2>/dev/null || true' EXIT
# Every path's metadata, then every regular file's bytes.
# (Directory sizes are filesystem-specific and left out.)
meta() { (cd "$1" && { find . -type d -printf '%p %y %m %U %G %n %T@\n';
                       find . ! -type d -printf '%p %y %m %U %G %n %T@ %l %s\n'; } | sort); }
diff <(meta "$tree") <(meta "$mnt")
diff -r --no-dereference --exclude=fifo "$tree" "$mnt"
echo "== mounted tree matches the source: metadata and content"
ls -l "$mnt/usr/bin"
getfattr -n user.comment "$mnt/etc/hostname"
