"""Mount-table helpers shared by the scripts (bench, cluster helper, failover bench)."""

from __future__ import annotations

import os


def _unescape_mount_field(text: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes
    for code in ("\\040", "\\011", "\\012", "\\134"):
        text = text.replace(code, chr(int(code[1:], 8)))
    return text


def is_mounted(mountpoint: str | os.PathLike) -> bool:
    wanted = os.path.realpath(mountpoint)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 1 and _unescape_mount_field(fields[1]) == wanted:
                return True
    return False
