"""Progress bars for long copies: tqdm on a terminal, nothing otherwise.

A bar only makes sense to a person watching, so when stdout is a pipe or a
file (a script, cron, the test suite) `bar` hands back an object that accepts
the same calls and prints nothing.
"""

from __future__ import annotations

import sys


class _NoBar:
    """What `bar` returns when nobody is watching: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def bar(total_bytes: int, description: str):
    """A byte-counting bar over total_bytes; use it as a context manager and call
    .update(n) with the bytes just done."""
    if not sys.stdout.isatty():
        return _NoBar()
    from tqdm import tqdm  # only here: a scripted backup does not pay for the import
    # Drawn on stdout, the stream whose being a terminal decided to draw it.
    return tqdm(total=total_bytes, desc=description, unit="B", unit_scale=True,
                unit_divisor=1024, file=sys.stdout, dynamic_ncols=True)
