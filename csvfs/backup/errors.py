"""The backup repository's errors, each with the exit code README.md documents."""

from __future__ import annotations

from csvfs.volume.errors import ExitCode, UserError


class RepositoryMissing(UserError):
    exit_code = ExitCode.REPO_MISSING


class RepositoryExists(UserError):
    exit_code = ExitCode.REPO_EXISTS


class RepositoryLocked(UserError):
    exit_code = ExitCode.REPO_LOCKED


class RepositoryKeyError(UserError):
    exit_code = ExitCode.REPO_KEY


class RepositoryCorrupt(UserError):
    """Something stored is damaged or gone; the subclasses say what."""

    exit_code = ExitCode.REPO_CORRUPT


class CorruptChunk(RepositoryCorrupt):
    pass


class MissingChunk(RepositoryCorrupt):
    pass


class CorruptManifest(RepositoryCorrupt):
    pass


class NoSuchBackup(UserError):
    exit_code = ExitCode.NO_SUCH_BACKUP


class AmbiguousBackup(NoSuchBackup):
    """A backup id prefix that matches more than one backup."""

