"""The boot directory: Boot Loader Specification entries, kernels, kernel command lines.

    BOOT/loader/entries/cfsdeploy-<os>-<n>[+<left>[-<done>]].conf
    BOOT/cfsdeploy/<os>/<kver>-<12 hex>/{vmlinuz,initramfs.img,complete}

bootloader (entries, kernels, the crash-ordered switch and its repair), kargs (the
kernel's own reading of command lines), uki (Unified Kernel Images: built, signed,
read back).  Imports only util."""
