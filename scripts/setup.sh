#!/usr/bin/env bash
# Sets up a checkout of keras_freetickets; safe to run again at any time.
#
#   1. Fashion-MNIST from Debian's `dataset-fashion-mnist` (needs root or
#      password-less sudo; without it the data-dependent tests are skipped).
#   2. A virtualenv at .venv, made with $KFT_PYTHON (default: python3).
#   3. `pip install -e .[$KFT_EXTRAS]` into it (default extras:
#      cpu,test,datasets,plots), skipped while setup.py and the extras are
#      unchanged since the last successful install (KFT_FORCE_INSTALL=1 forces it).
#   4. The compiled ops (`python -m keras_freetickets.native build`,
#      g++; into $KFT_NATIVE_DIR or ~/.cache/keras_freetickets), once per
#      machine, TensorFlow version and source; a warning where it fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${KFT_PYTHON:-python3}"
EXTRAS="${KFT_EXTRAS:-cpu,test,datasets,plots}"
VENV="$ROOT/.venv"
FMNIST_DIR=/usr/share/datasets/fashion-mnist
FMNIST_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
              t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

log() { echo "[setup] $*"; }
warn() { echo "[setup] WARNING: $*" >&2; }

# --- 1. Fashion-MNIST -------------------------------------------------------
have_fmnist() {
  local f
  for f in "${FMNIST_FILES[@]}"; do
    [[ -f "$FMNIST_DIR/$f" ]] || return 1
  done
}

# Prints the command prefix that runs apt-get as root, or fails.
root_prefix() {
  if [[ "$(id -u)" == 0 ]]; then
    echo ""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    echo "sudo -n"
  else
    return 1
  fi
}

apt_install() {
  local prefix
  prefix="$(root_prefix)" || return 1
  command -v apt-get >/dev/null 2>&1 || return 1
  export DEBIAN_FRONTEND=noninteractive
  # Try the current package lists first; refresh them only when that fails.
  $prefix apt-get install -y -qq "$@" >/dev/null 2>&1 && return 0
  $prefix apt-get update -qq && $prefix apt-get install -y -qq "$@"
}

if have_fmnist; then
  log "Fashion-MNIST found in $FMNIST_DIR"
elif ! root_prefix >/dev/null || ! command -v apt-get >/dev/null 2>&1; then
  warn "Fashion-MNIST is missing and this shell cannot run apt-get as root."
  warn "Install it with: sudo apt-get install dataset-fashion-mnist"
  warn "(tests that need it are skipped until then)"
else
  log "installing dataset-fashion-mnist with apt-get"
  if apt_install dataset-fashion-mnist && have_fmnist; then
    log "Fashion-MNIST installed in $FMNIST_DIR"
  else
    warn "could not install dataset-fashion-mnist; tests that need it are skipped"
  fi
fi

# --- 2. virtualenv --------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
  log "using $VENV ($("$VENV/bin/python" --version 2>&1))"
else
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "[setup] ERROR: interpreter '$PYTHON' not found; set KFT_PYTHON to a Python >= 3.9" >&2
    exit 1
  fi
  if ! "$PYTHON" -c "import sys; sys.exit(sys.version_info < (3, 9))"; then
    echo "[setup] ERROR: $PYTHON is $("$PYTHON" --version 2>&1); keras-freetickets needs Python >= 3.9" >&2
    exit 1
  fi
  log "creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi

# --- 3. editable install ----------------------------------------------------------
STAMP="$VENV/.kft-install-stamp"
want_stamp="$(cat setup.py | sha256sum | cut -d' ' -f1) extras=$EXTRAS root=$ROOT"
installed_here() {
  # The editable install must point at this checkout.
  (cd / && "$VENV/bin/python" -c "
import os, sys, keras_freetickets
sys.exit(os.path.dirname(os.path.realpath(keras_freetickets.__file__))
         != os.path.realpath(sys.argv[1]))" "$ROOT/keras_freetickets") >/dev/null 2>&1
}

if [[ "${KFT_FORCE_INSTALL:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] \
    && installed_here; then
  log "keras-freetickets[$EXTRAS] already installed in $VENV"
else
  log "pip install -e .[$EXTRAS] (first run downloads TensorFlow; a few minutes)"
  rm -f "$STAMP"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e ".[$EXTRAS]"
  # tensorflow-serving-api declares a dependency on the full `tensorflow`,
  # which tensorflow-cpu does not satisfy: install it without dependencies
  # (it needs only protobuf and grpcio, which TensorFlow brings). The export
  # tests use its request protos.
  if [[ ",$EXTRAS," == *",test,"* ]]; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps \
      "tensorflow-serving-api>=2.16" \
      || echo "[setup] WARNING: tensorflow-serving-api not installed; its tests will skip" >&2
  fi
  installed_here || { echo "[setup] ERROR: keras_freetickets is not importable from $VENV" >&2; exit 1; }
  echo "$want_stamp" > "$STAMP"
  log "installed keras-freetickets[$EXTRAS] into $VENV"
fi

# --- 4. the compiled ops ------------------------------------------------------------
# Faster mask updates on CPU, the same masks, and the sparse convolution for
# ensemble inference (keras_freetickets/native.py). Built once per machine,
# TensorFlow version and source; without a C++ compiler the library uses
# TensorFlow's ops.
build_log="$(mktemp)"
if built="$(cd / && TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/python" -m keras_freetickets.native build 2>"$build_log")"; then
  while read -r line; do log "compiled: ${line#built }"; done <<< "$built"
  if grep -q "keras_freetickets" "$build_log"; then
    warn "the sparse convolution was not built (ensembles use TensorFlow's convolution):"
    grep "keras_freetickets" "$build_log" | tail -5 >&2 || true
  fi
  rm -f "$build_log"
else
  warn "the compiled selection op was not built (mask updates use TensorFlow's ops):"
  # The op's own message (not TensorFlow's start-up lines), else the tail.
  grep "keras_freetickets" "$build_log" >&2 \
    || tail -5 "$build_log" >&2 || true
  rm -f "$build_log"
fi
