import os

import pytest


@pytest.mark.timeout(60)
def test_write_read_remount(mount, nodes):
    path = mount.path("hello")
    with open(path, "wb") as handle:
        handle.write(b"hello world")
    os.mkdir(mount.path("dir"))
    assert sorted(os.listdir(mount.mountpoint)) == ["dir", "hello"]
    assert mount.unmount() == 0
    again = nodes.start(mount.image, "node2")
    assert again.path("hello").read_bytes() == b"hello world"
