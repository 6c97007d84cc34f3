import os

import pytest

from tests.cluster import (
    ON_LOOP_DEVICES,
    Isolation,
    Node,
    detach_loop_devices,
    isolation_missing,
    make_loop_volume,
    make_volume,
)


@pytest.fixture(autouse=True)
def loop_devices():
    """Detach the loop devices a test made (CSVFS_TEST_VOLUME=loop), after its nodes."""
    yield
    detach_loop_devices()


ALSO_ON_A_LOOP_DEVICE = "also_on_a_loop_device"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"{ALSO_ON_A_LOOP_DEVICE}: run the test a second time with its volume "
        "on a loop device that the nodes open with O_DIRECT")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker(ALSO_ON_A_LOOP_DEVICE) and \
            "image" in metafunc.fixturenames and not ON_LOOP_DEVICES:
        metafunc.parametrize("image", ["file", "loop-device"], indirect=True)


ISOLATE_VARIABLE = "CSVFS_TEST_ISOLATE"
LOOPBACK = "127.0.0.1"


def isolating(request) -> bool:
    """Whether this test's nodes run in namespaces of their own: always if the test
    gives the nodes fixture the parameter "isolated" (indirect parametrization, as in
    tests/cluster.py BOTH_WAYS), else if CSVFS_TEST_ISOLATE=1."""
    mode = getattr(request, "param", "default")
    assert mode in ("default", "isolated"), mode
    return mode == "isolated" or os.environ.get(ISOLATE_VARIABLE, "") == "1"



@pytest.fixture
def image(request, tmp_path):
    if getattr(request, "param", "file") == "loop-device":
        return make_loop_volume(tmp_path, "256M", [])
    return make_volume(tmp_path)


@pytest.fixture
def nodes(request, tmp_path):
    """Start nodes with nodes.start(image, name); all are stopped and unmounted afterwards.

    A test fails if a node logged an error or a traceback it did not expect.

    Isolated (CSVFS_TEST_ISOLATE=1, or the parameter "isolated"), each node name runs in
    a network and a mount namespace of its own (tests/cluster.py Isolation); its mount
    still shows on the host at the same path. nodes.isolation is then that Isolation
    (else None), and nodes.host_address the test process's address as nodes see it.
    """
    isolation = None
    if isolating(request):
        why = isolation_missing()
        if why:
            pytest.skip(why)
        isolation = Isolation(tmp_path).open()
    started: list[Node] = []
    started_nodes, tmp_path_of_test = started, tmp_path

    class Starter:
        allow_log_errors = False
        started = started_nodes
        tmp_path = tmp_path_of_test

        def __init__(self):
            self.isolation = isolation
            self.host_address = isolation.host_address if isolation else LOOPBACK

        def node(self, image, name="node1", *extra, env=None, mountpoint=None) -> Node:
            """A node, not started yet, that is stopped afterwards (by default on
            tmp_path/mnt-NAME)."""
            node = Node(image, mountpoint or tmp_path / f"mnt-{name}", name, *extra,
                        env=env, isolation=isolation)
            started.append(node)
            return node

        def start(self, image, name="node1", *extra, env=None):
            return self.node(image, name, *extra, env=env).start()

    starter = Starter()
    try:
        yield starter
        for node in started:
            node.stop()
    finally:
        if isolation is not None:
            for node in started:  # after a failure above: stop() never raises twice
                if node.running():
                    node.stop()
            isolation.close()
            left = isolation.leftovers()
            assert not left, f"left behind by an isolated test: {left}"
    if not starter.allow_log_errors:
        problems = [line for node in started for line in node.log_problems()]
        assert not problems, "unexpected errors in node logs:\n" + "\n".join(problems)


@pytest.fixture
def mount(image, nodes):
    return nodes.start(image)
