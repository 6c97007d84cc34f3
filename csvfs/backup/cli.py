"""`csvfs backup ...`: the backup command line, from any shell, with no mount of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import trio

from csvfs.backup.manifest import chunk_needs
from csvfs.backup.progress import bar
from csvfs.backup.repository import Repository
from csvfs.backup.restore_file import ChunkCache, restore_file
from csvfs.volume.errors import ExitCode, MountpointError, UsageError, UserError
from csvfs.volume.sizes import format_size


def add_parser(sub, parents: list) -> None:
    backup = sub.add_parser("backup", help="back up a live volume, and restore it",
                            parents=parents)
    commands = backup.add_subparsers(dest="backup_command", metavar="COMMAND",
                                     parser_class=type(backup))
    commands.required = True
    repo = argparse.ArgumentParser(add_help=False)
    repo.add_argument("--repo", type=Path, required=True, help="the repository directory")
    repo.add_argument("--repo-key", type=Path,
                      help="the repository's key file (default REPO.key)")
    source = argparse.ArgumentParser(add_help=False)
    source.add_argument("image", type=Path, help="the volume image")
    source.add_argument("--key", type=Path, help="cluster key file (default IMAGE.key)")
    source.add_argument("--full", action="store_true",
                        help="read every chunk, even of files whose changes are tracked "
                        "since a backup in this repository")
    source.add_argument("--snapshot-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="the coordinator releases the snapshot if this backup stops "
                        "renewing it for this long, e.g. when it was killed (default 60)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print a JSON summary")

    init = commands.add_parser("init", help="create a repository", parents=parents)
    init.add_argument("repo_path", type=Path, metavar="REPO")
    init.add_argument("--repo-key", type=Path, help="key file to create (default REPO.key)")
    init.add_argument("--encrypt", action="store_true",
                      help="encrypt chunks and manifests (ChaCha20-Poly1305)")
    commands.add_parser("volume", parents=[*parents, source, repo, as_json],
                        help="crash-consistent backup of the whole volume")
    vm = commands.add_parser("vm", parents=[*parents, source, repo, as_json],
                             help="backup of VM disks (files), each as one item")
    vm.add_argument("paths", nargs="+", metavar="PATH", help="a file on the volume")
    vm.add_argument("--allow-crash-consistent", action="store_true",
                    help="take a file crash-consistent if its writer cannot freeze")
    vm.add_argument("--freeze-timeout", type=float, default=10.0, metavar="SECONDS",
                    help="how long writers have to flush and hold (default 10)")
    commands.add_parser("list", parents=[*parents, repo, as_json], help="list the backups")
    verify = commands.add_parser("verify", parents=[*parents, repo, as_json],
                                 help="re-read and re-hash every chunk and manifest")
    verify.add_argument("ids", nargs="*", metavar="ID")
    restore = commands.add_parser("restore", parents=[*parents, repo, as_json],
                                  help="restore a volume backup to a new image, or one file")
    restore.add_argument("id", metavar="ID")
    restore.add_argument("--to", type=Path, required=True, dest="target",
                         help="a new volume image, or with --file the file to write")
    restore.add_argument("--file", help="restore only this file of the backup")
    forget = commands.add_parser("forget", parents=[*parents, repo],
                                 help="remove backups (their chunks go at the next prune)")
    forget.add_argument("ids", nargs="+", metavar="ID")
    prune = commands.add_parser("prune", parents=[*parents, repo, as_json],
                                help="keep the newest backups, free unused chunks")
    prune.add_argument("--keep-last", type=int, metavar="N")
    mount = commands.add_parser("mount", parents=[*parents, repo],
                                help="show a backup's files read-only (FUSE), in the "
                                "foreground until unmounted")
    mount.add_argument("id", metavar="ID")
    mount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")


def run(args) -> int:
    return COMMANDS[args.backup_command](args)


def _open(args) -> Repository:
    return Repository.open(args.repo, args.repo_key)


def cmd_init(args) -> int:
    repo = Repository.create(args.repo_path, args.repo_key, encrypt=args.encrypt)
    print(f"created {'encrypted ' if repo.encrypted else ''}repository {repo.repo_id} at "
          f"{repo.path}; its key is in {repo.key_path}: keep a copy elsewhere")
    return ExitCode.OK


def cmd_volume(args) -> int:
    return _backup(args, "volume", [])


def cmd_vm(args) -> int:
    return _backup(args, "vm", args.paths)


BACKUP_NICE = 10  # the copy yields the CPU to the nodes and their applications


def _backup(args, kind: str, paths: list[str]) -> int:
    from csvfs.backup.engine import run_backup

    repo = _open(args)
    os.nice(BACKUP_NICE)
    if not 1 <= args.snapshot_timeout <= 3600:
        raise UsageError("--snapshot-timeout must be between 1 and 3600 seconds")
    freeze_timeout = getattr(args, "freeze_timeout", 10.0)
    if not 1 <= freeze_timeout <= 600:
        raise UsageError("--freeze-timeout must be between 1 and 600 seconds")
    try:
        manifest = trio.run(run_backup, args.image, args.key, repo, kind, paths,
                            args.snapshot_timeout, args.full,
                            getattr(args, "allow_crash_consistent", False), freeze_timeout)
    except BaseExceptionGroup as group:  # trio's nurseries wrap what they raise
        raise _user_error_in(group) or group from None
    summary = _summary(manifest)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        stats = manifest["stats"]
        print(f"backup {manifest['id']}: {kind}, {len(manifest['files'])} files, "
              f"{format_size(stats['logical'])} logical, {format_size(stats['read'])} read, "
              f"{format_size(stats['new'])} new, in {stats['duration_s']:.1f} s "
              f"(volume paused {stats['pause_s'] * 1000:.1f} ms)")
        for warning in manifest["warnings"]:
            print(f"warning: {warning}")
    return ExitCode.OK


def _user_error_in(group: BaseExceptionGroup) -> UserError | None:
    matched, _rest = group.split(UserError)
    while isinstance(matched, BaseExceptionGroup):
        matched = matched.exceptions[0]
    return matched


def _summary(manifest: dict) -> dict:
    return {"id": manifest["id"], "time": _when(manifest["time_ns"]), "kind": manifest["kind"],
            "volume": manifest["source"]["volume"],
            "files": [{"path": entry["path"], "size": entry["size"],
                       "consistency": entry["consistency"]} for entry in manifest["files"]],
            **manifest["stats"], "warnings": manifest["warnings"]}


def _when(t_ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_ns / 1e9))


def cmd_list(args) -> int:
    backups = [_summary(manifest) for manifest in _open(args).backups()]
    if args.json:
        print(json.dumps(backups, indent=2))
        return ExitCode.OK
    rows = [["ID", "TIME", "KIND", "FILES", "CONSISTENCY", "LOGICAL", "READ", "NEW",
             "DURATION"]]
    for entry in backups:
        kinds = sorted({file["consistency"] for file in entry["files"]}) or ["-"]
        rows.append([entry["id"], entry["time"], entry["kind"], str(len(entry["files"])),
                     "/".join(kinds), format_size(entry["logical"]),
                     format_size(entry["read"]), format_size(entry["new"]),
                     f"{entry['duration_s']:.1f} s"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                 strict=True)).rstrip())
    return ExitCode.OK


def cmd_verify(args) -> int:
    from csvfs.backup.repository import RepositoryCorrupt

    repo = _open(args)
    chosen = [repo.load_manifest(backup_id) for backup_id in args.ids] if args.ids \
        else repo.backups()
    # what verify reads: each chunk once, as much of it as any reference needs
    total = sum(chunk_needs(chosen).values())
    with bar(total, "verify") as progress:
        problems = repo.verify([manifest["id"] for manifest in chosen] if args.ids else None,
                               progress=progress.update)
    if args.json:
        print(json.dumps({"backups": len(chosen), "problems": problems}, indent=2))
    for problem in problems if not args.json else []:
        print(f"problem: {problem}")
    if problems:
        raise RepositoryCorrupt(f"{len(problems)} problems found in {repo.path}")
    if not args.json:
        print(f"{len(chosen)} backups verified: every chunk and manifest is intact")
    return ExitCode.OK


def cmd_restore(args) -> int:
    repo = _open(args)
    manifest = repo.load_manifest(args.id)
    if args.file is not None:
        return _restore_file(repo, manifest, args.file, args.target, args.json)
    from csvfs.backup.restore_image import build_image

    total = manifest["stats"]["logical"]
    with bar(total, "restore") as progress:
        done = [0]

        def advance(done_bytes: int, _total: int) -> None:
            progress.update(done_bytes - done[0])
            done[0] = done_bytes

        stats = build_image(manifest, ChunkCache(repo).get, args.target, progress=advance)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"restored backup {manifest['id']} to {args.target}: {stats['files']} files, "
              f"{stats['dirs']} directories, {format_size(stats['bytes'])}")
    return ExitCode.OK


def _restore_file(repo: Repository, manifest: dict, path: str, target: Path,
                  as_json: bool) -> int:
    from csvfs.backup.engine import NoSuchFile

    wanted = "/" + path.strip("/")
    entry = next((entry for entry in manifest["files"] if entry["path"] == wanted), None)
    if entry is None:
        raise NoSuchFile(f"backup {manifest['id']} holds no file {wanted}")
    if target.is_dir():
        raise UsageError(f"{target} is a directory: give the file's new path")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with bar(entry["size"], "restore") as progress:
            restore_file(repo, entry, fd, progress=progress.update)
        os.fchmod(fd, entry["mode"] & 0o7777)
        os.fsync(fd)
    finally:
        os.close(fd)
    if as_json:
        print(json.dumps({"path": wanted, "to": str(target), "size": entry["size"]}))
    else:
        print(f"restored {wanted} ({format_size(entry['size'])}) from backup "
              f"{manifest['id']} to {target}")
    return ExitCode.OK


def cmd_forget(args) -> int:
    repo = _open(args)
    for backup_id in repo.forget(args.ids):
        print(f"forgot backup {backup_id}")
    return ExitCode.OK


def cmd_prune(args) -> int:
    if args.keep_last is not None and args.keep_last < 1:
        raise UsageError("--keep-last must be at least 1 (use forget to remove every backup)")
    outcome = _open(args).prune(args.keep_last)
    if args.json:
        print(json.dumps(outcome, indent=2))
    else:
        print(f"forgot {len(outcome['forgotten'])} backups, removed "
              f"{outcome['chunks_removed']} chunks, freed {format_size(outcome['bytes_freed'])}")
    return ExitCode.OK


def cmd_mount(args) -> int:
    from csvfs.backup.mount import mount  # imports pyfuse3: only for this command

    mountpoint = args.mountpoint.resolve()
    if not mountpoint.exists():
        raise MountpointError(f"mountpoint {args.mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise MountpointError(f"mountpoint {args.mountpoint} is not a directory")
    repo = _open(args)
    manifest = repo.load_manifest(args.id)

    def mounted() -> None:
        print(f"backup {manifest['id']} mounted read-only at {mountpoint}; "
              f"fusermount3 -u {mountpoint} to unmount", file=sys.stderr, flush=True)

    mount(repo, manifest, mountpoint, mounted)
    return ExitCode.OK


COMMANDS = {"init": cmd_init, "volume": cmd_volume, "vm": cmd_vm, "list": cmd_list,
            "verify": cmd_verify, "restore": cmd_restore, "forget": cmd_forget,
            "prune": cmd_prune, "mount": cmd_mount}
