"""Helpers that the scripts and the tests share: the mount table, /proc, the csvfs
command line, and starting and stopping the processes that serve a mount.

Scripts run as `python scripts/x.py` import it as `from nodes import ...` (their own
directory is on sys.path); tests import it as `from scripts.nodes import ...` (pytest
puts the repository root on sys.path). It imports only the standard library, and csvfs
not at all: scripts sometimes run outside the venv, and a node is a process of its own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FUSERMOUNT_TIMEOUT = 30.0
CSVFS_TIMEOUT = 60.0  # for `csvfs status` and `csvfs events`
ERROR_LINES = 5  # of a process's output, in the error that says why it did not mount


class NodeError(Exception):
    """A helper could not do what it was asked; the message is one line for the user."""


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll predicate until it holds (True) or timeout seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


# -- the mount table ----------------------------------------------------------------------


def _unescape_mount_field(text: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes
    for code in ("\\040", "\\011", "\\012", "\\134"):
        text = text.replace(code, chr(int(code[1:], 8)))
    return text


def mountpoints() -> list[str]:
    """Every mountpoint in this mount namespace, as the kernel spells it (resolved)."""
    with open("/proc/mounts") as mounts:
        return [_unescape_mount_field(line.split()[1]) for line in mounts if line.strip()]


def resolved(path: str | os.PathLike) -> str:
    """path with its symlinks resolved, as os.path.realpath does, but without a stat of
    path itself: if a FUSE mount sits there, the stat would wait for its server, which may
    be stopped (SIGSTOP) or hung. readlink does not ask the server."""
    path = os.path.abspath(path)
    for _ in range(40):  # as many links as the kernel follows
        parent, name = os.path.split(path)
        parent = os.path.realpath(parent)
        path = os.path.join(parent, name)
        try:
            target = os.readlink(path)
        except OSError:  # not a link, or not there
            return path
        path = os.path.normpath(os.path.join(parent, target))
    return path


def is_mounted(path: str | os.PathLike) -> bool:
    """Something is mounted at path; path may be reached through symlinks. Never waits
    for a FUSE server, not even a stopped one."""
    return resolved(path) in mountpoints()


def mounts_under(directory: str | os.PathLike) -> list[str]:
    """Mountpoints at or below directory, spelled from directory as the caller gave it
    (not resolved), so that they compare with paths the caller built from it."""
    given, real = os.fspath(directory), resolved(directory)
    found = []
    for mountpoint in mountpoints():
        if mountpoint == real or mountpoint.startswith(real.rstrip("/") + "/"):
            relative = os.path.relpath(mountpoint, real)
            found.append(given if relative == "." else os.path.join(given, relative))
    return found


def fusermount(mountpoint: str | os.PathLike, lazy: bool = False) -> str:
    """fusermount3 -u (-z if lazy); returns "" or fusermount3's one-line complaint."""
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), os.fspath(mountpoint)]
    try:
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=FUSERMOUNT_TIMEOUT, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return "fusermount3 is not installed"
    except subprocess.TimeoutExpired:
        return f"fusermount3 did not finish within {FUSERMOUNT_TIMEOUT:.0f} s"
    if result.returncode == 0:
        return ""
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"fusermount3 exited {result.returncode}"


def force_unmount(mountpoint: str | os.PathLike, timeout: float = 15.0) -> str:
    """Detach whatever is mounted at mountpoint (fusermount3 -u -z), even a dead mount
    whose server is gone, and wait until the mount table no longer shows it. Returns ""
    or why it is still there."""
    if not is_mounted(mountpoint):
        return ""
    complaint = fusermount(mountpoint, lazy=True)
    if not wait_until(lambda: not is_mounted(mountpoint), timeout):
        return complaint or f"still mounted {timeout:.0f} s after fusermount3 -u -z"
    return ""


# -- /proc --------------------------------------------------------------------------------


def proc_stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (the state first, utime at
    [11], stime at [12]), or [] if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # the command name is in parentheses and may itself hold ") " or spaces
            return stat.read().rpartition(")")[2].split()
    except OSError:
        return []


def process_state(pid: int | str) -> str | None:
    """The state letter of pid (R, S, D, T, Z ...), or None if there is no such process."""
    fields = proc_stat(pid)
    return fields[0] if fields else None


def pid_alive(pid: int) -> bool:
    """pid exists and has not exited. A zombie has: it only waits for a parent to reap
    it, which for a daemon may never happen."""
    return pid > 0 and process_state(pid) not in (None, "Z", "X")


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time the processes have used so far (0 for one that is gone)."""
    ticks = 0
    for pid in pids:
        fields = proc_stat(pid)
        if fields:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int | str) -> list[str]:
    """The argv of pid; [] if it is gone or a zombie (the kernel keeps no argv for those)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as argv:
            raw = argv.read()
    except OSError:
        return []
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]]


def is_process_of(pid: int, words: Iterable[str]) -> bool:
    """pid is alive and every one of words is an argument of it: the process we mean, not
    one that reused its pid."""
    argv = cmdline(pid) if pid_alive(pid) else []
    return bool(argv) and all(os.fspath(word) in argv for word in words)


def other_pids() -> list[int]:
    """Every process in /proc but this one."""
    return [int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and int(entry) != os.getpid()]


def processes_naming(paths: Iterable[str | os.PathLike], below: bool = False) -> set[int]:
    """Processes other than this one with one of paths (as given, or resolved) as an
    argument; with below=True, also with an argument inside one of them. Zombies have no
    argv and never match."""
    paths = [os.fspath(path) for path in paths]
    wanted = set(paths) | {resolved(path) for path in paths}
    prefixes = tuple(path.rstrip("/") + "/" for path in wanted) if below else ()

    def names_one(arg: str) -> bool:
        return arg in wanted or (below and arg.startswith(prefixes))

    return {pid for pid in other_pids() if any(map(names_one, cmdline(pid)))}


def fds_open_on(pid: int | str, target: str) -> list[int]:
    """pid's file descriptors that are open on target (such as "/dev/fuse"); pid may be
    "self". Only readlink: a stat of a file on a stopped FUSE mount would wait."""
    found = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    found.append(int(fd))
    return sorted(found)


def fd_flags(pid: int | str, fd: int) -> int:
    """The open flags (os.O_*) of pid's descriptor fd."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as info:
        return int(next(line.split()[1] for line in info if line.startswith("flags:")), 8)


# -- the csvfs command line ---------------------------------------------------------------


def csvfs_command() -> list[str]:
    """How to run csvfs: this interpreter if it has the package, else the repository's
    .venv, else csvfs on PATH."""
    if importlib.util.find_spec("csvfs") is not None:
        return [sys.executable, "-m", "csvfs.cli"]
    venv_python = REPO / ".venv" / "bin" / "python"
    if venv_python.exists():
        return [os.fspath(venv_python), "-m", "csvfs.cli"]
    found = shutil.which("csvfs")
    if found:
        return [found]
    raise NodeError("csvfs is not installed: run `make setup`, then use .venv/bin/python")


def _run_csvfs(args: Sequence, csvfs: Sequence[str] | None,
               timeout: float) -> subprocess.CompletedProcess:
    command = [*(csvfs or csvfs_command()), *map(os.fspath, args)]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise NodeError(f"csvfs {args[0]} did not finish within {timeout:.0f} s") from None


def _failure(result: subprocess.CompletedProcess, what: str) -> NodeError:
    lines = result.stderr.strip().splitlines()
    return NodeError(f"csvfs {what} exited {result.returncode}"
                     + (f": {lines[-1]}" if lines else ""))


def status_json(image: str | os.PathLike, key: str | os.PathLike | None = None, *,
                csvfs: Sequence[str] | None = None, timeout: float = CSVFS_TIMEOUT) -> dict:
    """`csvfs status IMAGE --json` as a dict. The JSON comes even when it exits 15 (the
    coordinator did not answer); then its "error" says so. NodeError if there is none."""
    args = ["status", image, "--json", *(["--key", key] if key is not None else [])]
    result = _run_csvfs(args, csvfs, timeout)
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise _failure(result, "status") from None


def events_json(image: str | os.PathLike, *, csvfs: Sequence[str] | None = None,
                timeout: float = CSVFS_TIMEOUT) -> list[dict]:
    """The volume's event ring (`csvfs events IMAGE --json`), oldest first."""
    result = _run_csvfs(["events", image, "--json"], csvfs, timeout)
    if result.returncode != 0:
        raise _failure(result, "events")
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def csvfs_mount_command(image: str | os.PathLike, mountpoint: str | os.PathLike,
                        *options: str | os.PathLike,
                        csvfs: Sequence[str] | None = None) -> list[str]:
    """The argv of a node serving mountpoint in the foreground: `csvfs mount IMAGE
    MOUNTPOINT --foreground OPTIONS...` (such as --name N, --log FILE, --lease S)."""
    return [*(csvfs or csvfs_command()), "mount", os.fspath(image), os.fspath(mountpoint),
            "--foreground", *map(os.fspath, options)]


# -- stopping a node ----------------------------------------------------------------------


@dataclass(frozen=True)
class Waits:
    """How long stopping a node waits for it to exit after each step, in seconds."""

    unmount: float = 15.0  # after fusermount3 -u: a coordinator writes a checkpoint first
    term: float = 10.0  # after SIGTERM
    kill: float = 5.0  # after SIGKILL


def _stop(mountpoint: str | os.PathLike | None, running: Callable[[], bool],
          send: Callable[[int], None], waits: Waits) -> tuple[bool, str]:
    """The one way a node is stopped, gently first; returns (stopped, what was done).

    A clean unmount lets a coordinator write its checkpoint and hand the lease over; a
    node that does not exit then gets SIGTERM (the same clean stop, asked differently),
    then SIGKILL. A node that died leaves a dead mount, which is detached lazily. running
    and send must never touch a process that is not the node (a reused pid).
    """
    steps: list[str] = []
    was_running = running()
    mounted = mountpoint is not None and is_mounted(mountpoint)
    if not was_running and not mounted:
        return True, "was not running"
    if not was_running:
        steps.append("had already exited")
    elif mounted:
        send(signal.SIGCONT)  # a stopped node could not answer the unmount
        complaint = fusermount(mountpoint)
        if complaint:
            steps.append(f"fusermount3 -u failed ({complaint})")
        else:
            steps.append("unmounted")
            if not wait_until(lambda: not running(), waits.unmount):
                steps.append(f"still running after {waits.unmount:.0f} s")
    if running():
        send(signal.SIGCONT)
        send(signal.SIGTERM)
        steps.append("SIGTERM")
        if not wait_until(lambda: not running(), waits.term):
            steps.append(f"still running after {waits.term:.0f} s")
            if mountpoint is not None:
                fusermount(mountpoint, lazy=True)
            send(signal.SIGKILL)
            steps.append("fusermount3 -u -z, SIGKILL" if mountpoint is not None else "SIGKILL")
            wait_until(lambda: not running(), waits.kill)
    if mountpoint is not None and is_mounted(mountpoint):  # a node that died leaves it
        complaint = fusermount(mountpoint, lazy=True)
        steps.append("fusermount3 -u -z on its dead mount"
                     + (f" failed ({complaint})" if complaint else ""))
    stopped = not running() and (mountpoint is None or not is_mounted(mountpoint))
    if not stopped:
        steps.append("WOULD NOT STOP")
    elif was_running:
        steps.append("exited")
    return stopped, ", ".join(steps)


def stop_daemon(pid: int, mountpoint: str | os.PathLike | None, *,
                argv: Iterable[str] | None = None, waits: Waits = Waits()) -> tuple[bool, str]:
    """Stop a node that is not our child (`csvfs mount` without --foreground) by its
    pid, and detach its mount; returns (stopped, what was done).

    pid is signalled only while its argv holds every word of argv (by default "mount"
    and mountpoint): a pid that was reused by another process is left alone. pid 0 (not
    known) or mountpoint None (not known) skip that half.
    """
    words = list(argv) if argv is not None else ["mount", os.fspath(mountpoint or "")]

    def running() -> bool:
        return is_process_of(pid, words)

    def send(signum: int) -> None:
        if running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    return _stop(mountpoint, running, send, waits)


class MountProcess:
    """A child process that serves one FUSE mount in the foreground: a csvfs node
    (`csvfs mount --foreground`, see csvfs_mount_command) or another FUSE server such as
    scripts/passthrough.py.

    Its stdout and stderr go to output (appended) if given; otherwise stdout is dropped
    and stderr kept in a pipe, for the error if it does not mount. stop() never leaves
    the process or its mount behind.
    """

    def __init__(self, command: Sequence[str | os.PathLike], mountpoint: str | os.PathLike,
                 *, label: str, output: str | os.PathLike | None = None,
                 log: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                 new_session: bool = False, waits: Waits = Waits()):
        self.command = [os.fspath(arg) for arg in command]
        self.mountpoint = Path(mountpoint)
        self.label = label  # what messages call it, such as "node n1"
        self.output = output
        self.log_path = log  # the node's own log, for the error if it does not mount
        self.env = {**os.environ, **(env or {})}
        self.new_session = new_session  # so a Ctrl-C at the terminal reaches only us
        self.waits = waits
        self.process: subprocess.Popen | None = None

    @classmethod
    def csvfs_node(cls, image: str | os.PathLike, mountpoint: str | os.PathLike, name: str,
                   log: str | os.PathLike, *options: str | os.PathLike,
                   csvfs: Sequence[str] | None = None, **settings) -> MountProcess:
        """A csvfs node called name, logging to log; options go to `csvfs mount`."""
        command = csvfs_mount_command(image, mountpoint, "--name", name, "--log", log,
                                      *options, csvfs=csvfs)
        return cls(command, mountpoint, label=f"node {name}", log=log, **settings)

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout: float = 20.0) -> MountProcess:
        """Start the server and wait until its mount shows. If it exits first or takes
        longer than timeout, it is stopped and NodeError says why, with the end of its
        output."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        output = open(self.output, "ab") if self.output is not None else None
        try:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdin=subprocess.DEVNULL,
                stdout=output or subprocess.DEVNULL, stderr=output or subprocess.PIPE,
                start_new_session=self.new_session)
        finally:
            if output is not None:
                output.close()  # the child has its own copy
        if not wait_until(lambda: self.process.poll() is not None or
                          is_mounted(self.mountpoint), timeout, interval=0.02):
            raise self._failed(f"{self.label} did not mount within {timeout:g} s")
        if not is_mounted(self.mountpoint):
            raise self._failed(f"{self.label} exited {self.process.returncode}")
        return self

    def _failed(self, why: str) -> NodeError:
        """Stop what is left of a start that failed; the error, with the server's last
        words (only once it has exited can its stderr be read to the end)."""
        self._stop_server()
        error = NodeError(why + self._last_words(": "))
        self._close_pipe()
        return error

    def _last_words(self, prefix: str) -> str:
        """The last lines of what the server wrote (its stderr or output, else its log)."""
        text = ""
        pipe = self.process.stderr
        if pipe is not None and not pipe.closed and self.process.poll() is not None:
            text = pipe.read().decode(errors="replace")
        for path in (self.output, self.log_path):
            if not text.strip() and path is not None:
                with contextlib.suppress(OSError):
                    text = Path(path).read_text(errors="replace")
        lines = text.strip().splitlines()[-ERROR_LINES:]
        return prefix + " | ".join(line.strip() for line in lines) if lines else ""

    def running(self) -> bool:
        """Started and not exited yet; an exited child is reaped here."""
        return self.process is not None and self.process.poll() is None

    def unmount(self, timeout: float = 20.0) -> int:
        """Clean unmount, as a user would do it; returns the server's exit code."""
        complaint = fusermount(self.mountpoint)
        if complaint:
            raise NodeError(f"fusermount3 -u {self.mountpoint}: {complaint}")
        return self.process.wait(timeout=timeout)

    def kill(self, sig: int = signal.SIGKILL, unmount: bool = True,
             timeout: float = 20.0) -> None:
        """Send sig and wait until the server has exited. With unmount=False its dead
        mount stays (ENOTCONN) until stop(), so that a workload cannot fall through into
        the bare mountpoint directory."""
        self.process.send_signal(sig)
        self.process.wait(timeout=timeout)
        if unmount:
            force_unmount(self.mountpoint)

    def stop(self) -> tuple[bool, str]:
        """Stop the server and detach its mount, whatever state either is in (also if it
        never started); returns (stopped, what was done)."""
        stopped, steps = self._stop_server()
        if stopped:
            self._close_pipe()
        return stopped, steps

    def _stop_server(self) -> tuple[bool, str]:
        return _stop(self.mountpoint, self.running, self._send, self.waits)

    def _send(self, signum: int) -> None:
        if self.process is not None:
            self.process.send_signal(signum)  # Popen ignores it once the child is reaped

    def _close_pipe(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
