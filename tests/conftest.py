import os

import pytest

from tests.cluster import Isolation, Node, isolation_missing, make_volume

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
def image(tmp_path):
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
    started_nodes = started

    class Starter:
        allow_log_errors = False
        started = started_nodes

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
