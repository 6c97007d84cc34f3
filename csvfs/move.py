"""Moving the coordinator role, the coordinator's side: `csvfs move`, a coordinator
whose own path to the image failed, and the balance of roles over a cluster's
volumes (csvfs/balance.py has the rules).

The whole sequence:

1. The heir is the member named, or the best one: in session, its path to the
   image working, coordinating the fewest of the cluster's volumes.
2. The coordinator takes its metadata lock, so no change comes after this
   point, waits for what is committing, and writes a checkpoint: the heir has
   nothing to replay.
3. It frees the lease for the heir alone, for one lease period
   (csvfs/cluster/election.py `hand_over`), records the move in the event ring,
   and fences its service, which closes every session.
4. Every member, this node among them, looks for the coordinator again
   (csvfs/membership.py): the lease is free but kept for the heir, so they wait
   for it. The heir takes it with the next epoch and recovers from the
   checkpoint; the others join it and register their open files and locks.
   Applications see a pause and no error, as in a failover.

The invariant: between the checkpoint and the heir's first record nobody
commits anything, and no two nodes ever hold the role in one epoch (the old
coordinator fences itself before it releases the lock, and a lease kept for an
heir is taken by no one else until it runs out).
"""

from __future__ import annotations

import errno
import logging
import time

import trio

from csvfs import balance
from csvfs.cluster.errors import MetaError, NotCoordinator

log = logging.getLogger(__name__)


async def hand_over(role, heir: str, reason: str) -> dict:
    """Steps 1 to 3 on the CoordinatorRole `role`; {from, to, epoch}."""
    service = role.service
    if service is None:
        raise NotCoordinator("this node stepped down")
    name, slot = choose_heir(role, heir)
    started = time.monotonic()
    async with service.commits.lock:
        await service.commits.durable()
        await service.commits.checkpoint()
        if not await role.election.hand_over(slot):
            raise NotCoordinator("the coordinator lease is not ours any more")
        role.events.emit("move", f"coordinator role moves from {role.name} to {name} "
                         f"({reason})")
        service.commits.fence(f"the coordinator role moved to {name}")
    log.info("handed the coordinator role to %s in %.1f ms", name,
             (time.monotonic() - started) * 1e3)
    return {"from": role.name, "to": name, "epoch": service.epoch}


def choose_heir(role, wanted: str) -> tuple[str, int]:
    """(name, slot) of the member to hand the role to: `wanted`, or the best one."""
    sessions = role.endpoint.sessions if role.endpoint else {}
    if wanted == role.name:
        raise MetaError(errno.EALREADY, f"{role.name} is the coordinator already")
    if wanted:
        session = sessions.get(wanted)
        if session is None:
            raise MetaError(errno.ENOENT, f"no node named {wanted} is in session")
        if _path_lost(role.service, wanted):
            raise MetaError(errno.EHOSTUNREACH, f"{wanted} has lost its path to the image "
                                                "and cannot coordinate")
        return wanted, session.slot
    able = sorted(name for name in sessions if not _path_lost(role.service, name))
    if not able:
        raise MetaError(errno.EHOSTUNREACH, "no other node with a working path to the "
                                            "image is in session")
    volumes = balance.read_cluster(role.cluster, role.election.spec)
    best = balance.best_heir(volumes, able) or able[0]
    return best, sessions[best].slot


def _path_lost(service, node: str) -> bool:
    """Did the node report its path to the image lost (not redirected on request)?"""
    mode = service.redirect.modes.get(node) if service else None
    return bool(mode) and mode.get("path_lost", False)


async def keep_balance(role, service) -> None:
    """Every BALANCE_INTERVAL, make the first move of the cluster's balance plan when it
    is this coordinator's; every coordinator computes the same plan."""
    image = str(role.volume.path.resolve())
    while service is role.service and not service.fenced:
        await trio.sleep(balance.BALANCE_INTERVAL)
        volumes = await trio.to_thread.run_sync(balance.read_cluster, role.cluster,
                                                role.election.spec)
        moves = balance.plan(volumes)
        if not moves or moves[0].image != image or moves[0].source != role.name:
            continue
        target = moves[0].target
        if service is not role.service or role.endpoint is None:
            return
        if target not in role.endpoint.sessions:
            continue
        try:
            await hand_over(role, target, "balancing the cluster's coordinators")
        except MetaError as exc:
            log.info("balance: not moving to %s: %s", target, exc)
