"""Standard tools on a 3-node cluster: fio writes on one node and verifies on another,
and qemu-img / qemu-io make, write and check disk images across all three.
`make setup` installs fio and qemu-utils."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.cluster import csvfs, make_volume

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path, nodes):
    image = make_volume(tmp_path, size="1G")
    return image, [nodes.start(image, f"n{index}") for index in (1, 2, 3)]


def run(*command, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, command)), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def fio(path, *extra) -> subprocess.CompletedProcess:
    return run("fio", "--name=vm", f"--filename={path}", "--rw=randwrite", "--bs=4k",
               "--size=32M", "--ioengine=psync", "--verify=crc32c", "--randseed=7",
               "--verify_state_save=0", "--output-format=json", *extra)


def test_fio_writes_on_one_node_and_verifies_on_another(cluster):
    image, (writer, reader, meddler) = cluster
    written = fio(writer.path("fio.dat"), "--do_verify=0")
    assert written.returncode == 0, written.stderr
    checked = fio(reader.path("fio.dat"), "--verify_only")
    assert checked.returncode == 0, checked.stderr
    job = json.loads(checked.stdout)["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == 32 << 20
    # the check can fail: a block changed through a third node shows on the second
    fd = os.open(meddler.path("fio.dat"), os.O_WRONLY)
    os.pwrite(fd, b"x" * 4096, 77 * 4096)
    os.close(fd)
    spoiled = fio(reader.path("fio.dat"), "--verify_only")
    assert spoiled.returncode != 0 and "bad magic header" in spoiled.stderr


WRITES = [("0xab", "0", "1M"), ("0xcd", "100M", "512k"), ("0x11", "200M", "64k")]


def qemu_writes(pattern_of=lambda p: p):
    return [arg for pattern, offset, length in WRITES
            for arg in ("-c", f"write -P {pattern_of(pattern)} {offset} {length}")]


@pytest.mark.parametrize("fmt", ["qcow2", "vhdx"])
def test_qemu_images_across_three_nodes(cluster, tmp_path, fmt):
    """Created on n1, written with qemu-io on n2, checked and compared on n3 against
    the same writes to an image on a local disk."""
    image, (maker, writer, checker) = cluster
    name = f"disk.{fmt}"
    made = run("qemu-img", "create", "-q", "-f", fmt, maker.path(name), "256M")
    assert made.returncode == 0, made.stderr
    wrote = run("qemu-io", "-f", fmt, *qemu_writes(), writer.path(name))
    assert wrote.returncode == 0 and wrote.stdout.count("wrote") == 3, wrote.stdout
    checked = run("qemu-img", "check", "-f", fmt, checker.path(name))
    assert checked.returncode == 0 and "No errors" in checked.stdout, checked.stdout

    reference = tmp_path / f"reference.{fmt}"
    assert run("qemu-img", "create", "-q", "-f", fmt, reference, "256M").returncode == 0
    assert run("qemu-io", "-f", fmt, *qemu_writes(), reference).returncode == 0
    same = run("qemu-img", "compare", "-f", fmt, "-F", fmt, checker.path(name), reference)
    assert same.returncode == 0 and "identical" in same.stdout, same.stdout + same.stderr

    # the comparison can fail: another pattern in the reference is a mismatch
    assert run("qemu-io", "-f", fmt, "-c", "write -P 0x22 100M 4k", reference).returncode == 0
    differs = run("qemu-img", "compare", "-f", fmt, "-F", fmt, checker.path(name), reference)
    assert differs.returncode == 1 and "mismatch" in differs.stdout, differs.stdout
    for node in (maker, writer, checker):
        node.unmount()
    assert csvfs("fsck", image, check=False).returncode == 0
