"""Partitions, the coordinator's side: members it cannot hear, and a coordinator cut
off from the others.

The whole sequence:

1. A member cut off from the coordinator stops renewing its grant. Once the grant
   runs out it does no direct I/O (csvfs/datapath.py); its applications wait for a
   coordinator, up to the node's `--io-timeout`, and then get EIO
   (csvfs/membership.py). It keeps looking for the coordinator, and when the link
   heals it joins and registers its open files and locks again.
2. The coordinator looks every quarter grant: a member silent for SILENT_GRANTS
   grants is evicted (coordinator/endpoint.py `evict_silent`), its open files
   counted no more, and the event ring says so.
3. The rule for a coordinator cut off from the others: it keeps the role while it
   hears from at least half of the other live nodes (rounded down), so that with
   the members it hears it is a majority, or at least half. Otherwise, having been
   coordinator for longer than SILENT_GRANTS grants, it steps down: a checkpoint,
   the lease freed, the service fenced. The nodes on the other side take the free
   lease (the disk lease and its epochs still decide: never two coordinators in one
   epoch), and this node stays out of the election for STAY_OUT leases, waiting to
   join whoever coordinates now (its applications wait, then get EIO).
   With two nodes, half of one is none: the coordinator always keeps the role, and
   the cut-off member waits.

No acknowledged write is lost either way: a member writes only inside its grant,
every metadata change is durable before it is acknowledged, and a new coordinator
starts from the journal.
"""

from __future__ import annotations

import logging

import trio

from coordinator.endpoint import SILENT_GRANTS
from csvfs.cluster.errors import MetaError

log = logging.getLogger(__name__)

STAY_OUT = 3  # leases a coordinator that stepped down, cut off, leaves to the others


async def watch_members(role, service) -> None:
    """Steps 2 and 3 for the CoordinatorRole `role`, for as long as it serves."""
    started = trio.current_time()
    interval = role.lease_seconds / 4
    while service is role.service and not service.fenced:
        await trio.sleep(interval)
        endpoint = role.endpoint
        if endpoint is None or service is not role.service:
            return
        endpoint.evict_silent()
        settled = trio.current_time() - started > SILENT_GRANTS * role.lease_seconds
        if settled and _cut_off(role, len(endpoint.sessions)):
            await step_down(role, service)
            return


def _cut_off(role, heard: int) -> bool:
    others = len(role.other_node_names())
    return heard < others // 2


async def step_down(role, service) -> None:
    """Give the role up: checkpoint, free the lease, fence (step 3)."""
    others = ", ".join(role.other_node_names())
    role.cut_off = True
    try:
        async with service.commits.lock:
            await service.commits.durable()
            await service.commits.checkpoint()
            role.events.emit("partition", f"{role.name} hears from too few of the other "
                             f"nodes ({others}) and steps down", level="warning")
            await role.election.release()
            service.commits.fence("cut off from the other nodes")
    except (MetaError, OSError) as exc:  # its lease runs out instead
        log.warning("stepping down: %s", exc)
        service.commits.fence(f"cut off from the other nodes ({exc})")
