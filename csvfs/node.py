"""A node: open the volume, win or join the coordinator role, mount and serve.

Start-up checks the mountpoint, the volume and the key before writing
anything; then the node claims a slot in the lease region, opens its RPC
listener (every node has one: whoever becomes coordinator serves on it) and
settles its role (csvfs/membership.py) before the mount appears.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from csvfs import fuse_shim
from csvfs.cluster import elections
from csvfs.cluster.errors import MetaError, NotCoordinator
from csvfs.cluster.rpc_server import RpcServer
from csvfs.cluster.transport import join_address, split_address, split_advertised
from csvfs.datapath import DataPath
from csvfs.fuse_ops import REFUSED_RELEASE_REPLIES, CsvfsOperations
from csvfs.locks import NodeLocks
from csvfs.membership import Membership
from csvfs.quiesce import FileGates
from csvfs.redirect import PROBE_INTERVAL
from csvfs.volume.errors import MountpointError, UsageError, UserError, VolumeBusyError
from csvfs.volume.image import Volume, read_key
from csvfs.watchdog import LoopWatchdog
from csvfs.writers import Writers

log = logging.getLogger(__name__)


DEFAULT_IO_THREADS = 4  # with O_DIRECT (--io-threads)


@dataclass
class NodeConfig:
    image: Path
    mountpoint: Path
    key_path: Path
    name: str  # the CLI makes it HOST-PID when --name is not given
    lease_seconds: float = 3.0
    listen_text: str = "127.0.0.1:0"  # where the RPC server listens; port 0: any free one
    advertise_text: str = ""  # where other nodes reach it, if not there: HOST[:PORT]
    cluster: list[Path] = field(default_factory=list)  # its volumes (csvfs/balance.py)
    io_timeout: float = 60.0  # how long I/O waits for a coordinator, then EIO
    direct_io: bool | None = None  # O_DIRECT; None: for a block device only
    io_threads: int | None = None  # the fast lane's workers; None: by direct_io
    election: str = ""  # "": the lease region; etcd://...: etcd (csvfs/cluster/elections.py)
    disk_election_asked: bool = False  # --election disk: the region, though etcd marked it

    @property
    def listen(self) -> tuple[str, int]:
        return split_address(self.listen_text)

    def advertised(self, bound_port: int) -> str | None:
        """The address to publish, if --advertise gave one; its port defaults to ours."""
        if not self.advertise_text:
            return None
        host, port = split_advertised(self.advertise_text)
        return join_address(host, port or bound_port)


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
        self.election = None  # csvfs/cluster/elections.py
        self.key = b""
        self.datapath: DataPath | None = None
        self.lane: fuse_shim.FastLane | None = None
        self.gates: FileGates | None = None
        self.locks: NodeLocks | None = None
        self.membership: Membership | None = None
        self.operations: CsvfsOperations | None = None  # once mounted

    # -- start-up, in an order that writes nothing until the input is known good ---------

    def open_volume(self) -> None:
        check_mountpoint(self.config.mountpoint)
        self.volume = Volume.open(self.config.image, writable=True,
                                  direct_io=self.config.direct_io)
        self.key = read_key(self.config.key_path)
        self.volume.check_key(self.key)
        elections.check_same_election(self.config.election, self.volume,
                                      self.config.disk_election_asked)
        self.election = elections.make_election(self.config.election, self.volume,
                                                self.config.name, self.config.lease_seconds)
        try:
            elections.claim_slot(self.election)
        except OSError as exc:
            raise VolumeBusyError(f"{self.config.image}: {exc}") from None
        self._check_name_free()

    def _check_name_free(self) -> None:
        """Node names identify sessions: two live nodes must not share one."""
        for slot, record in self.election.live_records().items():
            if slot == self.election.slot:
                continue
            if record and record.get("name") == self.config.name:
                raise VolumeBusyError(
                    f"{self.config.image} is already mounted by a node named "
                    f"{self.config.name} (pid {record.get('pid')}); choose another --name")

    # -- serving ------------------------------------------------------------------------

    async def serve(self, ready=lambda: None) -> None:
        config = self.config
        server = RpcServer(self.key, self._handle_rpc, *config.listen,
                           on_disconnect=self._peer_gone)
        try:
            bound = await server.bind()
        except OSError as exc:
            raise UsageError(f"cannot listen on {config.listen_text}: {exc.strerror}") from None
        self.election.address = config.advertised(server.port) or bound
        sb = self.volume.sb
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            nursery.start_soon(self.election.run)
            nursery.start_soon(LoopWatchdog().run)
            self.lane = fuse_shim.fast_lane(self.volume.fd, sb.data.offset, self.volume.sector,
                                            self._lane_threads())
            self.datapath = DataPath(self.volume.fd, sb.data.offset, sb.unit_size, self._meta,
                                     self._revalidate, (self.volume.pread, self.volume.pwrite),
                                     self.lane)
            self.gates = FileGates(config.name, self.datapath, self._forget_in_kernel)
            mode_changed = trio.Event()
            self.datapath.storage.on_change = mode_changed.set
            nursery.start_soon(self._report_io_mode, mode_changed)
            nursery.start_soon(self._probe_storage)
            writers = self.gates.snapshot.writers = Writers(config.mountpoint)
            self.gates.snapshot.nursery = nursery
            nursery.start_soon(writers.serve)
            self.locks = NodeLocks(config.name, self._meta)
            self.gates.on_locks_changed = self.locks.changed
            self.membership = Membership(config.name, self.volume, self.election, self.key,
                                         config.lease_seconds, self.gates, self.datapath,
                                         nursery, self.locks, config.cluster,
                                         config.io_timeout)
            await self.membership.start()
            await self._mount_and_serve(ready)
            nursery.cancel_scope.cancel()
        self.close()

    # -- redirected I/O (csvfs/redirect.py) -----------------------------------------------

    async def _report_io_mode(self, changed: trio.Event) -> None:
        """Tell the coordinator each new I/O mode, the latest one if several came."""
        storage = self.datapath.storage
        while True:
            await changed.wait()
            changed = trio.Event()
            storage.on_change = changed.set
            self.election.io_mode = storage.mode
            try:
                await self._meta("io_mode", **storage.state())
            except (MetaError, OSError) as exc:
                log.warning("cannot report the I/O mode to the coordinator: %s", exc)
            if storage.lost:
                await self.membership.hand_over(f"{self.config.name}'s storage path was lost")

    async def _probe_storage(self) -> None:
        """While the path is lost, try it now and then; Direct again once it works."""
        storage = self.datapath.storage
        while True:
            await trio.sleep(PROBE_INTERVAL)
            if storage.lost and await trio.to_thread.run_sync(storage.probe):
                storage.probed()

    # The data path, the FUSE operations and the protocols reach the node's other
    # parts through these, which exist before those parts do.

    async def _meta(self, method: str, **args):
        return await self.membership.meta(method, **args)

    async def _revalidate(self) -> float | None:
        return await self.membership.revalidate()

    def _endpoint(self):
        """The coordinator's endpoint, if this node is the coordinator."""
        return self.membership.endpoint if self.membership is not None else None

    async def _handle_rpc(self, peer, method: str, args: dict):
        """The RPC server's handler: only the coordinator answers."""
        endpoint = self._endpoint()
        if endpoint is None:
            raise NotCoordinator("this node is not the coordinator")
        return await endpoint.handle(peer, method, args)

    def _peer_gone(self, peer) -> None:
        endpoint = self._endpoint()
        if endpoint is not None:
            endpoint.disconnected(peer)

    async def _forget_in_kernel(self, stale: dict) -> None:
        """Only once mounted: before that the kernel caches nothing of ours."""
        if self.operations is not None:
            await _forget_in_kernel(self.operations, stale)

    async def _mount_and_serve(self, ready) -> None:
        operations = CsvfsOperations(self.datapath, self.gates, self._meta, self._forget_later,
                                     self.locks)
        logging.getLogger("pyfuse3").addFilter(REFUSED_RELEASE_REPLIES)
        fuse_shim.set_handler("fallocate", operations.fallocate)
        for op, handler in (("setlk", operations.setlk), ("getlk", operations.getlk),
                            ("flush", operations.flush_locks)):
            fuse_shim.set_handler(op, handler)
        options = set(pyfuse3.default_options)
        options |= {"fsname=csvfs", "subtype=csvfs", "allow_other"}
        try:
            pyfuse3.init(operations, str(self.config.mountpoint), options)
        except RuntimeError as exc:
            await self.membership.close()
            raise MountpointError(f"cannot mount on {self.config.mountpoint}: {exc}") from None
        if not fuse_shim.active():
            log.warning("the FUSE shim (csvfs/_fuse_shim.so) is not loaded, so fallocate is "
                        "unsupported and a killed application can stall this node: run "
                        "make setup")
        self.operations = operations  # only now that there is a kernel to tell
        role = self.membership.role
        log.info("%s mounted %s (%s)", self.config.name, self.config.mountpoint,
                 role.kind if role is not None else "electing")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_signal)
                if self.lane is not None:
                    nursery.start_soon(self.lane.serve_returned, operations.read,
                                       operations.write, operations.fsync)
                ready()
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            with trio.CancelScope(shield=True):
                await self.membership.close()

    def _forget_later(self, inos: list[int]) -> None:
        """Drop kernel attributes soon, outside the FUSE handler that asks."""
        self.membership.nursery.start_soon(self._forget_in_kernel, {
            "inos": inos, "entries": [], "released": True})

    async def _stop_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("received %s: unmounting", signal.Signals(signum).name)
                self.locks.close()  # processes waiting for a lock must not hold the unmount
                pyfuse3.terminate()
                return

    def _lane_threads(self) -> int:
        """Workers pay off where a request waits for a device (O_DIRECT); through the
        page cache, handing a request to a thread costs more than doing it
        (scripts/bench.py --only vm measures both)."""
        if self.config.io_threads is not None:
            return self.config.io_threads
        return DEFAULT_IO_THREADS if self.volume.direct else 0

    def close(self) -> None:
        if self.datapath is not None and self.volume is not None and self.volume.fd >= 0:
            lane = self.datapath.lane
            lane.stop()  # before its image fd closes
            log.info("fast lane: %d reads and %d writes answered, %d handed to Python, "
                     "%d of them after failing; %d fdatasyncs answered", *lane.counts())
            if self.operations is not None:
                log.info("directory listings: %d lookups answered here",
                         self.operations.listings.answered)
        if self.volume is not None:
            self.volume.close()


async def _forget_in_kernel(operations: CsvfsOperations, stale: dict) -> None:
    """Drop cached directory attributes and names. Never called from inside a FUSE
    handler: only for changes other nodes made, from RPC tasks."""
    operations.drop_stale(stale)
    for ino in stale["inos"]:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)  # never blocks without writeback
        except OSError:
            pass  # the kernel does not know the inode: nothing cached
    if stale["entries"]:
        # This one locks the parent directory in the kernel, and a request of ours that
        # holds that lock may be waiting for the coordinator: never block trio on it.
        await trio.to_thread.run_sync(_forget_entries, stale["entries"])


def _forget_entries(entries: list) -> None:
    for parent, name in entries:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError:
            pass  # not cached


def run_foreground(config: NodeConfig, ready=lambda: None) -> None:
    node = Node(config)
    try:
        node.open_volume()
        trio.run(node.serve, ready)
    except BaseExceptionGroup as group:  # a nursery wraps what start-up raised
        raise _single(group) from None
    finally:
        node.close()


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside nested groups, or the group itself."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]
    return group


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
