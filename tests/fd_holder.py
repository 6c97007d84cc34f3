"""Hold a file open on a mount for a test, in a process of its own.

A test process must not hold FUSE files itself while it stops a node with
SIGSTOP: every fork+exec it does would then close those files, and each close
waits for the stopped node. Commands come on stdin, one per line:
  ping   -> answer "ok" (the file is open by then)
  write  -> write 8 KiB of 'a' and fsync, answer "ok"
  poke   -> pwrite 10 bytes at offset 0 once, answer "ok" or the errno name
"""

import errno
import os
import sys


def poke(fd: int) -> str:
    try:
        os.pwrite(fd, b"x" * 10, 0)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"


def main() -> None:
    fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
    for line in sys.stdin:
        command = line.strip()
        if command == "ping":
            answer = "ok"
        elif command == "write":
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
