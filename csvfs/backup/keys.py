"""A backup repository's keys: the master key in its key file, outside the repository,
and the sub-keys derived from it, one per purpose (csvfs/backup/repository.py tells
what each protects)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import blake3
import msgpack

from csvfs.backup.errors import RepositoryKeyError
from csvfs.volume.keyfile import parse_hex, read_secret, write_secret

log = logging.getLogger(__name__)

KEY_SIZE = 32
_KEY_CHECK = b"csvfs backup repository key check"
_KEY_CONTEXT = "csvfs backup 2026 {}"


def default_key_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.key")


def read_key(path: str | os.PathLike) -> bytes:
    """The master key in a key file: hex text, readable by its owner only (whoever
    can read it can read every backup in the repository)."""
    key = parse_hex(read_secret(path, "repository key", RepositoryKeyError))
    if key is None or len(key) != KEY_SIZE:
        raise RepositoryKeyError(f"repository key file {path} is not a csvfs backup key "
                                 f"(expected {KEY_SIZE} bytes in hex)")
    return key


def write_key(path: str | os.PathLike, key: bytes) -> None:
    """Write a key file atomically, readable by its owner only."""
    write_secret(path, key)


@dataclass(frozen=True)
class Keys:
    """The sub-keys of one master key, one per purpose, so that no key serves two."""

    chunk_id: bytes
    mac: bytes
    encryption: bytes
    check: bytes

    @classmethod
    def derive(cls, master: bytes) -> Keys:
        def sub(purpose: str) -> bytes:
            context = _KEY_CONTEXT.format(purpose)
            return blake3.blake3(master, derive_key_context=context).digest()

        return cls(sub("chunk id"), sub("manifest mac"), sub("encryption"), sub("key check"))


def key_check(keys: Keys, config: dict) -> bytes:
    """The config's key check value: covers the fields, so none can be altered."""
    fields = [_KEY_CHECK, config["format"], config["repo_id"], config["encrypted"],
              config["chunk_size"]]
    return blake3.blake3(msgpack.packb(fields), key=keys.check).digest()


def key_for_new_repository(key_path: Path) -> bytes:
    """The key in key_path if there is one (several repositories may share a key),
    else a new one written there."""
    if key_path.exists():
        log.info("using the existing key in %s", key_path)
        return read_key(key_path)
    key = os.urandom(KEY_SIZE)
    write_key(key_path, key)
    return key
