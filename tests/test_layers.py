"""Imports run one way, down the layers of ../shared/DESIGN.md.

1. volume (csvfs/volume/): the on-disk format, the image, extents, sizes.
2. cluster (csvfs/cluster/): election, the RPC wire and transport, events, the
   message kinds both sides share.
3. coordinator (coordinator/): the metadata service.
4. node (the rest of csvfs/): roles, data path, FUSE operations, CLI.

vmload is a workload beside the node: it may use the volume layer (sizes) and
nothing else, so that the reference a disk is checked against never depends on
the system under test. scripts/ and tests/ sit on top of everything, and
nothing below imports them. Every import is read, including those inside
functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("csvfs", "coordinator", "vmload")
TOP = ("scripts", "tests")

# (layer name, module prefix); the first prefix that matches wins, so the
# subpackages come before the package that holds them.
LAYERS = (
    ("volume", "csvfs.volume"),
    ("cluster", "csvfs.cluster"),
    ("coordinator", "coordinator"),
    ("node", "csvfs"),
    ("workload", "vmload"),
    ("top", "scripts"),
    ("top", "tests"),
)
RANK = {"volume": 1, "cluster": 2, "coordinator": 3, "node": 4, "top": 9}
# The workload layer's own rule: the volume layer only.
WORKLOAD_MAY_IMPORT = {"volume", "workload"}

# Modules that must stay free of some others whatever their layer allows.
FORBIDDEN = {
    # The data path knows neither FUSE nor RPC: the node plugs them in.
    "csvfs.datapath": ("pyfuse3", "csvfs.cluster.transport", "csvfs.cluster.wire",
                       "csvfs.cluster.rpc_client", "csvfs.cluster.rpc_server",
                       "csvfs.fuse_ops", "csvfs.fuse_shim"),
    "coordinator": ("pyfuse3", "csvfs.fuse_shim"),
    "csvfs.cluster": ("pyfuse3",),
    "csvfs.volume": ("pyfuse3", "trio"),
}


def layer_of(module: str) -> str | None:
    for name, prefix in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return name
    return None


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str, root: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from csvfs.volume import format` imports the module csvfs.volume.format
            submodules = [f"{base}.{alias.name}" for alias in node.names
                          if _is_module(root, f"{base}.{alias.name}")]
            found += [(node.lineno, name) for name in submodules or [base]]
    return found


def allowed(importer: str, imported: str) -> bool:
    source, target = layer_of(importer), layer_of(imported)
    if target is None:  # the standard library or a third-party package
        return True
    if source == "workload":
        return target in WORKLOAD_MAY_IMPORT
    if target == "workload":
        return source == "top"
    return RANK[target] <= RANK[source]


def violations(root: Path, packages=PACKAGES + TOP) -> list[str]:
    problems = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            module = module_name(path, root)
            for line, imported in imports_of(path, module, root):
                where = f"{path.relative_to(root)}:{line}"
                if not allowed(module, imported):
                    problems.append(f"{where}: {module} ({layer_of(module)}) imports "
                                    f"{imported} ({layer_of(imported)})")
                for prefix, banned in FORBIDDEN.items():
                    if module == prefix or module.startswith(prefix + "."):
                        if any(imported == b or imported.startswith(b + ".") for b in banned):
                            problems.append(f"{where}: {module} must not import {imported}")
    return problems


def _is_module(root: Path, name: str) -> bool:
    """Is name a module or package of the tree (not a class imported from one)?"""
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_every_import_runs_down_the_layers():
    problems = violations(ROOT)
    assert not problems, "imports that run back up a layer:\n" + "\n".join(problems)


def test_every_top_level_folder_of_code_is_checked():
    """A new top-level package (a backup/, say) must get a layer, or its imports would
    go unchecked."""
    folders = {folder.name for folder in ROOT.iterdir()
               if folder.is_dir() and not folder.name.startswith((".", "build"))
               and next(folder.rglob("*.py"), None) is not None}
    assert folders == set(PACKAGES + TOP)


@pytest.mark.parametrize("importer, imported, text", [
    ("csvfs/volume/format.py", "csvfs.cluster.election", "from csvfs.cluster import election"),
    ("csvfs/cluster/events.py", "coordinator.model", "import coordinator.model"),
    ("coordinator/service.py", "csvfs.membership", "from csvfs.membership import Membership"),
    ("coordinator/journal.py", "csvfs.datapath", "def f():\n    from csvfs import datapath"),
    ("vmload/vm.py", "csvfs.cluster.errors", "from csvfs.cluster.errors import MetaError"),
    ("csvfs/datapath.py", "pyfuse3", "import pyfuse3"),
    ("csvfs/node.py", "tests.cluster", "from tests import cluster"),
])
def test_a_backward_import_is_found(tmp_path, importer, imported, text):
    """The check itself: a tree with one import running back up fails it."""
    for module in ("csvfs/volume/format.py", "csvfs/cluster/election.py",
                   "csvfs/cluster/errors.py", "csvfs/cluster/events.py",
                   "coordinator/model.py", "coordinator/journal.py", "coordinator/service.py",
                   "csvfs/membership.py", "csvfs/datapath.py", "csvfs/node.py",
                   "vmload/vm.py", "tests/cluster.py"):
        path = tmp_path / module
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.touch()
    assert violations(tmp_path) == []
    (tmp_path / importer).write_text(text + "\n")
    found = violations(tmp_path)
    assert len(found) == 1 and imported in found[0], found
