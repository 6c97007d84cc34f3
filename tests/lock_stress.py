"""One worker of test_locks.test_no_two_holders_ever_overlap, in a process of its own.

    python -m tests.lock_stress MOUNTPOINT flock|posix SECONDS NAME

For SECONDS, over and over: take an exclusive lock on MOUNTPOINT/lock-KIND (flock or
fcntl F_SETLKW), create the marker MOUNTPOINT/held-KIND with O_EXCL (it exists only
while someone holds the lock), add one to the counter in MOUNTPOINT/counter-KIND,
remove the marker, unlock. Prints "KIND ROUNDS OVERLAPS".
"""

import fcntl
import os
import sys
import time

WIDTH = 12


def main() -> None:
    root, kind, seconds, name = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    lock_fd = os.open(os.path.join(root, f"lock-{kind}"), os.O_RDWR | os.O_CREAT, 0o644)
    marker = os.path.join(root, f"held-{kind}")
    counter = os.path.join(root, f"counter-{kind}")
    rounds = overlaps = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if kind == "flock":
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        else:
            fcntl.lockf(lock_fd, fcntl.LOCK_EX)
        try:
            try:
                os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                overlaps += 1
                print(f"{name}: the marker exists while I hold the lock", file=sys.stderr)
                continue
            fd = os.open(counter, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                value = int(os.pread(fd, WIDTH, 0) or b"0")
                os.pwrite(fd, b"%*d" % (WIDTH, value + 1), 0)
            finally:
                os.close(fd)
            os.unlink(marker)
            rounds += 1
        finally:
            if kind == "flock":
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
            else:
                fcntl.lockf(lock_fd, fcntl.LOCK_UN)
    print(kind, rounds, overlaps)


if __name__ == "__main__":
    main()
