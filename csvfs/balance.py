"""Balancing the coordinator role over the volumes of a cluster, as CSV does.

A cluster is a set of volumes that the same nodes mount, listed in a cluster file
(`csvfs mount --cluster FILE`: one image path per line, relative to the file, `#`
for comments). Who coordinates what is read from each volume's lease region: the
lease names the coordinator, the live node slots the nodes that mount it and
whether their path to the image works. Nothing else keeps that state, so every
node, and `csvfs balance`, sees the same picture.

The rules:

- **Taking over.** A node about to take a free lease first looks at the other
  live nodes of that volume: while one of them coordinates fewer of the cluster's
  volumes than this node does, this node waits (DEFER_STEP per volume of
  difference, at most DEFER_MAX), so that the one with fewer roles takes it. A
  failover is never held up for longer than that.
- **Evening out.** `plan` lists the moves that leave no node coordinating more
  than one volume over another node that mounts that volume with a working path.
  Each coordinator looks every BALANCE_INTERVAL and makes the first move of the
  plan if it is its own; every process computes the same plan from the same
  lease regions, so one move happens at a time. `csvfs balance IMAGE...` makes
  the whole plan at once and prints it.
- **Choosing an heir** (`csvfs move` without --to, or a coordinator whose path
  failed): the node with the fewest roles, ties broken by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from csvfs.cluster import elections
from csvfs.volume.errors import UsageError, VolumeError
from csvfs.volume.image import Volume

log = logging.getLogger(__name__)

BALANCE_INTERVAL = 1.0  # seconds between a coordinator's looks at the balance
DEFER_STEP = 0.2  # a takeover waits this long per role more than another candidate has
DEFER_MAX = 0.6


@dataclass
class VolumeRoles:
    """One volume as the lease region shows it."""

    image: str  # resolved path: the volume's name in a plan
    coordinator: str | None
    nodes: list[str] = field(default_factory=list)  # live nodes that mount it
    able: list[str] = field(default_factory=list)  # those of them whose path works


@dataclass(frozen=True)
class Move:
    image: str
    source: str
    target: str


def read_cluster_file(path: Path) -> list[Path]:
    """The volume images a cluster file lists."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--cluster {path}: {exc.strerror}") from None
    images = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            images.append((path.parent / line).resolve())
    if not images:
        raise UsageError(f"--cluster {path}: lists no volume")
    return images


def read_volume(image: Path, election: str = "") -> VolumeRoles:
    volume = Volume.open(image)
    try:
        view = elections.view(election, volume)
        coordinator = view.lease.owner_name if view.holder_alive() else None
        roles = VolumeRoles(str(Path(image).resolve()), coordinator)
        for slot in sorted(view.alive):
            record = view.records.get(slot) or {}
            name = record.get("name")
            if not name or record.get("mode") == "stopped":
                continue
            roles.nodes.append(name)
            if record.get("mode") != "redirected":
                roles.able.append(name)
    finally:
        volume.close()
    return roles


def read_cluster(images: list[Path], election: str = "") -> list[VolumeRoles]:
    """Every volume of the cluster that can be read; one that cannot counts as none."""
    volumes = []
    for image in images:
        try:
            volumes.append(read_volume(image, election))
        except (OSError, VolumeError) as exc:
            log.info("cannot read %s for the balance: %s", image, exc)
    return volumes


def role_counts(volumes: list[VolumeRoles]) -> dict[str, int]:
    """How many volumes each node coordinates, for every node that mounts one."""
    counts = {name: 0 for volume in volumes for name in volume.nodes}
    for volume in volumes:
        if volume.coordinator is not None:
            counts[volume.coordinator] = counts.get(volume.coordinator, 0) + 1
    return counts


def best_heir(volumes: list[VolumeRoles], candidates: list[str]) -> str | None:
    """Of `candidates`, the node with the fewest roles (ties: by name)."""
    counts = role_counts(volumes)
    return min(candidates, key=lambda name: (counts.get(name, 0), name), default=None)


def takeover_delay(volumes: list[VolumeRoles], image: str, me: str) -> float:
    """How long `me` waits before taking the free lease of `image`."""
    counts = role_counts(volumes)
    volume = next((v for v in volumes if v.image == image), None)
    others = [counts.get(name, 0) for name in (volume.able if volume else []) if name != me]
    if not others:
        return 0.0
    surplus = counts.get(me, 0) - min(others)
    return min(DEFER_MAX, surplus * DEFER_STEP) if surplus > 0 else 0.0


def plan(volumes: list[VolumeRoles]) -> list[Move]:
    """The moves, in order, that even the roles out."""
    counts = role_counts(volumes)
    coordinators = {volume.image: volume.coordinator for volume in volumes}
    moves = []
    while True:
        move = _widest_gap(volumes, coordinators, counts)
        if move is None:
            return moves
        moves.append(move)
        counts[move.source] -= 1
        counts[move.target] += 1
        coordinators[move.image] = move.target


def _widest_gap(volumes, coordinators, counts) -> Move | None:
    """The move across the widest gap (of at least 2 roles); ties: the first image."""
    best, best_gap = None, 1
    for volume in sorted(volumes, key=lambda v: v.image):
        source = coordinators[volume.image]
        targets = [name for name in volume.able if name != source]
        if source is None or not targets:
            continue
        target = min(targets, key=lambda name: (counts[name], name))
        gap = counts[source] - counts[target]
        if gap > best_gap:
            best, best_gap = Move(volume.image, source, target), gap
    return best
