"""User-facing errors and the exit codes the CLI documents.

A `UserError` is printed as one line without a traceback. Each subclass
carries the exit code that README.md documents for it.
"""


class ExitCode:
    OK = 0
    FAILURE = 1  # unexpected runtime failure
    USAGE = 2  # bad command-line argument
    BAD_VOLUME = 10  # not a volume, truncated, corrupt, unsupported version
    BAD_KEY = 11  # cluster key file missing, unreadable or wrong
    BAD_MOUNTPOINT = 12  # mountpoint missing, not a directory, or busy
    VOLUME_BUSY = 13  # another live node holds the volume
    EXISTS = 14  # mkfs target already holds a volume (use --force)
    UNREACHABLE = 15  # status: the lease names a live coordinator that did not answer
    NO_SUCH_NODE = 16  # fault, redirect, move: no node of that name is in session
    CANNOT_MOVE = 17  # move: no node can take the role (none other, or no working path)
    ELECTION_UNAVAILABLE = 18  # --election etcd://...: no etcd endpoint answered
    FSCK_REPAIRED = 1  # fsck found problems and repaired them all
    FSCK_UNREPAIRED = 4  # fsck found problems it left in place
    REPO_MISSING = 20  # no backup repository at that path, or not a repository
    REPO_EXISTS = 21  # create: a repository (or other files) already there
    REPO_LOCKED = 22  # another process holds the repository's lock
    REPO_KEY = 23  # repository key file missing, unreadable, too open, or wrong
    REPO_CORRUPT = 24  # a chunk or manifest is corrupt or missing
    NO_SUCH_BACKUP = 25  # no backup (or more than one) matches the id given
    NO_SUCH_FILE = 26  # backup or restore: no such file on the volume or in the backup
    BACKUP_FAILED = 27  # the snapshot was lost during the backup (out of space, timeout)


class UserError(Exception):
    """An error caused by the user's input or environment; shown without traceback."""

    exit_code = ExitCode.FAILURE


class UsageError(UserError):
    exit_code = ExitCode.USAGE


class VolumeError(UserError):
    exit_code = ExitCode.BAD_VOLUME


class KeyFileError(UserError):
    exit_code = ExitCode.BAD_KEY


class MountpointError(UserError):
    exit_code = ExitCode.BAD_MOUNTPOINT


class ElectionUnavailable(UserError):
    exit_code = ExitCode.ELECTION_UNAVAILABLE


class VolumeBusyError(UserError):
    exit_code = ExitCode.VOLUME_BUSY


class VolumeExistsError(UserError):
    exit_code = ExitCode.EXISTS
