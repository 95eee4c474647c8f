"""Checks of `scripts/test.sh` that run before its setup step.

The script validates its settings first, so that a typo fails in a second
rather than after minutes of setup and Bazel checks.
"""

import os
import pathlib
import subprocess

import pytest

# Not resolve(): under Bazel the runfiles tree is made of symlinks.
ROOT = pathlib.Path(__file__).absolute().parent.parent


@pytest.mark.parametrize("workers", ["two", "-1", "1.5", "2 --dist=no"])
def test_a_bad_worker_count_fails_before_setup(workers):
    env = dict(os.environ, KFT_TEST_WORKERS=workers)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "test.sh")], capture_output=True,
        text=True, cwd=ROOT, env=env, timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"Received: KFT_TEST_WORKERS={workers}" in result.stderr
    # Nothing ran: neither the setup nor Bazel nor pytest printed a line.
    assert "[setup]" not in result.stdout + result.stderr
    assert "[test] .venv/bin/python -m pytest" not in result.stdout
