#!/usr/bin/env bash
# Check lavit against the official PyTorch code on a checkpoint folder that carries reference
# outputs (default: the shared tiny fixture beside the repository): inspect its files, then
# recompute every reference tensor and compare (`lavit parity`).
#   bash scripts/parity.sh [CHECKPOINT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-../shared/fixtures/tiny-lavit}
bash scripts/setup.sh
cargo run --quiet --release --bin lavit -- inspect "$DIR/language_model" | tail -n 1
exec cargo run --quiet --release --bin lavit -- parity "$DIR"
