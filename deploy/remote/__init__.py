"""Remotes: where a repository gets commits from, and how a repository is served.

remotes (REPO/config.toml [remote.NAME] and REPO/remotes/NAME/trusted.gpg), pull
(signature, branch binding, every object checked before it enters), gitfetch and
transport (git's dumb HTTP protocol over HTTP(S) and file://), keyring.  (The
git/info/refs index a static server needs is the repository's: repo/dumbhttp.)  Imports repo, composefs, util."""
