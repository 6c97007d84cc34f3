"""A backup repository's config file, which makes a directory a repository: what
it must hold, and the checks before one is made or opened."""

from __future__ import annotations

from pathlib import Path

import msgpack

from csvfs.backup.errors import RepositoryExists, RepositoryMissing

FORMAT = 1


def refuse_existing(path: Path) -> None:
    if (path / "config").exists():
        raise RepositoryExists(f"there is already a backup repository at {path}")
    if path.exists() and not path.is_dir():
        raise RepositoryExists(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise RepositoryExists(f"{path} exists and is not empty")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def read_config(path: Path) -> dict:
    try:
        raw = (path / "config").read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        if not path.exists():
            raise RepositoryMissing(f"no backup repository at {path}") from None
        raise RepositoryMissing(f"{path} is not a backup repository (it has no config)") from None
    except OSError as exc:
        raise RepositoryMissing(f"cannot read {path / 'config'}: {exc.strerror}") from None
    config = unpack(raw)
    fields = {"format": int, "repo_id": str, "encrypted": bool, "chunk_size": int,
              "key_check": bytes}
    if not isinstance(config, dict) or not all(isinstance(config.get(name), kind)
                                               for name, kind in fields.items()):
        raise RepositoryMissing(f"{path / 'config'} is not a csvfs backup repository config")
    if config["format"] != FORMAT:
        raise RepositoryMissing(f"the repository at {path} has format {config['format']}; "
                                f"this csvfs reads format {FORMAT}")
    return config


def unpack(raw: bytes):
    """msgpack data, or None for bytes that are not."""
    try:
        return msgpack.unpackb(raw)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
