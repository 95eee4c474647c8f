#!/usr/bin/env bash
# The main job: set up the checkout, then train a short EDST ensemble (M=3, one
# run of 4 exploration + 3 x 2 refinement epochs, MLP at sparsity 0.8, ERK,
# RigL) on the offline Fashion-MNIST, train a single dense MLP for the same 10
# epochs, evaluate both on the test set and the OOD sets, print the metrics
# table and write results.json and the PNG plots. A few minutes on 2 CPU cores.
#
#   bash scripts/demo.sh                          # outputs in runs/demo
#   KFT_DEMO_DIR=/tmp/demo bash scripts/demo.sh   # elsewhere
#   bash scripts/demo.sh --model=cnn --sparsity=0.9   # extra flags pass through
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
OUT="${KFT_DEMO_DIR:-runs/demo}"

echo "[demo] .venv/bin/python examples/train_edst_ensemble.py --output_dir=$OUT" \
     "--exploration_epochs=4 --refinement_epochs=2 --num_members=3 $*"
exec .venv/bin/python examples/train_edst_ensemble.py --output_dir="$OUT" \
    --exploration_epochs=4 --refinement_epochs=2 --num_members=3 "$@"
