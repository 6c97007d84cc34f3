"""Which election a volume uses, and what the roles and tools ask of it.

`--election` (or the environment variable CSVFS_ELECTION) chooses: empty, the
default, is the volume's own lease region (csvfs/cluster/election.py, OFD
locks: nodes on one kernel); `etcd://HOST:PORT[,HOST:PORT...]` is etcd
(csvfs/cluster/etcd_election.py: nodes on several hosts).

Both backends give a node's roles the same interface:

    claim_slot()          take a node slot (its liveness), before trio runs
    run()                 the background task, for as long as the node lives
    read_lease(), read_slot(slot), slot_alive(slot), other_nodes(), live_records()
    live_owner(lease), waits_for_heir(lease), owner_address(lease)
    try_take(may_take, recover)   take the role: (recovered, epoch, old lease) or the lease
    owner_gone(lease)     joining the owner failed: prove it dead if it is
    renew()               may the coordinator go on committing? (False: fence)
    confirmed_at          time.monotonic() the lease was last known to run from
    lease_window          for at least this long (the coordinator commits within 0.8 of it)
    hand_over(heir_slot), release(), leave(), write_slot(mode)

and the command-line tools a `View` of who coordinates and which nodes live.

The etcd modules are imported only where etcd is used: its client brings an HTTP
stack that would add tens of milliseconds to every node's and tool's start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from csvfs.cluster import election as disk
from csvfs.volume import format as fmt
from csvfs.volume.errors import ElectionUnavailable, UsageError, VolumeBusyError
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

ENVIRONMENT = "CSVFS_ELECTION"


def election_spec(text: str | None) -> str:
    """The --election value, or the environment's; checked. UsageError if malformed."""
    spec = (os.environ.get(ENVIRONMENT, "") if text is None else text).strip()
    if spec and spec != "disk":
        from csvfs.cluster.etcd_client import parse_endpoints

        try:
            parse_endpoints(spec)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return "" if spec == "disk" else spec


def make_election(spec: str, volume: Volume, name: str, lease_seconds: float):
    if not spec:
        election = disk.Election(volume, name, lease_seconds)
    else:
        from csvfs.cluster.etcd_client import parse_endpoints
        from csvfs.cluster.etcd_election import EtcdElection

        election = EtcdElection(parse_endpoints(spec), volume.sb.uuid, name, lease_seconds)
    election.spec = spec  # what the balance reads the cluster's other volumes with
    return election


def check_same_election(spec: str, volume: Volume, disk_asked: bool = False) -> None:
    """Every node of a volume must elect the same way, or two could coordinate it at
    once. An etcd coordinator marks the lease region with its URL (record_election);
    a node that would elect through the region refuses a marked volume unless asked
    for the region in so many words (`--election disk`, once no node uses etcd), and
    an etcd node refuses a volume whose region has a lease in time."""
    lease = disk.read_lease(volume)
    if not spec and lease.election and not disk_asked:
        raise VolumeBusyError(
            f"{volume.path} elects its coordinator through {lease.election}: mount it with "
            f"--election {lease.election} (or --election disk once no node uses etcd)")
    if not spec and lease.election and _nodes_live_or_say(volume):
        raise VolumeBusyError(f"{volume.path}: nodes elected through {lease.election} "
                              "still mount it; unmount them first")
    if spec and lease.unexpired() and not lease.election:
        raise VolumeBusyError(
            f"{volume.path} has a coordinator elected through its lease region "
            f"({lease.owner_name}): every node of a volume must elect the same way")


def etcd_nodes_live(volume: Volume) -> bool:
    """Do nodes live in the etcd election that marked this volume (none if unmarked)?
    ElectionUnavailable if that etcd does not answer."""
    spec = disk.read_lease(volume).election
    return bool(spec) and bool(view(spec, volume).records)


def _nodes_live_or_say(volume: Volume) -> bool:
    """etcd_nodes_live; an etcd that does not answer cannot say, and the user asked
    for the region, so that is taken as no."""
    try:
        return etcd_nodes_live(volume)
    except ElectionUnavailable as exc:
        log.warning("%s; taking it that no node elects through it any more", exc)
        return False


def record_election(election, volume: Volume, epoch: int) -> None:
    """An etcd coordinator took the role: mark the lease region (check_same_election)."""
    if election.spec:
        disk.write_free_lease(volume, epoch, election=election.spec)
        volume.sync()


def claim_slot(election) -> None:
    """Claim the node's slot: ElectionUnavailable when etcd does not answer, OSError
    when every slot is taken."""
    try:
        election.claim_slot()
    except OSError as exc:
        if election.spec:
            from csvfs.cluster.etcd_client import EtcdUnavailable

            if isinstance(exc, EtcdUnavailable):
                raise ElectionUnavailable(f"--election: {exc}") from None
        raise


@dataclass
class View:
    """One look at a volume's election: the lease and every node that has a record."""
    lease: disk.Lease
    records: dict[int, dict]  # slot: record
    alive: set[int]

    def holder_alive(self) -> bool:
        return self.lease.unexpired() and self.lease.owner_slot in self.alive

    def owner(self) -> dict | None:
        return self.records.get(self.lease.owner_slot) if self.holder_alive() else None


def view(spec: str, volume: Volume) -> View:
    """What the election says of `volume` now. ElectionUnavailable if etcd is down."""
    if spec:
        from csvfs.cluster.etcd_client import Etcd, parse_endpoints
        from csvfs.cluster.etcd_election import read_state

        try:
            state = read_state(Etcd(parse_endpoints(spec)), volume.sb.uuid)
        except OSError as exc:
            raise ElectionUnavailable(f"--election {spec}: {exc}") from None
        return View(state.lease, state.slots, set(state.slots))
    records, alive = {}, set()
    for slot in range(fmt.MAX_NODES):
        record = disk.read_slot(volume, slot)
        if record is not None:
            records[slot] = record
            if disk.slot_alive(volume, slot):
                alive.add(slot)
    return View(disk.read_lease(volume), records, alive)
