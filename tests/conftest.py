import pytest

from tests.cluster import (
    ON_LOOP_DEVICES,
    Node,
    detach_loop_devices,
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


@pytest.fixture
def image(request, tmp_path):
    if getattr(request, "param", "file") == "loop-device":
        return make_loop_volume(tmp_path, "256M", [])
    return make_volume(tmp_path)


@pytest.fixture
def nodes(tmp_path):
    """Start nodes with nodes.start(image, name); all are stopped and unmounted afterwards.

    A test fails if a node logged an error or a traceback it did not expect.
    """
    started: list[Node] = []
    started_nodes, tmp_path_of_test = started, tmp_path

    class Starter:
        allow_log_errors = False
        started = started_nodes
        tmp_path = tmp_path_of_test

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
