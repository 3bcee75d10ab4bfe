#!/usr/bin/env bash
# The README's main job: install what is missing (libtorch into .venv, the Fashion-MNIST
# Debian package), build lavit in release mode, and run `lavit demo` — the whole LaVIT
# pipeline trained on real images on the CPU, then captioning and drawing, with an HTML
# report in demo-out/report/index.html. Extra arguments go to `lavit demo`
# (e.g. `bash scripts/demo.sh --quick`). Reaches no network beyond the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --data
exec cargo run --quiet --release --bin lavit -- demo "$@"
