"""The repository: objects plus manifests in git commits, signed, with history.

    REPO/git/        bare git repository (commits whose tree is manifest.dump)
    REPO/objects/    the composefs object store
    REPO/tmp/, cache/, verified/, lock

repository (commit, refs, tags, prune), dumbhttp (the index a static HTTP server
needs, kept current by every ref change), signing (gpg), checkout, treediff, fsck.
Imports composefs and util."""
