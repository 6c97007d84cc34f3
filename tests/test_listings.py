"""Directory listings lent to nodes (coordinator/listings.py, csvfs/listings.py): a
member answers "no such name" itself where it holds a listing, so its create is one
round trip, and still sees every other node's change the moment that change returns.
Real mounts, several nodes, plain os calls."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from csvfs import listings as listings_module
from csvfs.listings import TAKEN_BACK_PAUSE, Listings
from tests.cluster import csvfs

pytestmark = pytest.mark.timeout(120)

ANSWERED = re.compile(r"directory listings: (\d+) lookups answered here")


def answered_here(node) -> int:
    found = ANSWERED.findall(node.log.read_text())
    assert found, "the node logged no listing count"
    return int(found[-1])


def make_file(path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))


def test_a_member_creates_without_asking_for_the_name_and_sees_changes_at_once(
        image, nodes):
    coordinator, member = nodes.start(image, "n1"), nodes.start(image, "n2")
    os.mkdir(member.path("d"))
    for index in range(50):  # each name looked up first, by the kernel, then made
        make_file(member.path("d", f"own-{index}"))
    assert sorted(os.listdir(coordinator.path("d"))) == sorted(
        f"own-{index}" for index in range(50))

    # every kind of change by the other node shows on the member the moment it returns
    changes = [
        ("create", lambda: make_file(coordinator.path("d", "made")), "made"),
        ("mkdir", lambda: os.mkdir(coordinator.path("d", "sub")), "sub"),
        ("symlink", lambda: os.symlink("made", coordinator.path("d", "link")), "link"),
        ("link", lambda: os.link(coordinator.path("d", "made"),
                                 coordinator.path("d", "hard")), "hard"),
        ("rename in", lambda: (make_file(coordinator.path("outside")),
                               os.rename(coordinator.path("outside"),
                                         coordinator.path("d", "moved"))), "moved"),
    ]
    for what, change, name in changes:
        time.sleep(TAKEN_BACK_PAUSE)  # the last change took the listing back
        assert not os.path.lexists(member.path("d", name)), what  # lends it again
        assert not os.path.lexists(member.path("d", name)), what  # the listing says so
        change()
        assert os.path.lexists(member.path("d", name)), f"{what}: not seen on the member"
    os.unlink(coordinator.path("d", "made"))
    assert not os.path.lexists(member.path("d", "made"))
    time.sleep(TAKEN_BACK_PAUSE)
    assert not os.path.lexists(member.path("d", "renamed"))  # the listing, lent again
    os.rename(coordinator.path("d", "moved"), coordinator.path("d", "renamed"))
    assert not os.path.lexists(member.path("d", "moved"))
    assert os.path.lexists(member.path("d", "renamed"))

    # the member's own changes keep its listing current
    os.rename(member.path("d", "own-0"), member.path("d", "own-zero"))
    assert not os.path.lexists(member.path("d", "own-0"))
    assert os.path.lexists(member.path("d", "own-zero"))
    os.unlink(member.path("d", "own-1"))
    make_file(member.path("d", "own-1"))  # made again after its removal
    with pytest.raises(FileExistsError):
        make_file(member.path("d", "own-2"))
    member.unmount()
    # the 50 creates' lookups and the checks before each change at least
    assert answered_here(member) >= 55


def test_a_holder_that_does_not_give_the_listing_back_is_evicted_first(image, nodes):
    coordinator, member = nodes.start(image, "n1"), nodes.start(image, "n2")
    os.mkdir(coordinator.path("d"))
    assert not os.path.lexists(member.path("d", "x"))  # the member now holds the listing
    member.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        make_file(coordinator.path("d", "x"))  # waits: evicted, then its grant runs out
        waited = time.monotonic() - started
    finally:
        member.process.send_signal(signal.SIGCONT)
    assert 1.5 < waited < 10, waited
    deadline = time.monotonic() + 20
    while not os.path.lexists(member.path("d", "x")):  # once rejoined, not from the listing
        assert time.monotonic() < deadline, "the member answered from a listing taken back"
        time.sleep(0.1)
    assert "evicting n2" in coordinator.log.read_text()


def test_listings_do_not_outlive_the_coordinator_that_lent_them(image, nodes):
    lease = 1.0
    first, second, third = (nodes.start(image, name, "--lease", str(lease))
                            for name in ("n1", "n2", "n3"))
    os.mkdir(first.path("d"))
    for node in (second, third):  # both hold the listing
        assert not os.path.lexists(node.path("d", "after"))
    first.kill(signal.SIGKILL)
    make_file(third.path("d", "after"))  # waits for the takeover
    # whichever survivor took over, the other's listing went with n1
    assert os.path.lexists(second.path("d", "after"))
    for node in (second, third):
        node.unmount()
    assert csvfs("fsck", image, check=False).returncode == 0


def test_a_listing_that_crossed_an_own_change_is_not_taken():
    """Units of the node's side: a listing asked for before one of the node's own
    changes returned may lack that change, so it is not taken; only absence is
    answered from one, and only while the session is valid."""
    valid = [True]
    listings = Listings(lambda: valid[0])
    asked = listings.changes
    listings.added(7, b"mine")  # returned while the lookup was on its way
    listings.take(7, [b"other"], asked)
    assert not listings.absent(7, b"mine")  # not taken: the coordinator is asked
    listings.take(7, [b"other"], listings.changes)
    assert listings.absent(7, b"x") and not listings.absent(7, b"other")
    listings.added(7, b"new")
    assert not listings.absent(7, b"new")
    listings.removed(7, b"other")
    assert listings.absent(7, b"other")
    assert not listings.absent(7, b"n" * 256)  # ENAMETOOLONG is the coordinator's
    valid[0] = False
    assert not listings.absent(7, b"x")
    valid[0] = True
    listings.drop([7])
    assert not listings.absent(7, b"x")


def test_a_directory_taken_back_is_not_asked_for_again_at_once(monkeypatch):
    """Another node is changing it: lending it back and forth would cost each of its
    changes one more round trip."""
    listings = Listings(lambda: True)
    listings.take(7, [b"a"], listings.changes)
    listings.taken_back([7])
    assert not listings.absent(7, b"x")  # dropped
    assert not listings.wanted(7) and listings.wanted(8)
    monkeypatch.setattr(listings_module, "TAKEN_BACK_PAUSE", 0.0)
    assert listings.wanted(7)
