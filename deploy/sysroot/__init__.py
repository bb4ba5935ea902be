"""Machines: a sysroot's deployments and the operations on them.

    SYSROOT/cfsdeploy/{config.toml,lock,staged.json,boot-switch.json,aside/}
    SYSROOT/cfsdeploy/repo/                      the machine's repository
    SYSROOT/cfsdeploy/deploy/<os>/var/           the os's /var
    SYSROOT/cfsdeploy/deploy/<os>/<commit12>.<serial>/{deployment.json,etc/}

layout (the Sysroot, its settings and state), deployment (the record), etcmerge
(/etc 3-way merge), staged (deployments finalized at shutdown), booted (what the boot
hook checked), status (what `status` shows, and its JSON); one module per
operation: deploy, upgrade (and switch), rollback (and undeploy, pin), cmdline
(kargs), cleanup, finalize (the staged deployment), verity (enable), over what they
share: commit (reading one for deploying), entries (writing, switching, settling and
recovering the boot entries, retention), locking (the sysroot lock each operation
takes, LockPolicy).  Imports boot, remote, repo, composefs, util."""
