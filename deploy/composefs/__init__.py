"""composefs: trees, their manifests and images, and the object store.

    tree        the tree model (Inode), one validation for every entry
    dumpfile    manifests: composefs-dump(5) text <-> trees
    erofs       the EROFS on-disk format; imagewriter, imagereader: trees <-> images,
                byte-identical to mkcomposefs
    fsverity    fs-verity digests, computed and enabled
    objects     OBJDIR/XX/YYYY... files named by their fs-verity digest (the basedir)
    scan, tarscan, digestcache   directories and tar archives -> trees and objects
    mounts      an image mounted with erofs + overlayfs

Imports only cfsdeploy.util."""
