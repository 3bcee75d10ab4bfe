#!/usr/bin/env bash
# The README's main job: install the data, then train the whole LaVIT pipeline on Fashion-MNIST
# on the CPU and write the report (demo-out/report/index.html) and the checkpoint folder
# (demo-out/checkpoint). Extra arguments go to `lavit demo` (e.g. --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --data
cargo run --release -- demo "$@"
