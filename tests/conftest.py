import pytest

from tests.cluster import Node, make_volume


@pytest.fixture
def image(tmp_path):
    return make_volume(tmp_path)


@pytest.fixture
def nodes(tmp_path):
    """Start nodes with nodes.start(image, name); all are stopped and unmounted afterwards.

    A test fails if a node logged an error or a traceback it did not expect.
    """
    started: list[Node] = []
    started_nodes = started

    class Starter:
        allow_log_errors = False
        started = started_nodes

        def start(self, image, name="node1", *extra, env=None):
            node = Node(image, tmp_path / f"mnt-{name}", name, *extra, env=env)
            started.append(node)
            return node.start()

    starter = Starter()
    yield starter
    for node in started:
        node.stop()
    if not starter.allow_log_errors:
        problems = [line for node in started for line in node.log_problems()]
        assert not problems, "unexpected errors in node logs:\n" + "\n".join(problems)


@pytest.fixture
def mount(image, nodes):
    return nodes.start(image)
