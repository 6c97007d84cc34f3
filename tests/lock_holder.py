"""Take and hold locks on a file for a test, in a process of its own.

Commands come on stdin, one per line; every command is answered with one line,
"ok ..." or the errno name (EAGAIN, EINTR...):

  open NAME PATH [ro]     open PATH as descriptor NAME (read-write unless ro)
  close NAME              close descriptor NAME
  flock NAME sh|ex|un [nb]            flock(2), blocking unless nb
  lock NAME r|w|u START LEN [wait]    fcntl F_SETLK (F_SETLKW with wait)
  ofd NAME r|w|u START LEN [wait]     F_OFD_SETLK (F_OFD_SETLKW with wait)
  getlk NAME r|w START LEN            F_GETLK -> "ok TYPE START LEN PID" or "ok unlocked"
  ofdgetlk NAME r|w START LEN         the same with F_OFD_GETLK
  alarm SECONDS           a SIGALRM after SECONDS; a wait it interrupts answers EINTR
  pid                     -> "ok PID"
  fork-close NAME         a child closes its copy of NAME and exits; answers once it has
  fork-linger SECONDS     a child keeps copies of every descriptor for SECONDS, then exits

A blocking command answers only when it is granted (or interrupted).
"""

import errno
import fcntl
import os
import signal
import struct
import sys
import time

F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
TYPES = {"r": fcntl.F_RDLCK, "w": fcntl.F_WRLCK, "u": fcntl.F_UNLCK}
NAMES = {fcntl.F_RDLCK: "r", fcntl.F_WRLCK: "w", fcntl.F_UNLCK: "u"}
FLOCK = "hhqqi"  # struct flock on x86-64: type, whence, start, len, pid (+ padding)


class Interrupted(Exception):
    pass


def _alarm(signum, frame):
    raise Interrupted  # Python would retry the call after EINTR unless the handler raises


def pack(type_: int, start: int, length: int) -> bytes:
    return struct.pack(FLOCK, type_, os.SEEK_SET, start, length, 0)


def run(fds: dict, words: list[str]) -> str:
    command, args = words[0], words[1:]
    if command == "open":
        flags = os.O_RDONLY if args[2:] == ["ro"] else os.O_RDWR | os.O_CREAT
        fds[args[0]] = os.open(args[1], flags, 0o644)
        return "ok"
    if command == "close":
        os.close(fds.pop(args[0]))
        return "ok"
    if command == "flock":
        op = {"sh": fcntl.LOCK_SH, "ex": fcntl.LOCK_EX, "un": fcntl.LOCK_UN}[args[1]]
        fcntl.flock(fds[args[0]], op | (fcntl.LOCK_NB if args[2:] == ["nb"] else 0))
        return "ok"
    if command in ("lock", "ofd"):
        wait = args[4:] == ["wait"]
        if command == "lock":
            cmd = fcntl.F_SETLKW if wait else fcntl.F_SETLK
        else:
            cmd = F_OFD_SETLKW if wait else F_OFD_SETLK
        fcntl.fcntl(fds[args[0]], cmd, pack(TYPES[args[1]], int(args[2]), int(args[3])))
        return "ok"
    if command in ("getlk", "ofdgetlk"):
        cmd = fcntl.F_GETLK if command == "getlk" else F_OFD_GETLK
        reply = fcntl.fcntl(fds[args[0]], cmd, pack(TYPES[args[1]], int(args[2]), int(args[3])))
        type_, _whence, start, length, pid = struct.unpack(FLOCK, reply)
        if type_ == fcntl.F_UNLCK:
            return "ok unlocked"
        return f"ok {NAMES[type_]} {start} {length} {pid}"
    if command == "alarm":
        signal.setitimer(signal.ITIMER_REAL, float(args[0]))
        return "ok"
    if command == "pid":
        return f"ok {os.getpid()}"
    if command == "fork-close":
        child = os.fork()
        if child == 0:
            os.close(fds[args[0]])
            os._exit(0)
        os.waitpid(child, 0)
        return "ok"
    if command == "fork-linger":
        child = os.fork()
        if child == 0:
            time.sleep(float(args[0]))
            os._exit(0)
        return "ok"
    return f"unknown command {command!r}"


def main() -> None:
    signal.signal(signal.SIGALRM, _alarm)
    fds: dict[str, int] = {}
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            answer = run(fds, words)
        except Interrupted:
            answer = "EINTR"
        except OSError as exc:
            answer = errno.errorcode.get(exc.errno, str(exc.errno))
        print(answer, flush=True)


if __name__ == "__main__":
    main()
