"""`benchmarks/` and `examples/` use only public keras_freetickets names.

They are what users copy, so they must work through the library's public
surface: no private module (`keras_freetickets._x`), no private name imported
from a library module, and no `name._x` where `name` was bound by importing
keras_freetickets or something from it (`kft._x`, `export_lib._exchange`,
also by name: `getattr(export_lib, "_exchange")`), and no private keyword
argument (`_kernel_mode=`) in any call. Checked on the source (ast), without
importing TensorFlow.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "keras_freetickets"
SCRIPTS = sorted(
    path for folder in ("benchmarks", "examples")
    for path in (REPO / folder).rglob("*.py")
)


def _private(name):
    """`_x` and `__x` are private; dunders (`__version__`, `__file__`) are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _in_package(module):
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _attribute_chain(node):
    """`a.b.c` -> ("a", ["b", "c"]); None if the chain does not start at a name."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return node.id, attrs[::-1]


def private_uses(source, filename="<source>"):
    """The private keras_freetickets names that `source` uses, as
    `"<file>:<line>: <what>"` strings."""
    tree = ast.parse(source, filename)
    found = []
    bound = set()  # names bound to keras_freetickets or something from it

    def report(node, what):
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _in_package(alias.name):
                    continue
                if any(_private(part) for part in alias.name.split(".")):
                    report(node, f"imports private module {alias.name}")
                bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _in_package(
            node.module or ""
        ):
            if any(_private(part) for part in node.module.split(".")):
                report(node, f"imports from private module {node.module}")
            for alias in node.names:
                if _private(alias.name):
                    report(node, f"imports private name {alias.name} from {node.module}")
                bound.add(alias.asname or alias.name)
    attributes = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    inner = {id(n.value) for n in attributes if isinstance(n.value, ast.Attribute)}
    for node in attributes:
        chain = _attribute_chain(node)
        # The outermost attribute of a chain only, so each use is reported once.
        if id(node) in inner or chain is None or chain[0] not in bound:
            continue
        if any(_private(a) for a in chain[1]):
            report(node, f"uses private {'.'.join([chain[0]] + chain[1])}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        # Private keywords (`export(..., _kernel_mode=...)`), also when they
        # travel in a `dict(...)` to be unpacked into a library call later.
        for keyword in node.keywords:
            if keyword.arg and _private(keyword.arg):
                report(node, f"passes private keyword {keyword.arg}=")
        # getattr(kft_module, "_x"), setattr(...), patch.object(...) and the like.
        for obj, name in zip(node.args, node.args[1:]):
            if (isinstance(obj, ast.Name) and obj.id in bound
                    and isinstance(name, ast.Constant) and isinstance(name.value, str)
                    and _private(name.value)):
                report(node, f"reaches private {obj.id}.{name.value} by name")
    return found


def test_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"faults.py", "storage_and_inference.py", "train_edst_ensemble.py"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_uses_only_public_names(path):
    source = path.read_text(encoding="utf-8")
    assert private_uses(source, str(path.relative_to(REPO))) == []


@pytest.mark.parametrize("source, needle", [
    ("import keras_freetickets._codec\n", "imports private module keras_freetickets._codec"),
    ("import keras_freetickets._codec as codec\n", "private module"),
    ("from keras_freetickets import _codec\n", "imports private name _codec"),
    ("from keras_freetickets._export_graph import plan\n", "from private module"),
    ("from keras_freetickets.export import _exchange\n",
     "imports private name _exchange from keras_freetickets.export"),
    ("import keras_freetickets as kft\nkft._LAZY\n", "uses private kft._LAZY"),
    ("from keras_freetickets import backup as backup_lib\n"
     "def f():\n    return backup_lib._write_file\n", "uses private backup_lib._write_file"),
    ("def f():\n    from keras_freetickets import export as export_lib\n"
     "    export_lib._exchange('a', 'b')\n",
     "uses private export_lib._exchange"),
    ("from keras_freetickets import export as export_lib\n"
     "with _Patched(export_lib, '_exchange', lambda a, b: False):\n    pass\n",
     "reaches private export_lib._exchange by name"),
    ("import keras_freetickets as kft\ngetattr(kft, '_LAZY')\n",
     "reaches private kft._LAZY by name"),
    ("import keras_freetickets as kft\nkft.export._exchange('a', 'b')\n",
     "uses private kft.export._exchange"),
    ("from keras_freetickets import SparseOptimizer\nSparseOptimizer._prune_and_grow\n",
     "uses private SparseOptimizer._prune_and_grow"),
    ("VARIANTS = [dict(_kernel_mode='sparse_matmul')]\n", "passes private keyword _kernel_mode="),
    ("import keras_freetickets as kft\nkft.export.export_ensemble(e, p, _kernel_mode='x')\n",
     "passes private keyword _kernel_mode="),
])
def test_planted_offender_is_found(source, needle):
    found = private_uses(source, "planted.py")
    assert len(found) == 1 and needle in found[0], found


@pytest.mark.parametrize("source", [
    "import keras_freetickets as kft\nkft.__version__, kft.__file__\n",
    "import keras_freetickets as kft\nkft.export.export_ensemble(e, 'p', kernel_mode='rebuild')\n",
    "from keras_freetickets import members as members_lib\nmembers_lib.save_member\n",
    "import os\nos._exit(0)\n",  # private names of other modules are not this test's business
    "class A:\n    def f(self):\n        return self._x\n",
    "from keras_freetickets import export\nimport other\nother._private\n",
    "import os\nimport keras_freetickets as kft\nsetattr(os, '_x', 1)\ngetattr(kft, 'export')\n",
])
def test_public_uses_pass(source):
    assert private_uses(source) == []


def test_benchmark_and_example_modules_have_distinct_names():
    """Tests put benchmarks/ and examples/ on sys.path in one process; a
    module name in both (once `common.py`) makes one folder import the
    other's module."""
    names = {}
    for folder in ("benchmarks", "examples"):
        names[folder] = {p.stem for p in (REPO / folder).glob("*.py")}
    assert names["benchmarks"] and names["examples"]
    assert names["benchmarks"] & names["examples"] == set()
