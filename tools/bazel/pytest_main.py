"""Runs one pytest module as a Bazel `py_test`.

Bazel executes `main` as a script, while the project's tests are pytest
modules; this entry point hands the module paths given as `args` to pytest,
writes the JUnit XML that `bazel test` collects, and keeps pytest's and
Hypothesis' caches in the test's scratch directory instead of the read-only
runfiles tree.
"""

import os
import sys


def main(argv):
    tmpdir = os.environ.get("TEST_TMPDIR")
    if tmpdir:
        os.environ.setdefault(
            "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tmpdir, ".hypothesis")
        )
        os.environ.setdefault("MPLCONFIGDIR", os.path.join(tmpdir, "matplotlib"))
    import pytest

    args = ["-q", "-p", "no:cacheprovider"]
    xml_output = os.environ.get("XML_OUTPUT_FILE")
    if xml_output:
        args.append("--junitxml=" + xml_output)
    shard_filter = os.environ.get("TESTBRIDGE_TEST_ONLY")
    if shard_filter:
        args.extend(["-k", shard_filter])
    return pytest.main(args + list(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
