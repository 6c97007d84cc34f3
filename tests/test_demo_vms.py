"""scripts/demo_vms.py (make demo-vms): a short run of the demo, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import force_unmount

pytestmark = pytest.mark.timeout(120)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo_vms.py"


def demo(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.fspath(SCRIPT), "--dir", os.fspath(directory),
                           *args], capture_output=True, text=True, timeout=110,
                          stdin=subprocess.DEVNULL)


def mounts_under(directory: Path) -> list[str]:
    prefix = os.fspath(directory) + "/"
    with open("/proc/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]


def test_six_vms_on_three_nodes_verify_everywhere(tmp_path):
    directory = tmp_path / "demo"
    try:
        result = demo(directory, "--seconds", "5", "--migrate-every", "1", "--disk", "16M",
                      "--volume", "512M")
    finally:
        for mountpoint in mounts_under(directory):
            force_unmount(Path(mountpoint))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| node")]
    assert len(rows) == 6 and all(row.count("| ok ") == 3 for row in rows), result.stdout
    assert "zero mismatches" in result.stdout
    moves = next(line for line in result.stdout.splitlines() if line.startswith("migrations"))
    count, events = (int(part.split(":")[1]) for part in moves.split(","))
    assert count >= 3 and events == count, moves
    assert not mounts_under(directory)


def test_bad_arguments_exit_2(tmp_path):
    result = demo(tmp_path / "demo", "--seconds", "0")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()
