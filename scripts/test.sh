#!/usr/bin/env bash
# Runs the keras_freetickets test suite: setup, Bazel checks, then pytest.
#
#   bash scripts/test.sh                  # everything
#   bash scripts/test.sh -m "not slow"    # extra arguments go to pytest
#   bash scripts/test.sh tests/test_distributions.py -x
#   KFT_TEST_WORKERS=0 bash scripts/test.sh   # pytest in one process
#
# Bazel (when installed) runs first: `bazel query //...`, then `bazel test`
# of the py_test targets whose tags match KFT_BAZEL_TAG_FILTERS (default
# `pure_python`: the fast modules; set it to `tensorflow` or `pytest` for
# more). KFT_SKIP_BAZEL=1 skips Bazel. A Bazel that cannot start on this
# machine is reported and skipped; a failing query or test fails the run.
# pytest runs the test files on KFT_TEST_WORKERS processes (default 2, through
# pytest-xdist, one file per process at a time so that module fixtures run
# once): the suite spends most of its time in one Python thread, so two
# processes on two cores take about half the time. 0 or 1 runs one process,
# and so does an explicit `-n`/`-p no:xdist` among the arguments (theirs
# wins), or `--pdb`, `--trace`, `-s` (they need the test in this terminal).
# The exit status is non-zero when any step fails, and pytest's own "no tests
# ran" status (5) counts as a failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Checked before the setup and the Bazel checks, which take minutes.
workers="${KFT_TEST_WORKERS:-2}"
if ! [[ "$workers" =~ ^[0-9]+$ || "$workers" == auto ]]; then
  echo "[test] ERROR: KFT_TEST_WORKERS must be a whole number of processes" \
       "or 'auto'. Received: KFT_TEST_WORKERS=$workers" >&2
  exit 2
fi

bash scripts/setup.sh

export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export KERAS_BACKEND="${KERAS_BACKEND:-tensorflow}"

# --- Bazel ------------------------------------------------------------------------
bazel_rc=0
if [[ "${KFT_SKIP_BAZEL:-0}" == 1 ]]; then
  echo "[test] KFT_SKIP_BAZEL=1: skipping Bazel"
elif ! command -v bazel >/dev/null 2>&1; then
  echo "[test] bazel not installed (apt-get install bazel-bootstrap): skipping Bazel checks"
elif ! bazel info release >/dev/null; then
  echo "[test] WARNING: bazel is installed but cannot start here: skipping Bazel checks" >&2
else
  tag_filters="${KFT_BAZEL_TAG_FILTERS-pure_python}"
  echo "[test] bazel query //..."
  if ! bazel query //... ; then
    echo "[test] ERROR: bazel query //... failed" >&2
    bazel_rc=1
  else
    echo "[test] bazel test --test_tag_filters=$tag_filters //..."
    if ! bazel test --nocache_test_results --test_tag_filters="$tag_filters" \
        --test_summary=short //... ; then
      echo "[test] ERROR: bazel test failed" >&2
      bazel_rc=1
    fi
  fi
  if [[ -n "${CI:-}" ]]; then
    bazel shutdown || true
  fi
fi

# --- pytest -----------------------------------------------------------------------
# Run the whole tests/ folder unless a test path was given.
pytest_args=("$@")
has_path=0
for arg in "$@"; do
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
    has_path=1
  fi
done
if [[ "$has_path" == 0 ]]; then
  pytest_args=(tests "$@")
fi
own_workers=0
for arg in "$@"; do
  case "$arg" in
    -n|-n*|--numprocesses|--numprocesses=*|no:xdist|-pno:xdist) own_workers=1 ;;
    # The debugger and live output need the test in this terminal's process.
    --pdb|--trace|-s|--capture=no) own_workers=1 ;;
  esac
done
if [[ "$own_workers" == 0 && "$workers" != 0 && "$workers" != 1 ]]; then
  if .venv/bin/python -c "import xdist" 2>/dev/null; then
    pytest_args+=(-n "$workers" --dist loadfile)
  else
    echo "[test] pytest-xdist is not installed: pytest runs in one process"
  fi
fi

echo "[test] .venv/bin/python -m pytest -q ${pytest_args[*]}"
pytest_rc=0
.venv/bin/python -m pytest -q "${pytest_args[@]}" || pytest_rc=$?

if [[ "$pytest_rc" == 5 ]]; then
  echo "[test] ERROR: pytest collected no tests" >&2
fi
if [[ "$bazel_rc" != 0 ]]; then
  echo "[test] ERROR: the Bazel checks above failed" >&2
fi
if [[ "$pytest_rc" != 0 ]]; then
  exit "$pytest_rc"
fi
exit "$bazel_rc"
