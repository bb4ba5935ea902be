"""The command line: parse, call the library, print.  Errors become one line and an exit code."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import click

from . import __version__
from .boot.bootloader import Kind
from .composefs import dumpfile, fsverity, imagewriter
from .util.errors import CfsError, HostError, IntegrityError, NotFoundError

if TYPE_CHECKING:
    from .boot.bootloader import Repair
    from .composefs.scan import ScanStats
    from .remote.pull import PullProgress
    from .repo.fsck import Problem
    from .repo.repository import CommitInfo, Repository, Sealed, SignatureInfo
    from .sysroot.booted import BootVerity
    from .sysroot.deploy import DeployResult
    from .sysroot.deployment import Origin
    from .sysroot.etcmerge import Conflict, MergeReport
    from .sysroot.install import Source
    from .sysroot.layout import DeploymentStatus, StagedStatus, Sysroot
    from .sysroot.lint import Finding
    from .sysroot.locking import LockPolicy
    from .util.progress import Progress


def one_line(text: str) -> str:
    """A hostile name's newline or escape sequence shown escaped: one line stays one."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(message: str, code: int = 1, hint: str | None = None) -> NoReturn:
    """One line on stderr, "cfsdeploy: MESSAGE (HINT)", and exit with code."""
    if hint:
        message = f"{message} ({hint})"
    click.echo(f"cfsdeploy: {one_line(message)}", err=True)
    sys.exit(code)


# The group (README, "Exit codes") of an OSError the library let through.
_ERRNO_CODES = {
    errno.ENOENT: NotFoundError.exit_code, errno.ENOTDIR: NotFoundError.exit_code,
    **dict.fromkeys((errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                     errno.ENOSYS, errno.EOPNOTSUPP, errno.ENODEV), HostError.exit_code),
}


class Command(click.Command):
    """Text (names, messages, URLs, kernel arguments) must be UTF-8: it goes into
    refs, commits and files that say so.  Paths (click.Path) may be any bytes."""

    def invoke(self, ctx: click.Context) -> Any:
        for p in self.params:
            value = ctx.params.get(p.name or "")
            if isinstance(p.type, click.types.StringParamType) and any(
                    isinstance(v, str) and not _is_utf8(v) for v in (value if isinstance(value, tuple) else [value])):
                raise click.BadParameter("not UTF-8", ctx=ctx, param=p)
        return super().invoke(ctx)


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        return False


class Group(click.Group):
    """Turns library errors into a one-line message and a non-zero exit."""

    command_class = Command
    group_class = type  # subgroups are Groups too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A group without a command is a usage error of one line, not the help text.
        kwargs.setdefault("no_args_is_help", False)
        super().__init__(*args, **kwargs)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        """Usage errors too are one line, "cfsdeploy: WHAT (see `COMMAND --help`)",
        not click's usage text over several."""
        # Paths may be any bytes: printed as they are on stdout (as ls does), escaped on stderr.
        for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(errors=errors)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            fail(f"{e.format_message()} (see `{e.ctx.command_path if e.ctx else 'cfsdeploy'} --help`)",
                 e.exit_code)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except (click.Abort, EOFError):
            fail("aborted")
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CfsError as e:
            fail(str(e), e.exit_code, e.hint)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            fail(f"{e.strerror or e}{where}", _ERRNO_CODES.get(e.errno or 0, 1))
        except KeyboardInterrupt:
            fail("interrupted", 130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cfsdeploy")
def main() -> None:
    """Versioned, verified root-filesystem deployments on composefs."""


# --- fs-verity -------------------------------------------------------------------


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def digest(files: tuple[str, ...]) -> None:
    """Print the fs-verity digest of FILES, as `fsverity digest` does."""
    for name in files:
        click.echo(f"{fsverity.format_digest(fsverity.digest_file(name))} {name}")


# --- images ------------------------------------------------------------------------


@main.group()
def image() -> None:
    """Build, read, measure and mount composefs images."""


@image.command("build")
@click.argument("args", nargs=-1, required=True, metavar="[DIR] IMAGE", type=click.Path())
@click.option("--from-file", "from_file", metavar="DUMP|-", type=click.Path(),
              help="Build from a composefs dumpfile instead of a directory.")
@click.option("--digest-store", metavar="OBJDIR", type=click.Path(),
              help="Copy files over 64 bytes into OBJDIR, named by digest.")
@click.option("--min-version", type=click.IntRange(0, imagewriter.FORMAT_VERSION_MAX), default=0,
              show_default=True, help="Lowest image format version to write.")
@click.option("--max-version", type=click.IntRange(0, imagewriter.FORMAT_VERSION_MAX),
              default=imagewriter.FORMAT_VERSION_MAX, show_default=True,
              help="Highest format version to use if the tree needs it.")
@click.option("--lenient", is_flag=True, help="Parse the dumpfile in lenient mode.")
@click.option("--print-digest", is_flag=True, help="Print the image's fs-verity digest.")
def image_build(args: tuple[str, ...], from_file: str | None, digest_store: str | None,
                min_version: int, max_version: int, lenient: bool, print_digest: bool) -> None:
    """Write the composefs EROFS image of a directory or a dumpfile to IMAGE."""
    from .composefs import imagefile

    if from_file is not None:
        if len(args) != 1:
            raise click.UsageError("with --from-file give only IMAGE")
        if digest_store:
            raise click.UsageError("--digest-store goes with a directory, not --from-file")
        data = sys.stdin.buffer.read() if from_file == "-" else open(from_file, "rb").read()
        built = imagefile.from_dumpfile(data, args[0], strict=not lenient, min_version=min_version,
                                        max_version=max_version)
    else:
        if len(args) != 2:
            raise click.UsageError("give DIR IMAGE, or --from-file DUMP IMAGE")
        built = imagefile.from_directory(args[0], args[1], digest_store=digest_store or None,
                                         min_version=min_version, max_version=max_version)
    if print_digest:
        click.echo(built.digest.hex())


@image.command("dump")
@click.argument("image_path", metavar="IMAGE", type=click.Path(dir_okay=False))
def image_dump(image_path: str) -> None:
    """Print the dumpfile (manifest) of a composefs image."""
    from .composefs import imagereader

    img = imagereader.read_image_file(image_path)
    out = sys.stdout.buffer
    dumpfile.dump(img.root, out)
    out.flush()


@image.command("digest")
@click.argument("image_path", metavar="IMAGE", type=click.Path(dir_okay=False))
def image_digest(image_path: str) -> None:
    """Print the fs-verity digest of IMAGE (what cfsdeploy.digest= names)."""
    click.echo(fsverity.digest_file(image_path).hex())


@image.command("mount")
@click.argument("image_path", metavar="IMAGE", type=click.Path(dir_okay=False, exists=True))
@click.argument("mountpoint", type=click.Path(file_okay=False, exists=True))
@click.option("--basedir", required=True, type=click.Path(file_okay=False, exists=True),
              help="The object directory the image's files redirect into.")
@click.option("--verity", is_flag=True, help="Mount with verity=require.")
def image_mount(image_path: str, mountpoint: str, basedir: str, verity: bool) -> None:
    """Mount IMAGE read-only on MOUNTPOINT (erofs + overlayfs)."""
    from .composefs import mounts

    mounts.mount_composefs(image_path, mountpoint, basedir, verity=verity)


# --- repository -----------------------------------------------------------------------

repo_option = click.option("--repo", "repo_path", required=True, metavar="PATH", type=click.Path(),
                           envvar="CFSDEPLOY_REPO", help="The repository (or $CFSDEPLOY_REPO).")


@main.command()
@repo_option
def init(repo_path: str) -> None:
    """Create a repository at PATH (refuses to clobber an existing one)."""
    from .repo.repository import Repository

    Repository.init(repo_path)
    click.echo(f"initialized repository {os.path.abspath(repo_path)}")


@main.command()
@repo_option
@click.option("--tree", required=True, metavar="DIR|tar:FILE", type=click.Path(),
              help="The root filesystem: a directory, or tar:FILE for an archive (streamed).")
@click.option("--branch", "-b", required=True, help="Branch to move, e.g. debian/13/x86_64/stable.")
@click.option("--subject", "-m", required=True, help="One-line subject of the commit.")
@click.option("--body", help="Longer description.")
@click.option("--version", "os_version", help="Human version of this OS build (Cfsdeploy-Version).")
@click.option("--bind", multiple=True, metavar="BRANCH",
              help="Also bind the commit to BRANCH, for pulls of it (repeatable; BRANCH is bound anyway).")
@click.option("--parent", metavar="REV", help="Parent commit (default: the branch head).")
@click.option("--orphan", is_flag=True, help="Start a history with no parent.")
@click.option("--sign-key", metavar="KEYID", help="Sign the commit with this OpenPGP key.")
@click.option("--gpg-homedir", metavar="DIR", type=click.Path(), help="The gpg home directory holding the key.")
@click.option("--wait-lock", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="How long to wait for another writer.")
@click.option("--threads", type=click.IntRange(1, 256), metavar="N",
              help="Files read at once, by as many processes (default: one per CPU).")
@click.option("--lint", "lint_first", is_flag=True,
              help="Lint the tree first (`cfsdeploy lint`) and commit only if it has no errors.")
@click.option("--seal", is_flag=True,
              help="Seal it: a signed UKI naming its image, and a signed systemd-boot (docs/architecture.md).")
@click.option("--secureboot-key", metavar="KEY", type=click.Path(),
              help="The Secure Boot signing key (PEM), with --seal.")
@click.option("--secureboot-cert", metavar="CERT", type=click.Path(),
              help="The Secure Boot certificate (PEM), with --seal.")
@click.option("--seal-karg", "seal_kargs", multiple=True, metavar="ARG",
              help="Add a kernel argument to the sealed command line (repeatable; root= replaces the default).")
@click.option("--kver", metavar="KVER", help="Seal the tree's kernel KVER (default: its newest), with --seal.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def commit(repo_path: str, tree: str, branch: str, subject: str, body: str | None,
           os_version: str | None, bind: tuple[str, ...], parent: str | None, orphan: bool, sign_key: str | None,
           gpg_homedir: str | None, wait_lock: float, threads: int | None, lint_first: bool, seal: bool,
           secureboot_key: str | None, secureboot_cert: str | None, seal_kargs: tuple[str, ...],
           kver: str | None, as_json: bool) -> None:
    """Commit a root filesystem tree to a branch; print the commit id."""
    if parent and orphan:
        raise click.UsageError("--parent and --orphan exclude each other")
    if seal and not (secureboot_key and secureboot_cert):
        raise click.UsageError("--seal needs --secureboot-key and --secureboot-cert")
    if not seal and (secureboot_key or secureboot_cert or seal_kargs or kver):
        raise click.UsageError("--secureboot-key, --secureboot-cert, --seal-karg and --kver go with --seal")
    if lint_first:
        from .sysroot.lint import has_errors, lint_dir

        if tree.startswith("tar:"):
            raise click.UsageError("--lint needs a directory tree, not tar:FILE")
        findings = lint_dir(tree)
        for f in findings:
            click.echo(_lint_line(f), err=True)
        if has_errors(findings):
            click.echo("cfsdeploy: the tree has lint errors: not committed", err=True)
            sys.exit(1)
    repo = _open_repo(repo_path)
    sealer = None
    if seal:
        from .sysroot.seal import make_sealer

        assert secureboot_key and secureboot_cert
        sealer = make_sealer(repo, secureboot_key, secureboot_cert, kargs=seal_kargs, kver=kver)
    from .util.progress import Progress, human_bytes

    bar = Progress("commit")

    def show(st: ScanStats) -> None:
        bar.update(f"{st.entries} entries, {st.files} files, {human_bytes(st.file_bytes)}, "
                   f"{st.objects_written} new objects")

    result = repo.commit(tree, branch, subject, body=body, version=os_version, bind=bind, parent=parent,
                         orphan=orphan, sign_key=sign_key, gpg_homedir=gpg_homedir, threads=threads,
                         warn=lambda m: click.echo(m, err=True), progress=show, lock_wait=wait_lock,
                         on_lock_wait=_say_waiting, sealer=sealer)
    st = result.stats
    bar.done(f"{st.entries} entries, {human_bytes(st.file_bytes)}, {st.objects_written} new objects")
    if as_json:
        _print_json({"commit": result.commit, "branch": result.branch, "image_digest": result.image_digest.hex(),
                     "sealed": result.sealed.to_json() if result.sealed else None})
        return
    if result.sealed:  # stdout stays the commit id alone, for scripts
        click.echo(f"sealed: {_sealed_text(result.sealed)}", err=True)
    click.echo(result.commit)


_LINT_TEXT = {
    "no_sysroot": "no /sysroot directory: the boot hook mounts the physical root there",
    "no_kernel": "no kernel with an initramfs (searched {searched})",
    "invalid_kernel_version": "kernel version {kver!r} is no plain version (letters, digits and ._+~-)",
    "several_kernels": "several kernels ({kvers}): {chosen} boots unless --kver names another",
    "kernel_without_initramfs": "kernel {kver} has no initramfs in its layout: it is never booted",
    "initramfs_unreadable": "the initramfs of kernel {kver} cannot be read: {reason}",
    "initramfs_no_hook": "the initramfs of kernel {kver} lacks the cfsdeploy hook (hooks/README.md)",
    "initramfs_no_module": "the initramfs of kernel {kver} lacks the {module} module, and the kernel has it "
                           "not built in",
    "no_cli": "no cfsdeploy command (searched {searched}): the machine cannot upgrade itself",
    "no_gpgv": "no gpgv (searched {searched}): the machine cannot verify signed pulls",
    "fstab_root_rw": "line {line} mounts / read-write, but / is a read-only image",
    "fstab_no_esp": "no entry mounts the boot directory ({searched}): upgrades cannot write boot entries",
    "machine_id": "not empty: every machine deployed would share this id",
    "var_content": "{entries} {entries_noun} the first deploy copies into /var once: no upgrade updates "
                   "them, and tmpfiles.d does not make them",
    "symlink_escapes": "symlink to {target} climbs above the tree's root",
}


def _lint_line(f: Finding) -> str:
    facts = {k: ", ".join(v) if isinstance(v, list) else v for k, v in f.facts.items()}
    if "entries" in facts:
        facts["entries_noun"] = "entry" if facts["entries"] == 1 else "entries"
    return one_line(f"{f.severity.value}: " + (f"{f.path}: " if f.path else "")
                    + _LINT_TEXT[f.rule.value].format(**facts))


@main.command("lint")
@click.argument("target", metavar="TREE|REV")
@click.option("--repo", "repo_path", metavar="PATH", type=click.Path(),
              help="Lint commit REV of this repository (without: TREE, a directory).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def lint_cmd(target: str, repo_path: str | None, as_json: bool) -> None:
    """What stops a tree or a commit from deploying or booting; exit 1 on errors."""
    from .sysroot.lint import has_errors, lint_commit, lint_dir

    findings = lint_commit(_open_repo(repo_path), target) if repo_path else lint_dir(target)
    if as_json:
        _print_json({"findings": [f.to_json() for f in findings]})
    else:
        for f in findings:
            click.echo(_lint_line(f))
    if has_errors(findings):
        sys.exit(1)


def _open_repo(path: str) -> Repository:
    from .repo.repository import Repository

    return Repository(path)


# The version of the JSON the repository commands print (docs/json.md).
JSON_SCHEMA = 1


def _print_json(fields: dict[str, object]) -> None:
    click.echo(json.dumps({"schema": JSON_SCHEMA, **fields}, indent=2))


def _print_commit(info: CommitInfo, *, full: bool) -> None:
    when = datetime.fromtimestamp(info.time, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    click.echo(f"commit {info.id}")
    click.echo(f"Date:    {when}")
    if full:
        click.echo(f"Author:  {info.author}")
    if info.version:
        click.echo(f"Version: {info.version}")
    if full and info.branches:
        click.echo(f"Branch:  {', '.join(info.branches)}")
    if info.image_digest:
        click.echo(f"Image:   {info.image_digest.hex()} (format {info.image_format})")
    if info.sealed:
        click.echo(f"Sealed:  {_sealed_text(info.sealed)}")
    if info.signature:
        click.echo(f"Signed:  {_signature_line(info.signature)}")
    click.echo(f"\n    {info.subject}")
    if full and info.body:
        click.echo("")
        for line in info.body.splitlines():
            click.echo(f"    {line}")
    click.echo("")


def _sealed_text(sealed: Sealed) -> str:
    return f"UKI {sealed.uki.hex()} loader {sealed.loader.hex()}"


def _signature_line(sig: SignatureInfo) -> str:
    key = f" (key {sig.fingerprint or sig.key_id})" if sig.key_id else ""
    if sig.verified:
        return f"good signature from {sig.signer or sig.key_id}{key}"
    if sig.verified is False:
        return f"NOT VERIFIED: {sig.problem}{key}"
    return f"key {sig.fingerprint or sig.key_id} (not verified)" if sig.key_id else str(sig.problem)


@main.command()
@repo_option
@click.argument("rev", required=False, default="HEAD")
@click.option("-n", "--max-count", type=int, help="Show at most this many commits.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--gpg-homedir", metavar="DIR", type=click.Path(),
              help="Check signatures against the keys in this gpg home directory.")
def log(repo_path: str, rev: str, max_count: int | None, as_json: bool,
        gpg_homedir: str | None) -> None:
    """Show the history of REV (a branch, tag or commit), newest first, with who
    signed each signed commit."""
    from .repo.repository import history

    commits = history(_open_repo(repo_path), rev, max_count, gpg_homedir=gpg_homedir)
    if as_json:
        _print_json({"commits": [c.to_json() for c in commits]})
        return
    for info in commits:
        _print_commit(info, full=False)


@main.command()
@repo_option
@click.argument("rev")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def show(repo_path: str, rev: str, as_json: bool) -> None:
    """Show one commit: id, author, version, image digest, message."""
    from .repo.repository import commit_info

    info = commit_info(_open_repo(repo_path).resolve(rev))
    if as_json:
        _print_json(info.to_json())
    else:
        _print_commit(info, full=True)


@main.command()
@repo_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def refs(repo_path: str, as_json: bool) -> None:
    """List branches, tags and remote branches with their commits."""
    from .repo.repository import list_refs

    found = list_refs(_open_repo(repo_path))
    if as_json:
        _print_json({"refs": [{"ref": name, "commit": target} for name, target in found]})
        return
    for name, target in found:
        click.echo(f"{target} {name}")


@main.command()
@repo_option
@click.argument("name")
@click.argument("rev")
@click.option("--force", is_flag=True, help="Move an existing tag.")
def tag(repo_path: str, name: str, rev: str, force: bool) -> None:
    """Tag the commit REV as NAME."""
    from .repo.repository import create_tag

    click.echo(create_tag(_open_repo(repo_path), name, rev, force=force, on_lock_wait=_say_waiting))


@main.command("ls")
@repo_option
@click.argument("rev")
@click.argument("path", required=False, default="/", type=click.Path())
@click.option("-R", "--recursive", is_flag=True, help="List subdirectories too.")
def ls_cmd(repo_path: str, rev: str, path: str, recursive: bool) -> None:
    """List the files of a commit under PATH, with mode, owner and size."""
    from .repo.repository import list_files

    out = sys.stdout.buffer
    for f in list_files(_open_repo(repo_path), rev, path, recursive=recursive):
        line = b"%s %5d %5d %10d %s" % (stat.filemode(f.mode).encode(), f.uid, f.gid, f.size, f.path)
        if f.symlink_target is not None:
            line += b" -> " + f.symlink_target
        out.write(line + b"\n")
    out.flush()


@main.command()
@repo_option
@click.argument("rev")
@click.argument("path", type=click.Path())
def cat(repo_path: str, rev: str, path: str) -> None:
    """Print the content of the file PATH in commit REV (checked against its digest)."""
    from .repo.repository import read_file

    data = read_file(_open_repo(repo_path), rev, path)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@main.command("checkout")
@repo_option
@click.argument("rev")
@click.argument("dest", metavar="DIR", type=click.Path())
def checkout_cmd(repo_path: str, rev: str, dest: str) -> None:
    """Materialize the tree of REV in DIR (a new directory), metadata and all."""
    from .repo.checkout import checkout
    from .repo.repository import manifest_of

    repo = _open_repo(repo_path)
    checkout(manifest_of(repo, rev), repo.objects, dest)


@main.command("fsck")
@repo_option
@click.option("--quick", is_flag=True, help="Only check that every needed object exists.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def fsck_cmd(repo_path: str, quick: bool, as_json: bool) -> None:
    """Check commits, manifests, images and objects; exit 4 on any problem."""
    from .repo.fsck import fsck
    from .sysroot.seal import uki_problem

    report = fsck(_open_repo(repo_path), quick=quick, seal_check=uki_problem)
    if as_json:
        _print_json({"ok": report.ok, "commits": report.commits, "history_only": report.history_only,
                     "objects_checked": report.objects_checked,
                     "problems": [{"kind": p.kind.value, "commit": p.commit, "object_digest": p.object,
                                   "image": p.image, "sealed": p.sealed, "detail": p.detail}
                                  for p in report.problems]})
    else:
        for problem in report.problems:
            click.echo(_fsck_line(problem))
        history = f" ({report.history_only} of them history only)" if report.history_only else ""
        click.echo(f"{report.commits} commits{history}, {report.objects_checked} objects verified: "
                   f"{'ok' if report.ok else f'{len(report.problems)} problems'}")
    if not report.ok:
        sys.exit(IntegrityError.exit_code)


def _fsck_line(p: Problem) -> str:
    from .repo.fsck import ProblemKind

    commit = (p.commit or "")[:12]
    return {
        ProblemKind.BAD_COMMIT: f"commit {commit}: bad manifest or trailers: {p.detail}",
        ProblemKind.IMAGE_MISMATCH: f"commit {commit}: manifest does not give the image named by its trailer",
        ProblemKind.MISSING_OBJECT: f"missing object {p.object} (needed by {'image of ' if p.image else ''}"
                                    f"{f'sealed {p.sealed} of ' if p.sealed else ''}commit {commit})",
        ProblemKind.CORRUPT_OBJECT: f"corrupt object {p.object}",
        ProblemKind.GIT_FSCK: f"git fsck: {p.detail}",
        ProblemKind.BAD_SEAL: f"commit {commit}: damaged seal: {p.detail}",
        ProblemKind.SEAL_MISMATCH: f"commit {commit}: its sealed UKI {p.object} does not seal its image: {p.detail}",
    }[p.kind]


@main.command()
@repo_option
@click.argument("rev")
@click.option("--gpg-homedir", metavar="DIR", type=click.Path(), help="The gpg home directory with the trusted keys.")
@click.option("--secureboot-cert", metavar="CERT", type=click.Path(),
              help="Also check that a sealed commit's UKI and loader are signed with this certificate (PEM).")
def verify(repo_path: str, rev: str, gpg_homedir: str | None, secureboot_cert: str | None) -> None:
    """Check the signature of commit REV and name its signer; for a sealed commit,
    check its UKI and loader too."""
    from .repo.repository import verify_commit
    from .sysroot.seal import verify_seal

    repo = _open_repo(repo_path)
    signer = verify_commit(repo, rev, gpg_homedir=gpg_homedir)
    sealed = verify_seal(repo, repo.resolve(rev), cert=secureboot_cert)
    click.echo(f"good signature from {signer.username or signer.key_id} (key {signer.fingerprint})")
    if sealed:
        signed = ", both signed with the certificate" if secureboot_cert else ""
        click.echo(f"sealed: {_sealed_text(sealed)} (the UKI seals the commit's image{signed})")


@main.command("diff")
@repo_option
@click.argument("rev1")
@click.argument("rev2")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def diff_cmd(repo_path: str, rev1: str, rev2: str, as_json: bool) -> None:
    """List paths added (A), removed (D) and modified (M, with what) from REV1 to REV2."""
    from .repo.repository import manifest_of
    from .repo.treediff import diff

    repo = _open_repo(repo_path)
    d = diff(manifest_of(repo, rev1), manifest_of(repo, rev2))
    if as_json:
        name = os.fsdecode
        _print_json({"added": [name(p) for p in d.added], "removed": [name(p) for p in d.removed],
                     "modified": {name(p): w for p, w in d.modified.items()}})
        return
    out = sys.stdout.buffer
    for p in d.added:
        out.write(b"A " + p + b"\n")
    for p in d.removed:
        out.write(b"D " + p + b"\n")
    for p, what in d.modified.items():
        out.write(b"M " + p + b" (" + ",".join(what).encode() + b")\n")
    out.flush()


@main.command()
@repo_option
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--keep-younger-than", type=float, default=0.0, metavar="SECONDS",
              help="Keep objects modified less than this long ago.")
def prune(repo_path: str, dry_run: bool, keep_younger_than: float) -> None:
    """Remove objects that no branch, tag or remote branch needs."""
    from .repo.repository import prune as prune_objects

    r = prune_objects(_open_repo(repo_path), dry_run=dry_run, keep_younger_than=keep_younger_than,
                      on_lock_wait=_say_waiting)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {r.removed} objects ({r.bytes_freed} bytes), kept {r.kept}")


# --- sysroot and deployments ------------------------------------------------------------


def sysroot_options(fn: Any) -> Any:
    fn = whole_sysroot_options(fn)
    return click.option("--os", "os_name", metavar="NAME", help="The os (default: the booted or configured one).")(fn)


def whole_sysroot_options(fn: Any) -> Any:
    """The options of a command on a sysroot, not one os of it."""
    fn = click.option("--sysroot", "sysroot_path", envvar="CFSDEPLOY_SYSROOT", metavar="PATH", type=click.Path(),
                      help="The physical root (default /sysroot when booted into a deployment, else /).")(fn)
    fn = click.option("--boot-dir", metavar="DIR", type=click.Path(),
                      help="The boot directory (default: from the sysroot's config).")(fn)
    fn = click.option("--wait-lock", type=float, default=60.0, show_default=True, metavar="SECONDS",
                      help="How long to wait for another cfsdeploy changing deployments.")(fn)
    return fn


def _open_sysroot(sysroot_path: str | None, boot_dir: str | None) -> Sysroot:
    from .sysroot.layout import Sysroot, default_path

    # An empty --sysroot is a mistake, not a request for the default one.
    s = Sysroot(default_path() if sysroot_path is None else sysroot_path, boot_dir=boot_dir)
    click.get_current_context().call_on_close(lambda: _say_repairs(s.repairs))
    return s


def _lock(wait_lock: float) -> LockPolicy:
    from .sysroot.locking import LockPolicy

    return LockPolicy(wait_lock, lambda: click.echo("waiting for another cfsdeploy to finish...", err=True))


def _say_repairs(repairs: list[Repair]) -> None:
    """What a command found broken by a crash and repaired before its own work."""
    from .boot.bootloader import RepairKind

    for r in repairs:
        click.echo({
            RepairKind.FINISHED_SWITCH: "repaired: finished an interrupted switch of the boot entries "
                                        f"(os {r.os}: {r.written} written, {r.removed} removed)",
            RepairKind.REMOVED_LEFTOVER: f"repaired: removed {r.path}, left by an interrupted switch",
            RepairKind.DAMAGED_RECORD: f"repaired: set a damaged switch record aside as {r.path} ({r.message})",
            RepairKind.SUSPECT_LEFTOVER: f"WARNING: left {r.path} in place: same files as {r.same_as}: "
                                         "check the boot filesystem with fsck.vfat",
            RepairKind.REINSTALLED_KERNEL: f"repaired: reinstalled the kernel and initramfs {r.path} "
                                           f"for {r.deployment}" + (f" as {r.kernel}" if r.kernel else ""),
            RepairKind.BROKEN_KERNEL: f"WARNING: the kernel {r.path} is damaged and could not be put back: "
                                      f"for {r.deployment}: {r.message}",
        }[r.kind], err=True)


@main.group()
def sysroot() -> None:
    """Manage a machine's sysroot."""


@sysroot.command("init")
@click.option("--sysroot", "sysroot_path", envvar="CFSDEPLOY_SYSROOT", default="/", show_default=True,
              type=click.Path(), metavar="PATH", help="The physical root to lay out.")
@click.option("--os", "os_name", required=True, metavar="NAME", help="The os (stateroot) to add.")
@click.option("--boot-dir", metavar="DIR", type=click.Path(),
              help="The boot directory, relative to the sysroot or absolute (default: boot).")
@click.option("--karg", "karg_list", multiple=True, metavar="ARG",
              help="Kernel argument of the first deployment, e.g. root=UUID=... (repeatable).")
@click.option("--tries", type=click.IntRange(0, 99), default=0, metavar="N",
              help="Boot counting: every new deployment gets N tries unless told otherwise (0: off).")
def sysroot_init(sysroot_path: str, os_name: str, boot_dir: str | None, karg_list: tuple[str, ...],
                 tries: int) -> None:
    """Lay out a sysroot (repository, deploy dir, shared /var) or add an os to one."""
    from .sysroot.layout import Sysroot

    s = Sysroot.init(sysroot_path, os_name, boot_dir=boot_dir, karg_list=list(karg_list), tries=tries)
    click.echo(f"sysroot {s.path} ready for os {os_name} (boot directory {s.boot})")


tries_option = click.option("--tries", type=click.IntRange(0, 99), metavar="N",
                            help="Boot counting: the new entry gets N tries (0: off; default from config).")
stage_option = click.option("--stage", is_flag=True,
                            help="Stage it: /etc is merged again and the entries switched at shutdown "
                                 "(`cfsdeploy finalize-staged`), so /etc edits until then are kept.")
kver_option = click.option("--kver", metavar="KVER",
                           help="Boot the commit's kernel KVER (default: its newest; see docs/architecture.md).")


def _say_staged_next(r: DeployResult) -> None:
    """After staging: whether systemd finalizes it at shutdown, or who must."""
    from .sysroot.deploy import FinalizeUnit
    from .sysroot.staged import FINALIZE_UNIT

    if r.finalize_unit == FinalizeUnit.STARTED:
        click.echo(f"staged: {FINALIZE_UNIT} finalizes it at shutdown")
        return
    if r.finalize_unit == FinalizeUnit.FAILED:
        click.echo(f"cfsdeploy: cannot start {FINALIZE_UNIT}: {r.finalize_unit_error}", err=True)
    click.echo("staged: run `cfsdeploy finalize-staged` before rebooting to make it bootable")


@main.command("deploy")
@sysroot_options
@click.argument("rev")
@click.option("--karg", "append", multiple=True, metavar="ARG", help="Add a kernel argument (repeatable).")
@click.option("--karg-delete", "delete", multiple=True, metavar="ARG",
              help="Remove a kernel argument, KEY or KEY=VALUE (repeatable).")
@click.option("--no-default", is_flag=True, help="Add the deployment after the default instead of before.")
@tries_option
@click.option("--verity", type=click.Choice(["require", "try", "off"]),
              help="cfsdeploy.verity= of the new entry (default from config).")
@stage_option
@kver_option
def deploy_cmd(sysroot_path: str | None, os_name: str | None, boot_dir: str | None, wait_lock: float,
               rev: str, append: tuple[str, ...], delete: tuple[str, ...], no_default: bool,
               tries: int | None, verity: str | None, stage: bool, kver: str | None) -> None:
    """Make commit REV (a branch, tag or commit of the sysroot's repository) bootable."""
    from .sysroot.deploy import deploy

    s = _open_sysroot(sysroot_path, boot_dir)
    name = s.pick_os(os_name)
    r = deploy(s, rev, os_name=name, append=append, delete=delete, make_default=not no_default,
               tries=tries, verity=verity, stage=stage, kver=kver, lock=_lock(wait_lock))
    d = r.deployment
    click.echo(f"{'staged' if r.staged else 'deployed'} {d.commit[:12]} as {d.path}"
               + (f" (version {d.version})" if d.version else ""))
    click.echo(f"image {d.image_digest}{' (built)' if r.image_built else ''}")
    click.echo(f"kernel {d.kernel_version} in {os.path.join(s.boot, r.kernel.relpath)}")
    src = f" from {r.merged_from.name}" if r.merged_from else ""
    click.echo(f"etc{src}: {_merge_summary(r.etc)}")
    _say_conflicts(r.etc)
    _say_discarded(r.discarded, replaced=r.staged)
    if r.staged:
        _say_staged_next(r)
    else:
        _say_switched(r.index, r.removed)


def _merge_summary(report: MergeReport) -> str:
    n = len(report.conflicts)
    return (f"/etc: {len(report.modified)} modified, {len(report.added)} added, "
            f"{len(report.removed)} removed, {n} conflict{'' if n == 1 else 's'}")


def _conflict_text(c: Conflict) -> str:
    from .sysroot.etcmerge import ConflictKind

    if c.kind == ConflictKind.PARENT_NOT_DIRECTORY:
        return f"parent {os.fsdecode(c.parent or b'')} is a {c.upstream} upstream, not a directory"
    if c.kind == ConflictKind.BOTH_ADDED:
        return f"added locally as a {c.local}, but upstream added a {c.upstream}"
    return f"upstream turned the {c.original} into a {c.upstream}; the local {c.local} was not applied"


def _say_conflicts(report: MergeReport) -> None:
    for c in report.conflicts:
        click.echo(f"  conflict {os.fsdecode(c.path)}: {_conflict_text(c)} (upstream version kept)")


def _say_switched(index: int, removed: list[str], subject: str = "this") -> None:
    """What a switch of the entries did: deployments removed, and where the new one went."""
    for name in removed:
        click.echo(f"removed old deployment {name}")
    click.echo(f"{subject} is now the default: it boots next" if index == 0
               else f"boot entry {index} added; the default is unchanged")


def _say_discarded(name: str | None, *, replaced: bool = False) -> None:
    if name:
        click.echo(f"{'replaced' if replaced else 'discarded'} the staged deployment {name}")


# Why finalize-staged discarded a staged record, in words.
_DISCARDED = {"stale": "it was staged during an earlier boot that ended without finalizing it",
              "os_gone": "its os {os!r} is gone",
              "deployment_gone": "its deployment {name} is gone",
              "kernel_gone": "its kernel {kernel} is gone from {boot}"}


@main.command("finalize-staged")
@whole_sysroot_options
def finalize_staged_cmd(sysroot_path: str | None, boot_dir: str | None, wait_lock: float) -> None:
    """Make the staged deployment bootable: merge /etc again and switch the entries
    (what cfsdeploy-finalize-staged.service runs at shutdown)."""
    from .sysroot.finalize import finalize_staged

    s = _open_sysroot(sysroot_path, boot_dir)
    r = finalize_staged(s, lock=_lock(wait_lock))
    if r is None:
        click.echo("nothing is staged")
        return
    rec = r.staged
    if r.deployment is None:
        assert r.discarded is not None
        why = _DISCARDED[r.discarded.value].format(os=rec.os, name=rec.name, kernel=rec.kernel, boot=s.boot)
        click.echo(f"discarded the staged deployment {rec.name}: {why}")
        return
    if r.etc is None and rec.merge_from is not None:
        click.echo(f"the merge source {rec.merge_from} is gone: keeping /etc as merged at staging", err=True)
    src = f" from {r.merged_from.name}" if r.merged_from else ""
    click.echo(f"finalized {r.deployment.name}" + (f"; etc{src}: {_merge_summary(r.etc)}" if r.etc else ""))
    if r.etc:
        _say_conflicts(r.etc)
    _say_switched(r.index, r.removed, "it")


@main.command("status")
@sysroot_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts (docs/json.md).")
def status_cmd(sysroot_path: str | None, os_name: str | None, boot_dir: str | None, wait_lock: float,
               as_json: bool) -> None:
    """Show the deployments in boot order: default, rollback, booted, pinned, boot counting."""
    from .sysroot.status import status

    s = _open_sysroot(sysroot_path, boot_dir)
    name = s.pick_os(os_name)
    st = status(s, name, lock=_lock(wait_lock))
    if as_json:
        click.echo(json.dumps(st.to_json(), indent=2))
        return
    rows, pending, checked = st.deployments, st.staged, st.booted_verity
    if pending is not None:
        d_ = pending.deployment
        click.echo(f"  staged: {name} {pending.record.name}: {_staged_when(pending)}")
        if d_ is not None:
            if d_.version:
                click.echo(f"    Version: {d_.version}")
            click.echo(f"    Commit:  {d_.commit}")
            if d_.origin:
                click.echo(f"    Origin:  {d_.origin.refspec}")
    for b in st.broken_entries:
        click.echo(f"WARNING: boot entry {b.entry.filename} cannot boot: {b.message}; "
                   "the next deploy or cleanup drops it", err=True)
    for bad in st.damaged:
        what, then = _DAMAGED[bad.record.kind]
        keeps = bad.keeps
        kept = (f"{', '.join(keeps)} stay{'s' if len(keeps) == 1 else ''} while it exists" if keeps
                else "it names nothing there is")
        click.echo(f"WARNING: {what} {bad.record.path}: {bad.record.reason}; {kept}; {then}", err=True)
    if not rows:
        click.echo(f"os {name}: no deployments")
    for r in rows:
        d = r.deployment
        marks = [m for m, on in (("default", r.default), ("rollback", r.rollback), ("booted", r.booted),
                                 ("pinned", d.pinned)) if on]
        click.echo(f"{'*' if r.booted else ' '} {r.index}: {name} {d.name}"
                   + (f" ({', '.join(marks)})" if marks else ""))
        if d.version:
            click.echo(f"    Version: {d.version}")
        click.echo(f"    Commit:  {d.commit}")
        click.echo(f"    Image:   {d.image_digest}")
        if d.origin:
            click.echo(f"    Origin:  {d.origin.refspec}")
        click.echo(f"    Kernel:  {d.kernel_version}")
        if d.sealed is not None:
            click.echo(f"    Sealed:  UKI {d.sealed.uki} ({r.entry.efi})")
        click.echo(f"    Entry:   {r.entry.filename}")
        if r.boot_counting:
            click.echo(f"    Boot:    {_boot_counting_text(r)}")
        if r.booted and checked is not None:
            click.echo(f"    Verity:  {'verified' if checked.verified else 'NOT VERIFIED'}: {_verity_why(checked)}")
    booted = next((r for r in rows if r.booted), None)
    if booted is not None and checked is not None and not checked.verified:
        click.echo(f"WARNING: the booted deployment {booted.deployment.name} is NOT VERIFIED: {_verity_why(checked)}",
                   err=True)
    if rows and rows[0].boot_failed:
        fell_back = f"; running {booted.deployment.name} instead" if booted and not booted.default else ""
        click.echo(f"WARNING: the default deployment {rows[0].deployment.name} failed to boot{fell_back}. "
                   "`cfsdeploy rollback` makes the previous one the default.", err=True)


# What status says of a damaged record of each kind, and what becomes of it.
_DAMAGED = {Kind.ENTRY: ("damaged boot entry", "the next deploy or cleanup sets it aside"),
            Kind.STAGED: ("damaged staged record", "the next change sets it aside"),
            Kind.ASIDE: ("set aside", "delete it once checked"),
            Kind.LINK: ("damaged by-digest link", "the boot of that image refuses it; check and delete it")}


def _staged_when(st: StagedStatus) -> str:
    from .sysroot.layout import StagedState

    if st.state == StagedState.STALE:
        return "staged during an earlier boot that ended without finalizing it: the next change discards it"
    if st.state == StagedState.GONE:
        return "its deployment is gone: finalizing discards the record"
    return "becomes the default at shutdown" if st.record.default else "is added after the default at shutdown"


def _boot_counting_text(r: DeploymentStatus) -> str:
    """What systemd-boot's counter in the entry's name says, in words."""
    from .sysroot.layout import BootCounting

    left, done = r.entry.tries_left or 0, r.entry.tries_done or 0
    if r.boot_counting == BootCounting.LAST_TRY:
        return (f"on its last try ({done} used): blessed if this boot reaches boot-complete, "
                "else the boot loader boots the next entry from now on")
    if r.boot_counting == BootCounting.FAILED:
        return (f"FAILED TO BOOT: all {done} tries used without reaching boot-complete; "
                "the boot loader now boots the next entry")
    return f"on trial: {left} {'try' if left == 1 else 'tries'} left, {done} used (blessed when a boot completes)"


def _verity_why(v: BootVerity) -> str:
    """Why the files of the running deployment are checked when read, or not."""
    from .sysroot.booted import Reason

    if v.reason == Reason.RECORD_DAMAGED:
        return f"the boot hook's record {v.record} is damaged ({v.message}): what this boot checked is unknown"
    if v.reason == Reason.NO_RECORD:
        return f"cfsdeploy.verity=try, and the boot hook left no record ({v.record}) that fs-verity was used"
    if v.reason == Reason.MEASURED:
        return f"the kernel measured the image and checks every file as it is read (cfsdeploy.verity={v.mode})"
    hint = (" (`cfsdeploy verity enable` gives every object fs-verity and moves to require)"
            if v.mode == "try" else "")
    return (f"cfsdeploy.verity={v.mode}: the image's digest was checked at boot, but files are "
            f"served as the disk holds them, edited or not{hint}")


@main.command("rollback")
@sysroot_options
def rollback_cmd(sysroot_path: str | None, os_name: str | None, boot_dir: str | None, wait_lock: float) -> None:
    """Make the previous deployment the default."""
    from .sysroot.rollback import rollback

    s = _open_sysroot(sysroot_path, boot_dir)
    r = rollback(s, s.pick_os(os_name), lock=_lock(wait_lock))
    _say_discarded(r.discarded)
    click.echo(f"default is now {r.default.name} ({r.default.commit[:12]}), was {r.previous.name}; "
               "reboot to use it")


@main.command("undeploy")
@sysroot_options
@click.argument("index", type=int)
def undeploy_cmd(sysroot_path: str | None, os_name: str | None, boot_dir: str | None, wait_lock: float,
                 index: int) -> None:
    """Remove deployment INDEX (as `status` numbers them)."""
    from .sysroot.rollback import undeploy

    s = _open_sysroot(sysroot_path, boot_dir)
    r = undeploy(s, s.pick_os(os_name), index, lock=_lock(wait_lock))
    _say_discarded(r.discarded)
    click.echo(f"removed deployment {r.deployment.name}")


@main.command("pin")
@sysroot_options
@click.argument("index", type=int)
@click.option("--unpin", is_flag=True, help="Let cleanup remove it again.")
def pin_cmd(sysroot_path: str | None, os_name: str | None, boot_dir: str | None, wait_lock: float,
            index: int, unpin: bool) -> None:
    """Keep deployment INDEX whatever the retention says."""
    from .sysroot.rollback import pin

    s = _open_sysroot(sysroot_path, boot_dir)
    d = pin(s, s.pick_os(os_name), index, not unpin, lock=_lock(wait_lock))
    click.echo(f"deployment {d.name} {'pinned' if d.pinned else 'unpinned'}")


@main.command("cleanup")
@sysroot_options
@click.option("--no-prune", is_flag=True, help="Keep the repository's unused objects.")
def cleanup_cmd(sysroot_path: str | None, os_name: str | None, boot_dir: str | None, wait_lock: float,
                no_prune: bool) -> None:
    """Remove deployments beyond the retention, then unused kernels and objects."""
    from .sysroot.cleanup import cleanup
    from .util.progress import human_bytes

    s = _open_sysroot(sysroot_path, boot_dir)
    r = cleanup(s, s.pick_os(os_name), prune_objects=not no_prune, lock=_lock(wait_lock))
    click.echo(f"removed {len(r.deployments)} deployments, {len(r.kernels)} kernels, "
               f"{r.objects} objects ({human_bytes(r.bytes_freed)})")


@main.command("kargs")
@sysroot_options
@click.option("--append", multiple=True, metavar="ARG", help="Add an argument (repeatable).")
@click.option("--delete", multiple=True, metavar="ARG", help="Remove KEY or KEY=VALUE (repeatable).")
@click.option("--replace", multiple=True, metavar="KEY=[OLD=]NEW", help="Change a value (repeatable).")
def kargs_cmd(sysroot_path: str | None, os_name: str | None, boot_dir: str | None, wait_lock: float,
              append: tuple[str, ...], delete: tuple[str, ...], replace: tuple[str, ...]) -> None:
    """Show, or edit, the default deployment's kernel arguments."""
    from .sysroot.cmdline import set_kargs

    s = _open_sysroot(sysroot_path, boot_dir)
    name = s.pick_os(os_name)
    if append or delete or replace:
        r = set_kargs(s, name, append=append, delete=delete, replace=replace, lock=_lock(wait_lock))
        _say_discarded(r.discarded)
        d = r.deployment
    else:
        default = s.state(name).default
        if default is None:
            fail(f"os {name} has no deployment")
        d = default
    click.echo(" ".join(d.kargs))


EXIT_NO_UPDATE = 77  # `upgrade --check` with nothing new, as rpm-ostree says it


def _pull_progress() -> tuple[Progress, Callable[[PullProgress], None]]:
    """A progress line for a pull, and the callback that feeds it."""
    from .util.progress import Progress, human_bytes

    bar = Progress("pull")

    def show(p: PullProgress) -> None:
        rate = human_bytes(p.wire_bytes / p.elapsed if p.elapsed > 0 else 0)
        if p.phase == "metadata":
            bar.update(f"commits and manifests, {human_bytes(p.wire_bytes)}")
        else:
            bar.update(f"{p.objects_done}/{p.objects_total} objects, {human_bytes(p.bytes_done)}/"
                       f"{human_bytes(p.bytes_total)}, {rate}/s")
    return bar, show


def _upgrade(sysroot_path: str | None, os_name: str | None, boot_dir: str | None, wait_lock: float,
             origin: Origin | None, check: bool, allow_downgrade: bool, tries: int | None, stage: bool,
             kver: str | None) -> None:
    from .sysroot.upgrade import UpgradeOutcome, upgrade
    from .util.progress import human_bytes

    s = _open_sysroot(sysroot_path, boot_dir)
    bar, show = _pull_progress()
    r = upgrade(s, s.pick_os(os_name), origin=origin, check=check, allow_downgrade=allow_downgrade,
                tries=tries, stage=stage, kver=kver, progress=show, lock=_lock(wait_lock))
    if r.pulled is not None:
        p = r.pulled
        bar.done(f"{p.objects_fetched} objects, {human_bytes(p.bytes_fetched)} "
                 f"({human_bytes(p.wire_bytes)} on the wire)")
    if r.outcome == UpgradeOutcome.UP_TO_DATE or (r.outcome == UpgradeOutcome.PENDING_REBOOT and not check):
        pending = r.outcome == UpgradeOutcome.PENDING_REBOOT
        click.echo(f"{r.origin.refspec}: {r.commit[:12]} " + (
            "is already deployed: reboot to use it" if pending else "is what runs: no update"))
        if check:
            sys.exit(EXIT_NO_UPDATE)
        return
    if r.changes is not None and r.current is not None:
        c = r.changes
        click.echo(f"{r.origin.refspec}: {r.current.commit[:12]} -> {r.commit[:12]}: {len(c.added)} added, "
                   f"{len(c.removed)} removed, {len(c.modified)} modified")
        for p_ in c.added[:5]:
            click.echo(f"  A {os.fsdecode(p_)}")
        for p_ in c.removed[:5]:
            click.echo(f"  D {os.fsdecode(p_)}")
        for p_, what in list(c.modified.items())[:5]:
            click.echo(f"  M {os.fsdecode(p_)} ({','.join(what)})")
    if r.deployed is None:  # a check: UPDATE_AVAILABLE, or a PENDING_REBOOT
        click.echo("an update is available")
        return
    d = r.deployed
    if d.image_built:
        click.echo(f"built the image of commit {r.commit[:12]} from its manifest", err=True)
    click.echo(f"{'staged' if d.staged else 'deployed'} {r.commit[:12]} as {d.deployment.name}; "
               f"etc: {_merge_summary(d.etc)}")
    _say_conflicts(d.etc)
    _say_discarded(d.discarded, replaced=d.staged)
    if d.staged:
        _say_staged_next(d)
    else:
        click.echo("reboot to activate it (`cfsdeploy rollback` goes back)")


@main.command("upgrade")
@sysroot_options
@click.option("--check", is_flag=True, help="Only say whether an update exists (exit 77 if not).")
@click.option("--allow-downgrade", is_flag=True, help="Deploy the origin's head even if it is older.")
@tries_option
@stage_option
@kver_option
def upgrade_cmd(sysroot_path: str | None, os_name: str | None, boot_dir: str | None, wait_lock: float,
                check: bool, allow_downgrade: bool, tries: int | None, stage: bool, kver: str | None) -> None:
    """Pull the newest commit of the deployment's origin and deploy it."""
    _upgrade(sysroot_path, os_name, boot_dir, wait_lock, None, check, allow_downgrade, tries, stage, kver)


@main.command("switch")
@sysroot_options
@click.argument("refspec", metavar="REMOTE:BRANCH")
@click.option("--allow-downgrade", is_flag=True, help="Accept a head older than the pulled ref.")
@tries_option
@stage_option
@kver_option
def switch_cmd(sysroot_path: str | None, os_name: str | None, boot_dir: str | None, wait_lock: float,
               refspec: str, allow_downgrade: bool, tries: int | None, stage: bool, kver: str | None) -> None:
    """Follow another branch (REMOTE:BRANCH, or a local BRANCH) from now on, and deploy it."""
    from .sysroot.upgrade import parse_refspec

    _upgrade(sysroot_path, os_name, boot_dir, wait_lock, parse_refspec(refspec), False, allow_downgrade, tries,
             stage, kver)


@main.group()
def verity() -> None:
    """fs-verity of the sysroot's objects."""


@verity.command("enable")
@sysroot_options
def verity_enable(sysroot_path: str | None, os_name: str | None, boot_dir: str | None, wait_lock: float) -> None:
    """Enable fs-verity on every object, then boot deployments with verity=require."""
    from .sysroot.verity import ProblemKind, enable_verity
    from .util.progress import Progress

    s = _open_sysroot(sysroot_path, boot_dir)
    bar = Progress("verity")
    r = enable_verity(s, s.pick_os(os_name), progress=lambda i, n: bar.update(f"{i}/{n} objects"),
                      lock=_lock(wait_lock))
    bar.done(f"{r.enabled}/{r.objects} objects")
    for problem in r.problems:
        click.echo(f"{problem.object_digest}: {problem.message}" if problem.kind == ProblemKind.CANNOT_ENABLE
                   else f"{problem.object_digest}: corrupt object (its content has digest {problem.measured_digest}; "
                        "run fsck)", err=True)
    n = len(r.required)
    click.echo(f"fs-verity on {r.enabled} of {r.objects} objects; "
               f"{n} deployment{'' if n == 1 else 's'} now boot{'s' if n == 1 else ''} with cfsdeploy.verity=require")
    if r.problems:
        sys.exit(1)


# --- remotes and pulls ------------------------------------------------------------------


@main.group()
def remote() -> None:
    """Manage the remotes a repository pulls from."""


@remote.command("add")
@repo_option
@click.argument("name")
@click.argument("url")
@click.option("--gpg-import", "key_files", multiple=True, metavar="KEYFILE",
              type=click.Path(exists=True, dir_okay=False),
              help="Trust the OpenPGP public keys in KEYFILE for this remote (repeatable).")
@click.option("--no-gpg-verify", is_flag=True, help="Accept unsigned commits from this remote.")
@click.option("--branch", help="The branch `pull` fetches when none is named.")
@click.option("--no-require-binding", is_flag=True,
              help="Accept heads bound to no branch (commits made before bindings).")
def remote_add(repo_path: str, name: str, url: str, key_files: tuple[str, ...], no_gpg_verify: bool,
               branch: str | None, no_require_binding: bool) -> None:
    """Add remote NAME at URL (http://, https://, file:// or a path)."""
    from .remote import remotes

    repo = _open_repo(repo_path)
    r = remotes.add(repo, name, url, key_files=key_files, gpg_verify=not no_gpg_verify, branch=branch,
                    require_binding=not no_require_binding, on_lock_wait=_say_waiting)
    keys = remotes.trusted_keys(repo, name)
    click.echo(f"added remote {r.name} {r.url}" + (f", trusting {', '.join(keys)}" if keys else ""))


@remote.command("list")
@repo_option
def remote_list(repo_path: str) -> None:
    """List remotes: name, URL, default branch, whether signatures and bindings are required."""
    from .remote import remotes

    repo = _open_repo(repo_path)
    for r in remotes.list_remotes(repo):
        verify = "no gpg-verify"
        if r.gpg_verify:
            verify = f"gpg-verify, trusted keys: {len(remotes.trusted_keys(repo, r.name))}"
        binding = "require-binding" if r.require_binding else "no require-binding"
        click.echo(f"{r.name}\t{r.url}\t{r.branch or '-'}\t{verify}, {binding}")


@remote.command("remove")
@repo_option
@click.argument("name")
def remote_remove(repo_path: str, name: str) -> None:
    """Forget remote NAME: its settings, trusted keys and remote branches."""
    from .remote import remotes

    remotes.remove(_open_repo(repo_path), name, on_lock_wait=_say_waiting)
    click.echo(f"removed remote {name}")


def _say_waiting() -> None:
    click.echo("waiting for the repository lock...", err=True)


@main.command("pull")
@repo_option
@click.argument("name", metavar="REMOTE")
@click.argument("branch", required=False)
@click.option("--depth", type=click.IntRange(min=1), metavar="N",
              help="Fetch only the last N commits of the history (default: all).")
@click.option("--allow-downgrade", is_flag=True,
              help="Accept a head older than the one the remote branch names now.")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Objects fetched at once.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the server at any one time.")
@click.option("--wait-lock", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="How long to wait for another writer.")
@click.option("--url", help="Fetch from this URL this once (a mirror, install media) instead of the remote's.")
def pull_cmd(repo_path: str, name: str, branch: str | None, depth: int | None, allow_downgrade: bool,
             jobs: int, timeout: float, wait_lock: float, url: str | None) -> None:
    """Fetch BRANCH (default: the remote's) of REMOTE into refs/remotes/REMOTE/BRANCH."""
    from .remote.pull import PullOptions, pull
    from .remote.transport import Limits
    from .util.progress import human_bytes

    bar, show = _pull_progress()
    options = PullOptions(jobs=jobs, limits=Limits(timeout=timeout), lock_wait=wait_lock,
                          on_lock_wait=_say_waiting)
    r = pull(_open_repo(repo_path), name, branch, depth=depth, allow_downgrade=allow_downgrade, progress=show,
             options=options, url=url)
    bar.done(f"{r.objects_fetched} objects")
    fetched = (f"{r.objects_fetched} objects, {human_bytes(r.bytes_fetched)}; "
               f"{human_bytes(r.wire_bytes)} received in {r.elapsed:.1f} s")
    if r.signer is not None:
        click.echo(f"good signature from {r.signer.username or r.signer.key_id} (key {r.signer.fingerprint})")
    if r.updated:
        was = f"was {r.previous[:12]}" if r.previous else "new branch"
        click.echo(f"{r.remote}/{r.branch}: new {r.commit[:12]} ({was}); {fetched}")
    else:
        click.echo(f"{r.remote}/{r.branch}: up to date at {r.commit[:12]}; {fetched}")


# --- install -----------------------------------------------------------------------


@main.group()
def install() -> None:
    """Install a machine: a sysroot with one deployment on a new disk or filesystems."""


def install_options(fn: Any) -> Any:
    """Where the commit comes from and how the machine boots it."""
    for option in reversed([
        click.option("--repo", "repo_rev", nargs=2, metavar="PATH BRANCH",
                     help="Install BRANCH of the local repository PATH."),
        click.option("--from", "from_url", metavar="URL", help="Install from this remote (with --branch)."),
        click.option("--branch", metavar="B", help="The branch of --from to install."),
        click.option("--gpg-import", "key_files", multiple=True, metavar="KEYFILE",
                     type=click.Path(exists=True, dir_okay=False),
                     help="Trust these OpenPGP keys, for this install and the machine's upgrades (repeatable)."),
        click.option("--no-gpg-verify", is_flag=True,
                     help="Without --gpg-import: install, and follow, unsigned commits."),
        click.option("--update-url", metavar="URL",
                     help="Where the installed machine pulls upgrades (default: the source's URL)."),
        click.option("--os", "os_name", required=True, metavar="NAME", help="The os (stateroot)."),
        click.option("--karg", "karg_list", multiple=True, metavar="ARG", help="Kernel argument (repeatable)."),
        click.option("--console", metavar="TTY", help="console= of the kernel command line, e.g. ttyS0."),
        click.option("--tries", type=click.IntRange(0, 99), default=0, metavar="N",
                     help="Boot counting: every new deployment gets N tries (0: off)."),
        click.option("--verity", type=click.Choice(["require", "try", "off"]),
                     help="cfsdeploy.verity= of the first entry (default from config)."),
    ]):
        fn = option(fn)
    return fn


def _install_source(repo_rev: tuple[str, str] | None, from_url: str | None, branch: str | None,
                    key_files: tuple[str, ...], no_gpg_verify: bool) -> Source:
    from .sysroot.install import Source

    # the machine follows this remote for good: unsigned only when asked for
    if bool(key_files) == no_gpg_verify:
        raise click.UsageError("give --gpg-import KEYFILE, or --no-gpg-verify for unsigned commits")
    if (repo_rev is None) == (from_url is None):
        raise click.UsageError("give one of --repo PATH BRANCH and --from URL")
    if repo_rev is not None:
        if branch is not None:
            raise click.UsageError("--branch is for --from; --repo names its BRANCH")
        path = os.path.abspath(repo_rev[0])
        return Source(f"file://{path}", repo_rev[1], key_files, local_repo=path)
    if branch is None:
        raise click.UsageError("--from needs --branch")
    assert from_url is not None
    return Source(from_url, branch, key_files)


def _say_installed(kargs: tuple[str, ...], r: DeployResult) -> None:
    d = r.deployment
    click.echo(f"deployed {d.commit[:12]} as {d.path}" + (f" (version {d.version})" if d.version else ""))
    click.echo(f"kernel command line: {' '.join(kargs)}")


def _mib(text: str) -> int:
    """A size: N, NM or NG (MiB by default)."""
    units = {"M": 1 << 20, "G": 1 << 30}
    unit = units.get(text[-1:].upper(), 0)
    number = text[:-1] if unit else text
    if not number.isdigit() or int(number) == 0:
        raise click.UsageError(f"{text}: not a size (e.g. 4G or 600M)")
    return int(number) * (unit or 1 << 20)


@install.command("to-disk")
@click.argument("target", type=click.Path())
@install_options
@click.option("--size", metavar="SIZE", help="Create TARGET as a sparse image file of SIZE (e.g. 4G).")
@click.option("--wipe", is_flag=True, help="Overwrite a disk that holds partitions or a filesystem.")
@click.option("--esp-size", default="512M", show_default=True, metavar="SIZE", help="The ESP's size.")
@click.option("--filesystem", "fs", type=click.Choice(["ext4", "xfs"]), default="ext4", show_default=True,
              help="The root filesystem.")
@click.option("--root-by-label", is_flag=True, help="root=LABEL=root instead of root=PARTUUID=...")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts, with each phase's time (docs/json.md).")
def install_to_disk(target: str, repo_rev: tuple[str, str] | None, from_url: str | None, branch: str | None,
                    key_files: tuple[str, ...], no_gpg_verify: bool, update_url: str | None, os_name: str,
                    karg_list: tuple[str, ...],
                    console: str | None, tries: int, verity: str | None, size: str | None, wipe: bool,
                    esp_size: str, fs: str, root_by_label: bool, as_json: bool) -> None:
    """Partition TARGET (a block device or image file), write the ESP and root, install."""
    from .sysroot.install import FsType, Options, to_disk

    source = _install_source(repo_rev, from_url, branch, key_files, no_gpg_verify)
    opts = Options(os_name, update_url, _mib(esp_size), FsType(fs), karg_list, console, root_by_label, tries,
                   verity)
    r = to_disk(target, source, opts, size=_mib(size) if size else None, wipe=wipe,
                say=lambda m: click.echo(m, err=True))
    if as_json:
        _print_json(r.to_json())
        return
    click.echo(f"{r.target}: ESP {r.esp_uuid}, root {r.root_uuid}")
    _say_installed(r.kargs, r.deployed)


@install.command("to-filesystem")
@click.argument("root", type=click.Path())
@click.option("--boot-dir", required=True, metavar="DIR", type=click.Path(), help="The mounted ESP.")
@install_options
@click.option("--root-karg", metavar="ARG", help="root= of the command line (default: from findmnt ROOT).")
def install_to_filesystem(root: str, boot_dir: str, repo_rev: tuple[str, str] | None, from_url: str | None,
                          branch: str | None, key_files: tuple[str, ...], no_gpg_verify: bool,
                          update_url: str | None, os_name: str,
                          karg_list: tuple[str, ...], console: str | None, tries: int, verity: str | None,
                          root_karg: str | None) -> None:
    """Install into a mounted root filesystem ROOT and ESP (LVM, LUKS, RAID layouts)."""
    from .sysroot.install import Options, to_filesystem

    source = _install_source(repo_rev, from_url, branch, key_files, no_gpg_verify)
    opts = Options(os_name, update_url, kargs=karg_list, console=console, tries=tries, verity=verity)
    r = to_filesystem(root, boot_dir, source, opts, root_karg=root_karg, say=lambda m: click.echo(m, err=True))
    _say_installed(r.kargs, r.deployed)


if __name__ == "__main__":
    main()
