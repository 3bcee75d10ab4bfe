#!/usr/bin/env bash
# Every stage side by side with PyTorch eager (issue 17): the same computation, the same
# weights, the same thread count, in one run. The reference side (scripts/dev/bench_reference.py:
# transformers' LLaMA, diffusers' U-Net and VAE) builds tiny and mid-size modules with seeded
# random weights, saves them with their inputs and outputs, and times them; then lavit's bench
# (benches/stages.rs) loads the same folders, checks its outputs against theirs and times the
# same calls. One line per measurement:
#   bench NAME lavit_ms torch_ms ratio
#   bash scripts/bench.sh [OUT] [THREADS]      (OUT: target/stage-bench, THREADS: 2)
# Needs the venv's torch plus transformers and diffusers (installed here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/stage-bench}
THREADS=${2:-2}
PY=.venv/bin/python
"$PY" -c 'import transformers, diffusers, safetensors' 2>/dev/null ||
  .venv/bin/pip install --quiet --disable-pip-version-check \
    "transformers==4.57.1" "diffusers==0.35.2" safetensors
cargo bench --quiet --bench stages --no-run
PYTHONWARNINGS=ignore "$PY" scripts/dev/bench_reference.py "$OUT" --threads "$THREADS"
cargo bench --quiet --bench stages -- "$OUT" --threads "$THREADS"
