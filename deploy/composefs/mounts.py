"""Mounting images with the real kernel: loop devices, EROFS, and composefs
(an overlayfs whose metadata layer is an EROFS image and whose data-only layer
is a directory of content-addressed objects).

mount(2), umount2(2) and the loop ioctls are called directly, so no mount(8) or
losetup(8) is needed and failures keep their errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..util.errors import CommandError, MountError
from ..util.run import run
from .erofs import COMPOSEFS_FLAGS_HAS_ACL, COMPOSEFS_HEADER, COMPOSEFS_MAGIC

StrPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]

MS_RDONLY = 1
MNT_DETACH = 2

# <linux/loop.h>
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_SET_BLOCK_SIZE = 0x4C09
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit,
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags, lo_file_name,
# lo_crypt_name, lo_encrypt_key[32], lo_init[2]
LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
# struct loop_config: fd, block_size, info, __reserved[8]
LOOP_CONFIG = struct.Struct(f"=II{LOOP_INFO64.size}s64x")
assert LOOP_INFO64.size == 232 and LOOP_CONFIG.size == 304

# Another process may grab the free device between GET_FREE and CONFIGURE.
_LOOP_ATTEMPTS = 32

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def _errname(err: int | None) -> str:
    if err is None:  # an OSError raised without an errno
        return "unknown error"
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def _show(path: StrPath) -> str:
    return os.fsdecode(os.fspath(path))


@dataclass(slots=True)
class LoopDevice:
    """An attached loop device and our open handle on it.

    The device is configured with AUTOCLEAR: the kernel detaches it at the last
    close.  While we hold the handle, it stays; mount it, then close() and the
    mount becomes the last holder, so unmounting frees the device.  Closing
    without having mounted it detaches it at once.
    """

    path: str
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _loop_info(backing: bytes, flags: int, offset: int, size_limit: int) -> bytes:
    return LOOP_INFO64.pack(0, 0, 0, offset, size_limit, 0, 0, 0, flags, backing[: LO_NAME_SIZE - 1], b"", b"", 0, 0)


def _configure_legacy(dev_fd: int, file_fd: int, info: bytes, block_size: int) -> None:
    """LOOP_SET_FD + LOOP_SET_STATUS64 for kernels before 5.8 (no LOOP_CONFIGURE).

    Read-only follows from file_fd's open mode; the flag itself is not settable here.
    """
    fcntl.ioctl(dev_fd, LOOP_SET_FD, file_fd)
    try:
        fcntl.ioctl(dev_fd, LOOP_SET_STATUS64, info)
        fcntl.ioctl(dev_fd, LOOP_SET_BLOCK_SIZE, block_size)
    except OSError:
        fcntl.ioctl(dev_fd, LOOP_CLR_FD)
        raise


def attach_loop(path: StrPath, *, read_only: bool = True, block_size: int = 4096, offset: int = 0,
                size_limit: int = 0) -> LoopDevice:
    """Attach path to a free loop device (AUTOCLEAR; see LoopDevice) and return it:
    size_limit bytes of it (0: to its end) from offset, e.g. a partition of a disk image."""
    backing = os.fsencode(os.path.abspath(os.fspath(path)))
    flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if read_only else 0)
    info = _loop_info(backing, flags, offset, size_limit)
    try:
        file_fd = os.open(backing, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open {_show(backing)}: {_errname(e.errno)}") from None
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        os.close(file_fd)
        raise MountError(f"cannot open /dev/loop-control: {_errname(e.errno)}: modprobe loop?") from None
    try:
        last = 0
        for attempt in range(_LOOP_ATTEMPTS):
            try:
                dev = f"/dev/loop{fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)}"
            except OSError as e:
                raise MountError(f"no free loop device for {_show(backing)}: {_errname(e.errno)}") from None
            try:
                dev_fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                # devtmpfs may not have created the node of a just-added device yet
                last = errno.ENOENT
                time.sleep(0.01 * (attempt + 1))
                continue
            try:
                try:
                    fcntl.ioctl(dev_fd, LOOP_CONFIGURE, LOOP_CONFIG.pack(file_fd, block_size, info))
                except OSError as e:
                    if e.errno not in (errno.ENOTTY, errno.EINVAL):
                        raise
                    _configure_legacy(dev_fd, file_fd, info, block_size)
            except OSError as e:
                os.close(dev_fd)
                if e.errno != errno.EBUSY:
                    raise MountError(f"cannot set up {dev} for {_show(backing)}: {_errname(e.errno)}") from None
                last = e.errno
                continue
            return LoopDevice(dev, dev_fd)
        raise MountError(f"no free loop device for {_show(backing)}: {_errname(last)}")
    finally:
        os.close(ctl)
        # the loop device holds its own reference to the file
        os.close(file_fd)


def detach_loop(dev: StrPath) -> None:
    """Detach a loop device now, or, if it is in use (mounted), once it is released."""
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open {_show(dev)}: {_errname(e.errno)}") from None
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as e:
        raise MountError(f"cannot detach {_show(dev)}: {_errname(e.errno)}") from None
    finally:
        os.close(fd)


def _mount(source: StrPath, target: StrPath, fstype: str, flags: int, data: bytes) -> int:
    """mount(2); returns 0 or the errno."""
    ok = _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags, data or None)
    return 0 if ok == 0 else ctypes.get_errno()


def _needs_noacl(image: StrPath) -> bool:
    """Whether to mount with noacl: composefs images say in their header whether
    they hold ACLs; other EROFS images are mounted as their xattrs say."""
    try:
        with open(image, "rb") as f:
            header = f.read(COMPOSEFS_HEADER.size)
    except OSError as e:
        raise MountError(f"cannot read {_show(image)}: {_errname(e.errno)}") from None
    if len(header) < COMPOSEFS_HEADER.size:
        return False
    magic, _version, flags, _ = COMPOSEFS_HEADER.unpack(header)
    return magic == COMPOSEFS_MAGIC and not flags & COMPOSEFS_FLAGS_HAS_ACL


def _hint(err: int, fstype: str) -> str:
    if err == errno.ENODEV:
        return "erofs/overlay not available: modprobe erofs overlay"
    if err == errno.EPERM:
        return "mounting needs root (CAP_SYS_ADMIN)"
    if err == errno.ENOENT:
        return "a path does not exist"
    if err == errno.EINVAL and fstype == "erofs":
        return "not an EROFS image, or one using features this kernel lacks (see dmesg)"
    if err == errno.EUCLEAN:  # the kernel's EFSCORRUPTED
        return "the image is corrupt"
    return "see dmesg"


def _overlay_hint(err: int, verity: bool) -> str:
    if err == errno.EINVAL:
        release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
        if release < (6, 5):
            return "kernel too old for data-only lower layers (needs Linux 6.5+)"
        if verity and release < (6, 6):
            return "kernel too old for verity=require (needs Linux 6.6+)"
        return "overlayfs rejected the options (see dmesg)"
    return _hint(err, "overlay")


def mount_erofs(image: StrPath, target: StrPath) -> None:
    """Mount an EROFS image file read-only on target through a loop device.

    The loop device is freed automatically when the mount goes, or at once if
    mounting fails.
    """
    data = b"noacl" if _needs_noacl(image) else b""
    with attach_loop(image) as loop:
        err = _mount(loop.path, target, "erofs", MS_RDONLY, data)
    if err:
        raise MountError(f"cannot mount {_show(image)} on {_show(target)}: {_errname(err)}: {_hint(err, 'erofs')}")


def _escape(path: StrPath) -> bytes:
    """Escape a path for an overlayfs lowerdir option (',' and ':' separate)."""
    raw = os.fsencode(os.path.abspath(os.fspath(path)))
    return raw.replace(b"\\", b"\\\\").replace(b",", b"\\,").replace(b":", b"\\:")


def mount_composefs(image: StrPath, mountpoint: StrPath, basedir: StrPath, *, verity: bool = False) -> None:
    """Mount a composefs image read-only on mountpoint, with file content from basedir.

    The EROFS image goes on a private temporary directory that overlayfs uses as
    its lower layer (basedir being a data-only layer); overlayfs keeps its own
    reference, so the EROFS mount is then detached and the directory removed.
    With verity, overlayfs refuses files whose fs-verity digest is missing or wrong.
    """
    lower = tempfile.mkdtemp(prefix="cfsdeploy-lower-")
    try:
        mount_erofs(image, lower)
        try:
            data = b"lowerdir=%s::%s,metacopy=on,redirect_dir=on" % (_escape(lower), _escape(basedir))
            if verity:
                data += b",verity=require"
            err = _mount("composefs", mountpoint, "overlay", MS_RDONLY, data)
        finally:
            unmount(lower, lazy=True)
        if err:
            raise MountError(
                f"cannot mount composefs {_show(image)} on {_show(mountpoint)}: "
                f"{_errname(err)}: {_overlay_hint(err, verity)}"
            )
    finally:
        os.rmdir(lower)


def unmount(path: StrPath, *, lazy: bool = False) -> None:
    """Unmount path; lazy detaches it now and lets it go once no longer busy."""
    if _libc.umount2(os.fsencode(path), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise MountError(f"cannot unmount {_show(path)}: {_errname(err)}")


@contextlib.contextmanager
def mounted_composefs(image: StrPath, basedir: StrPath, *, verity: bool = False) -> Iterator[Path]:
    """Mount a composefs image on a fresh temporary directory for the duration."""
    mnt = tempfile.mkdtemp(prefix="cfsdeploy-mnt-")
    try:
        mount_composefs(image, mnt, basedir, verity=verity)
        try:
            yield Path(mnt)
        finally:
            try:
                unmount(mnt)
            except MountError:
                # still busy (an open file, a cwd inside): let it go when released
                unmount(mnt, lazy=True)
    finally:
        os.rmdir(mnt)


def _has_filesystem(fstype: str) -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == fstype for line in f if line.strip())


def _load_module(name: str) -> str | None:
    """modprobe name; returns why it failed, or None."""
    try:
        run(["modprobe", name], capture=True)
    except CommandError as e:
        return str(e)
    return None


def can_mount() -> tuple[bool, str]:
    """Whether this process can mount composefs images here, and why not if not."""
    if os.geteuid() != 0:
        return False, "not running as root"
    with open("/proc/self/status") as f:
        caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    if not caps & (1 << 21):  # CAP_SYS_ADMIN
        return False, "root without CAP_SYS_ADMIN (unprivileged container?)"
    if not os.path.exists("/dev/loop-control") and (why := _load_module("loop")):
        return False, f"no /dev/loop-control and {why}"
    for fstype in ("erofs", "overlay"):
        if not _has_filesystem(fstype):
            if why := _load_module(fstype):
                return False, f"{fstype} not in /proc/filesystems and {why}"
            if not _has_filesystem(fstype):
                return False, f"{fstype} not in /proc/filesystems even after modprobe"
    return True, "root with loop devices, erofs and overlayfs"
