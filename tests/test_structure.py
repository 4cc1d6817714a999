"""The import graph keeps its shape: layers import only downward, nothing imports the config but the programs.

Layers, bottom to top: small helpers (files, console, ranges, peer_keys, compiled) -> distributed -> models,
losses, data (siblings that do not import each other) -> training -> config ->
cli. Read from the source with ``ast``, so the test sees every import,
including ones inside functions.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "nemo_dpo")

LAYERS = [
    {"nemo_dpo", "nemo_dpo.files", "nemo_dpo.console", "nemo_dpo.ranges", "nemo_dpo.peer_keys", "nemo_dpo.compiled"},
    {"nemo_dpo.distributed"},
    {"nemo_dpo.models", "nemo_dpo.losses", "nemo_dpo.data"},
    {"nemo_dpo.training"},
    {"nemo_dpo.config"},
    {"nemo_dpo.cli"},
]
# `python -m` entry points the README and the Slurm template name; each only calls its program in cli/.
ENTRY_POINTS = {"nemo_dpo.convert", "nemo_dpo.plot", "nemo_dpo.data.prepare"}


def _modules() -> dict:
    """{module name: set of nemo_dpo modules it imports}."""
    graph = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            imports = set()
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Import):
                    imports |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imports.add(node.module)
                    imports |= {f"{node.module}.{alias.name}" for alias in node.names}
            graph[module] = {i for i in imports if i.split(".")[0] == "nemo_dpo"}
    known = set(graph)
    return {m: {i for i in imports if i in known} - {m} for m, imports in graph.items()}


GRAPH = _modules()


def _layer(module: str) -> int:
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        for index, layer in enumerate(LAYERS):
            if prefix in layer:
                return index
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py")


def _group(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_graph_was_read():
    assert "nemo_dpo.training.trainer" in GRAPH and "nemo_dpo.data.pipeline" in GRAPH["nemo_dpo.training.trainer"]


def test_only_the_programs_import_the_config():
    importers = {m for m, imports in GRAPH.items() if "nemo_dpo.config" in imports}
    assert importers and all(m.startswith("nemo_dpo.cli.") for m in importers), sorted(importers)


@pytest.mark.parametrize("module", sorted(set(GRAPH) - ENTRY_POINTS))
def test_imports_point_down(module):
    for imported in GRAPH[module]:
        if imported == "nemo_dpo" or _group(imported) == _group(module):
            continue  # the package's own __init__, or the same package
        assert _layer(imported) < _layer(module), f"{module} imports {imported}, which is not below it"


def test_entry_points_only_call_their_program():
    for module in ENTRY_POINTS:
        assert GRAPH[module] <= {f"nemo_dpo.cli.{module.split('.')[-1]}"} | {
            f"nemo_dpo.cli.{module.split('.')[-1]}.{name}" for name in ("main", "build_parser")
        }, module


def test_no_import_cycles():
    state = {}

    def visit(module, path):
        state[module] = "open"
        for imported in GRAPH[module]:
            if state.get(imported) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(imported):] + [imported]))
            if imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in GRAPH:
        if module not in state:
            visit(module, [module])


def test_only_distributed_talks_to_megatron_parallel_state():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and "parallel_state" in open(path).read():
                assert os.path.relpath(folder, PACKAGE) == "distributed", path
