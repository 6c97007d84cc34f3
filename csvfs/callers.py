"""Who asks: what the caller of a FUSE request may do, which the kernel leaves to the
filesystem here (direct_io files, and a create that found the name taken)."""

from __future__ import annotations

import os

CAP_FSETID = 4


def setid_killer(ctx) -> list[int] | None:
    """The groups of a caller whose writes drop setuid/setgid; None if it has CAP_FSETID.

    With direct_io the kernel leaves that to the filesystem (FUSE_WRITE_KILL_SUIDGID,
    which libfuse does not pass on), and only open sees who the caller is.
    """
    try:
        with open(f"/proc/{ctx.pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        capable = int(fields["CapEff"], 16) >> CAP_FSETID & 1
        groups = [int(fields["Gid"].split()[3]), *map(int, fields["Groups"].split())]
    except (OSError, KeyError, ValueError, IndexError):  # gone, or in another pid namespace
        capable, groups = ctx.uid == 0, [ctx.gid]
    return None if capable else groups


def may_open(attrs: dict, flags: int, ctx) -> bool:
    """The permission check the kernel makes before opening an existing file."""
    if ctx.uid == 0:
        return True
    wanted = {os.O_RDONLY: 4, os.O_WRONLY: 2, os.O_RDWR: 6}.get(flags & os.O_ACCMODE, 6)
    if flags & os.O_TRUNC:
        wanted |= 2
    if attrs["uid"] == ctx.uid:
        granted = attrs["mode"] >> 6 & 7
    elif attrs["gid"] in (setid_killer(ctx) or [ctx.gid]):
        granted = attrs["mode"] >> 3 & 7
    else:
        granted = attrs["mode"] & 7
    return wanted & granted == wanted
