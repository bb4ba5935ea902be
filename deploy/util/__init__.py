"""The foundation every layer stands on: typed errors (errors), every subprocess
(run), crash-safe writes and tree removal that never follows a symlink (fsutil),
locks (lockfile), TOML written for people (tomlfile), progress lines (progress).
Imports nothing of cfsdeploy."""
