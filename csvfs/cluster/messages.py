"""The names of the messages between a member node and its coordinator, named once
for both sides.

Requests a member sends (besides the metadata methods of coordinator/service.py)
open, renew and close its session; notifications the coordinator pushes carry the
quiesce protocol (coordinator/quiesce.py and csvfs/quiesce.py tell it whole). A
push with a "token" in its body waits for the member's ACK of that token.
"""

# -- session requests, member -> coordinator (coordinator/endpoint.py) ----------------
# {slot, epoch, opens: [[ino, handles]...], locks: [[ino, owner, kind, type, start, end,
# pid]...]} -> {epoch, grant_seconds, maps, lost_locks}
REGISTER = "register"
HEARTBEAT = "heartbeat"  # renews the member's grant -> {epoch, grant_seconds}
ACK = "ack"  # {token}: the push that carried this token is done
GOODBYE = "goodbye"  # a clean unmount: every file is closed, no I/O follows
STATUS = "status"  # what `csvfs status` shows of the coordinator

SESSION_REQUESTS = (REGISTER, HEARTBEAT, ACK, GOODBYE, STATUS)

# -- pushes, coordinator -> member: the quiesce protocol -------------------------------
PAUSE = "pause"  # {ino, token}: close ino's I/O gate; ack once nothing is in flight
MAP = "map"  # {ino, size, runs, granule, version, resume, forget[, token]}: a new map of ino
RESUME = "resume"  # {ino}: open ino's gate again (a quiesce that changed nothing)
INVALIDATE = "invalidate"  # {inos, entries[, token]}: drop what the kernel caches

# -- pushes, coordinator -> member: locks (coordinator/locks.py, csvfs/locks.py) ---------
LOCKS_CHANGED = "locks_changed"  # {ino}: locks on ino were released; waiters try again


def brief(args: dict) -> str:
    """A request's arguments for a debug log line, without bulk (xattr values, lists)."""
    return ", ".join(f"{key}={value!r}" for key, value in args.items()
                     if not isinstance(value, bytes | list) or key == "name")
