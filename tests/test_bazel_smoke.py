"""Smoke tests of the package layout, fast and free of TensorFlow.

They run first in CI under both pytest and Bazel (`//:test_bazel_smoke`):
the version in `keras_freetickets/__init__.py` is what `setup.py` installs,
and the package and its pure-numpy modules import without TensorFlow.
"""

import pathlib
import re
import subprocess
import sys

import pytest

# Not resolve(): under Bazel the runfiles tree is made of symlinks, and the
# test should see the runfiles, not the source tree.
ROOT = pathlib.Path(__file__).absolute().parent.parent

# Modules documented as importable without TensorFlow.
PURE_MODULES = ("distributions", "metrics")


def _run_python(code):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_version_matches_setup_py():
    init = (ROOT / "keras_freetickets" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", init, re.MULTILINE)
    assert match is not None, "keras_freetickets/__init__.py defines no __version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", match.group(1))

    result = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == match.group(1)


def test_package_imports_without_tensorflow():
    result = _run_python(
        "import sys, keras_freetickets as k\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
        "print(k.__version__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_without_tensorflow(module):
    package = ROOT / "keras_freetickets"
    if not ((package / f"{module}.py").is_file()
            or (package / module / "__init__.py").is_file()):
        pytest.skip(f"keras_freetickets/{module} does not exist yet")
    result = _run_python(
        f"import sys, keras_freetickets.{module}\n"
        "heavy = sorted({'tensorflow', 'keras'} & set(sys.modules))\n"
        "assert not heavy, f'imported {heavy}'"
    )
    assert result.returncode == 0, result.stderr


def test_every_module_parses():
    modules = sorted((ROOT / "keras_freetickets").glob("**/*.py"))
    assert modules, "no modules found in keras_freetickets/"
    for path in modules:
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
