"""A node: open the volume, win or join the coordinator role, mount and serve.

This issue's cluster has one member, so the node that mounts holds the
coordinator role in-process and talks to the metadata service through
`call()`, the same interface the RPC layer will carry.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from coordinator import recovery
from coordinator.election import Election, read_lease
from coordinator.events import EventLog
from coordinator.service import MetadataService
from csvfs import fuse_fallocate
from csvfs.datapath import DataPath
from csvfs.errors import MountpointError, UserError, VolumeBusyError, VolumeError
from csvfs.fuse_ops import CsvfsOperations
from csvfs.volume import Volume, read_key

log = logging.getLogger(__name__)


@dataclass
class NodeConfig:
    image: Path
    mountpoint: Path
    key_path: Path
    name: str = ""
    lease_seconds: float = 3.0

    def __post_init__(self):
        if not self.name:
            self.name = f"{socket.gethostname()}-{os.getpid()}"


def check_mountpoint(mountpoint: Path) -> None:
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MountpointError(f"mountpoint {mountpoint} is unusable ({exc.strerror}); "
                              f"a dead mount? try 'fusermount3 -u {mountpoint}'") from None
    if not mountpoint.exists():
        raise MountpointError(f"mountpoint {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise MountpointError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountpointError(f"mountpoint {mountpoint} is busy: something is mounted there")


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.volume: Volume | None = None
        self.election: Election | None = None
        self.service: MetadataService | None = None
        self.events: EventLog | None = None
        self.datapath: DataPath | None = None

    # -- start-up, in an order that writes nothing until the input is known good ---------

    def open_volume(self) -> None:
        check_mountpoint(self.config.mountpoint)
        self.volume = Volume.open(self.config.image, writable=True)
        self.volume.check_key(read_key(self.config.key_path))

    def become_coordinator(self) -> None:
        volume = self.volume
        election = self.election = Election(volume, self.config.name, self.config.lease_seconds)
        election.claim_slot()
        with election.lease_lock():
            lease = read_lease(volume)
            if election.live_owner(lease):
                raise VolumeBusyError(
                    f"{self.config.image} is already mounted by node {lease.owner_name} "
                    f"(pid {lease.owner_pid}); several nodes per volume come with the cluster "
                    "release"
                )
            recovered = self._recover()
            epoch = election.take(lease, recovered.last_epoch)
        self.events = EventLog(volume, self.config.name)
        self.events.emit("election", f"{self.config.name} became coordinator, epoch {epoch}")
        if lease.owner_slot >= 0:
            self.events.emit("takeover", f"took over from {lease.owner_name} (pid "
                             f"{lease.owner_pid}, epoch {lease.epoch}): its lease had lapsed",
                             level="warning")
        if volume.used_copy:
            self.events.emit("superblock", "primary superblock unusable; running on its copy "
                             "(csvfs fsck --repair restores it)", level="warning")
        self.service = MetadataService(volume, recovered, epoch, self.events)

    def _recover(self) -> recovery.Recovered:
        try:
            recovered = recovery.load(self.volume)
        except (ValueError, KeyError, TypeError) as exc:
            raise VolumeError(f"{self.config.image}: metadata does not load ({exc}); "
                              "run csvfs fsck") from None
        if recovered.state.damage:
            raise VolumeError(f"{self.config.image}: metadata is inconsistent "
                              f"({recovered.state.damage[0]}); "
                              f"run 'csvfs fsck --repair {self.config.image}'")
        if recovered.replay.corrupt is not None:
            raise VolumeError(f"{self.config.image}: {recovered.replay.corrupt}; "
                              f"run 'csvfs fsck --repair {self.config.image}'")
        for problem in recovered.checkpoint_problems:
            log.warning("%s", problem)
        return recovered

    # -- serving ------------------------------------------------------------------------

    async def serve(self, ready=lambda: None) -> None:
        service = self.service
        name = self.config.name

        async def meta(method: str, **args):
            return await service.call(name, method, args)

        sb = self.volume.sb
        datapath = DataPath(name, self.volume.fd, sb.data.offset, sb.unit_size, meta)
        service.register(datapath)
        service.on_fenced.append(datapath.fence)
        self.datapath = datapath
        datapath.revalidate = self._revalidate_data_path
        self._move_deadlines()
        service.renew_lease = self._renew_now
        await service.start()
        operations = CsvfsOperations(datapath, meta)
        fuse_fallocate.set_handler(operations.fallocate)
        options = set(pyfuse3.default_options)
        options |= {"fsname=csvfs", "subtype=csvfs", "allow_other"}
        try:
            pyfuse3.init(operations, str(self.config.mountpoint), options)
        except RuntimeError as exc:
            raise MountpointError(f"cannot mount on {self.config.mountpoint}: {exc}") from None
        self.events.emit("mount", f"{name} mounted {self.config.mountpoint}")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._renew_lease)
                nursery.start_soon(self._stop_on_signal)
                ready()
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            await self._shut_down()

    async def _renew_lease(self) -> None:
        """Renew several times per lease period; stop committing before the lease can lapse."""
        while not self.service.fenced:
            await trio.sleep(self.config.lease_seconds / 3)
            try:
                self._renew_now()  # fences the node if the lease is someone else's
            except OSError as exc:
                log.warning("cannot renew the coordinator lease: %s", exc)
                # commits and direct I/O stop by themselves once the deadlines pass

    def _renew_now(self) -> bool:
        """Renew the lease; on success move the commit deadline on."""
        if not self.election.renew():
            self.service.fence("another node holds the coordinator lease now")
            return False
        self._move_deadlines()
        return True

    def _revalidate_data_path(self) -> float | None:
        """The data path's deadline after a fresh renewal; None once fenced."""
        return self.datapath.valid_until if self._renew_now() else None

    def _move_deadlines(self) -> None:
        """Commit and do direct I/O only while well inside the lease, so that a stall
        cannot outlive it unnoticed."""
        margin = self.config.lease_seconds * 0.8
        self.service.lease_deadline = trio.current_time() + margin
        self.datapath.valid_until = time.monotonic() + margin



    async def _stop_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("received %s: unmounting", signal.Signals(signum).name)
                pyfuse3.terminate()
                return

    async def _shut_down(self) -> None:
        """Clean unmount: a checkpoint makes the next mount fast, then give up the lease."""
        try:
            if self.service.fenced:
                log.warning("unmounting a fenced node: the volume belongs to another now")
                return  # write nothing at all: not a checkpoint, not an event, not the lease
            await self.service.checkpoint_now()
            self.events.emit("unmount", f"{self.config.name} unmounted cleanly")
            self.election.release()
        except OSError as exc:
            log.error("clean shutdown failed: %s (the next mount replays the journal)", exc)
        finally:
            self.volume.close()

    def close(self) -> None:
        if self.volume is not None:
            self.volume.close()


def run_foreground(config: NodeConfig, ready=lambda: None) -> None:
    node = Node(config)
    try:
        node.open_volume()
        node.become_coordinator()
    except BaseException:
        node.close()
        raise
    trio.run(node.serve, ready)


def mount(config: NodeConfig, foreground: bool) -> None:
    """Mount; unless `foreground`, return once the mount is ready, serving from a child."""
    if foreground:
        run_foreground(config)
        return
    _daemonize_and_run(config)


def _daemonize_and_run(config: NodeConfig) -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        _wait_for_child(read_end)
        return
    os.close(read_end)
    os.setsid()
    reporter = _ReadyReporter(write_end)
    try:
        run_foreground(config, ready=reporter.ready)
    except UserError as exc:
        reporter.fail(exc.exit_code, str(exc))
        os._exit(exc.exit_code)
    except BaseException as exc:  # the parent must always hear back
        log.exception("node failed")
        reporter.fail(1, f"node failed: {exc}")
        os._exit(1)
    os._exit(0)


class _ReadyReporter:
    def __init__(self, fd: int):
        self.fd = fd

    def ready(self) -> None:
        self._send("ok 0 ready")
        _detach_stdio()
        os.chdir("/")  # like any daemon: do not keep the caller's directory busy

    def fail(self, code: int, message: str) -> None:
        self._send(f"err {code} {message}")

    def _send(self, line: str) -> None:
        if self.fd < 0:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1


def _detach_stdio() -> None:
    """Let the shell that ran `csvfs mount` go: the daemon keeps no terminal."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(devnull, target)
    os.close(devnull)


def _wait_for_child(read_end: int) -> None:
    with os.fdopen(read_end, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    status, _, rest = line.partition(" ")
    code, _, message = rest.partition(" ")
    if status == "ok":
        return
    error = UserError(message or "node exited before the mount was ready")
    error.exit_code = int(code) if code.isdigit() else 1
    raise error
