"""scripts/demo_vms.py (make demo-vms): a short run of the demo, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.nodes import force_unmount, mounts_under

pytestmark = pytest.mark.timeout(120)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo_vms.py"


def demo(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.fspath(SCRIPT), "--dir", os.fspath(directory),
                           *args], capture_output=True, text=True, timeout=110,
                          stdin=subprocess.DEVNULL)


def test_six_vms_on_three_nodes_verify_everywhere(tmp_path):
    directory = tmp_path / "demo"
    try:
        result = demo(directory, "--seconds", "5", "--migrate-every", "1", "--disk", "16M",
                      "--volume", "512M")
    finally:
        left = mounts_under(directory)  # the demo must have taken its cluster down itself
        for mountpoint in left:
            force_unmount(mountpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| node")]
    assert len(rows) == 6 and all(row.count("| ok ") == 3 for row in rows), result.stdout
    assert "zero mismatches" in result.stdout
    moves = next(line for line in result.stdout.splitlines() if line.startswith("migrations"))
    count, events = (int(part.split(":")[1]) for part in moves.split(","))
    assert count >= 3 and events == count, moves
    assert not left, left


def test_bad_arguments_exit_2(tmp_path):
    result = demo(tmp_path / "demo", "--seconds", "0")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()
