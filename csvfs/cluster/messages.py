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
# {id, results: {ino: "frozen" | "failed: why"}}: this node's writers answered FREEZE
WRITERS_FROZEN = "writers_frozen"

SESSION_REQUESTS = (REGISTER, HEARTBEAT, ACK, GOODBYE, STATUS, WRITERS_FROZEN)

# -- pushes, coordinator -> member: the quiesce protocol -------------------------------
PAUSE = "pause"  # {ino, token}: close ino's I/O gate; ack once nothing is in flight
MAP = "map"  # {ino, size, runs, granule, version, resume, forget[, token]}: a new map of ino
RESUME = "resume"  # {ino}: open ino's gate again (a quiesce that changed nothing)
INVALIDATE = "invalidate"  # {inos, entries[, token]}: drop what the kernel caches

# -- pushes, coordinator -> member: the snapshot hold (coordinator/snapshots.py) ---------
HOLD = "hold"  # {token}: hold every file's I/O; ack once nothing is in flight
SNAPSHOT_SET = "snapshot_set"  # {version}: the point is set; maps older than version ask
# first before every write; the hold is over
FREEZE = "freeze"  # {id, inos, timeout}: freeze the writers of inos; answer WRITERS_FROZEN
THAW = "thaw"  # {id}: let the writers that freeze held go on

# -- requests of a backup (csvfs/backup/), from any process holding the cluster key -------
# {timeout, files, freeze, allow_crash_consistent} -> {id, t_ns, version, pause_s, consistency}
SNAPSHOT_TAKE = "snapshot_take"
SNAPSHOT_FILES = "snapshot_files"  # {id} -> the frozen namespace and maps, and `preserved`
SNAPSHOT_CHECK = "snapshot_check"  # {id, since} -> preserves after the first `since`
SNAPSHOT_READ = "snapshot_read"  # {id, kind, granules}: read for good; hold them no more
SNAPSHOT_RENEW = "snapshot_renew"  # {id}: the requester is still at work
SNAPSHOT_RELEASE = "snapshot_release"  # {id, outcome}

BACKUP_REQUESTS = (SNAPSHOT_TAKE, SNAPSHOT_FILES, SNAPSHOT_CHECK, SNAPSHOT_READ,
                   SNAPSHOT_RENEW, SNAPSHOT_RELEASE)

# -- redirected I/O (coordinator/redirect.py, csvfs/redirect.py) --------------------------
# {node, action}, from any process holding the cluster key (`csvfs fault`, `csvfs
# redirect`) -> {node, mode, reason}; the coordinator pushes CONTROL {action, token} on
CONTROL = "control"
# {to}, from any process holding the cluster key (`csvfs move`): hand the coordinator
# role to node `to` ("": the best one) -> {from, to, epoch}
MOVE = "move"

# -- pushes, coordinator -> member: locks (coordinator/locks.py, csvfs/locks.py) ---------
LOCKS_CHANGED = "locks_changed"  # {ino}: locks on ino were released; waiters try again


def brief(args: dict) -> str:
    """A request's arguments for a debug log line, without bulk (xattr values, lists)."""
    return ", ".join(f"{key}={value!r}" for key, value in args.items()
                     if not isinstance(value, bytes | list) or key == "name")
