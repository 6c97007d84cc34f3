"""Hold a file open on a mount for a test, in a process of its own.

A test process must not hold FUSE files itself while it stops a node with
SIGSTOP: every fork+exec it does would then close those files, and each close
waits for the stopped node. Commands come on stdin, one per line:
  write  -> write 8 KiB of 'a' and fsync, answer "ok"
  poke   -> pwrite 10 bytes at offset 0 until it fails (5 s at most),
            answer the errno name or "still-writable"
"""

import errno
import os
import sys
import time


def poke(fd: int) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.pwrite(fd, b"x" * 10, 0)
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc.errno))
        time.sleep(0.05)
    return "still-writable"


def main() -> None:
    fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
    for line in sys.stdin:
        command = line.strip()
        if command == "write":
            os.write(fd, b"a" * 8192)
            os.fsync(fd)
            answer = "ok"
        elif command == "poke":
            answer = poke(fd)
        else:
            answer = f"unknown command {command!r}"
        print(answer, flush=True)


if __name__ == "__main__":
    main()
