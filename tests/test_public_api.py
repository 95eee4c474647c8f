"""The public API is small and explicit; the package has no import cycle
and no oversized module."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_freetickets"
MAX_LINES = 450


def test_top_level_names():
    import keras_freetickets as kft

    assert set(kft.__all__) == {
        "SparseOptimizer", "SparsityMonitor", "sparsity_summary",
        "EDSTCallback", "train_dst_ensemble", "FreeTicketsEnsemble",
        "save_member", "load_member", "mark_prunable", "mark_not_prunable",
        "register_prunable_name", "register_updater", "UpdateSchedule",
        "BackupAndRestore",
        "distributed", "distributions", "export", "flops", "members",
        "metrics", "native", "schedules", "updaters",
    }
    for name in kft.__all__:
        assert getattr(kft, name) is not None
    with pytest.raises(AttributeError, match="contrib"):
        kft.datasets  # noqa: B018


def test_contrib_modules_and_their_old_names():
    code = ("import warnings, sys; warnings.simplefilter('error');"
            "import keras_freetickets.contrib.datasets as d;"
            "import keras_freetickets.contrib.plots;"
            "warnings.simplefilter('ignore');"
            "import keras_freetickets.datasets as old;"
            "assert old is d; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def _imports(path):
    """keras_freetickets modules that `path` imports (top level or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and (
            node.module.startswith("keras_freetickets")
        ):
            if node.module == "keras_freetickets":
                found |= {f"keras_freetickets.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names
                      if a.name.startswith("keras_freetickets.")}
    return found


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_no_import_cycle():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # The aliases of moved modules only point at their new home.
    shims = {"keras_freetickets.datasets", "keras_freetickets.plots"}
    graph = {name: {m for m in _imports(path) if m in modules and m != name}
             for name, path in modules.items() if name not in shims}
    graph.pop("keras_freetickets", None)  # lazy re-exports, not imports
    for deps in graph.values():
        deps.discard("keras_freetickets")
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        if state.get(node) == "open":
            pytest.fail("import cycle: " + " -> ".join(trail + [node]))
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            visit(dep, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


def test_no_module_is_oversized():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}
