"""Key files: a secret as hex text in a file only its owner may read, like an ssh
private key. The cluster key (csvfs/volume/image.py) and a backup repository's key
(csvfs/backup/keys.py) are both kept so; each says what its key must be."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from csvfs.volume.errors import UserError


def read_secret(path: str | os.PathLike, what: str, error: type[UserError],
                exposure: str = "") -> bytes:
    """The hex text of a key file (not yet parsed); `error` with a one-line reason if it
    is missing, unreadable or open to others. `exposure` says what a reader could do."""
    try:
        with open(path, "rb") as key_file:
            mode = os.fstat(key_file.fileno()).st_mode
            raw = key_file.read(4096)
    except FileNotFoundError:
        raise error(f"{what} file {path} does not exist (give --key KEYFILE)") from None
    except OSError as exc:
        raise error(f"cannot read {what} file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise error(f"{what} file {path} is open to group or others (mode "
                    f"{stat.S_IMODE(mode):04o}){exposure}; run 'chmod 600 {path}'")
    return raw


def parse_hex(raw: bytes) -> bytes | None:
    """The key in a key file's text, or None if it is not hex."""
    try:
        return bytes.fromhex(raw.decode("ascii").strip())
    except ValueError:  # not ASCII (UnicodeDecodeError is one), or not hex
        return None


def write_secret(path: str | os.PathLike, key: bytes) -> None:
    """Write a key file atomically, readable by its owner only, and durably."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key.hex() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
