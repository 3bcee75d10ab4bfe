#!/usr/bin/env bash
# Real-size load memory (issue 17): a LLaMA-2-7B-shaped Hugging Face folder in bf16 (random
# weights, written once), loaded by lavit and by transformers' from_pretrained in the same run.
#   bash scripts/bench-load.sh [DIR] [LAYERS]
# DIR defaults to target/llama-bench-<LAYERS>; LAYERS to 32 (13.5 GB of weights; fewer layers
# keep every other shape). Prints, per loader, the wall time and the peak RSS the load added
# over the weight bytes, then `bench llama_load_bf16 lavit_ms torch_ms ratio`.
# Needs the venv's torch plus transformers and safetensors (installed here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS=${2:-32}
DIR=${1:-target/llama-bench-$LAYERS}
PY=.venv/bin/python
"$PY" -c 'import transformers, safetensors' 2>/dev/null ||
  .venv/bin/pip install --quiet --disable-pip-version-check "transformers==4.57.1" safetensors
[ -f "$DIR/config.json" ] || "$PY" scripts/dev/llama_files.py "$DIR" --layers "$LAYERS"
cargo bench --quiet --bench llama_load --no-run
ours=$(cargo bench --quiet --bench llama_load -- "$DIR")
theirs=$("$PY" scripts/dev/llama_load_torch.py "$DIR")
echo "$ours"
echo "$theirs"
field() { sed -n "s/.*$1=\([0-9]*\).*/\1/p" <<<"$2"; }
awk -v lm="$(field ms "$ours")" -v tm="$(field ms "$theirs")" \
    -v lp="$(field peak_over_baseline "$ours")" -v tp="$(field peak_over_baseline "$theirs")" \
    -v w="$(field weights "$ours")" 'BEGIN {
  printf "bench llama_load_bf16 %.0f %.0f %.2f\n", lm, tm, lm / tm
  printf "peak RSS over the weight bytes: lavit %.2fx, transformers %.2fx (target <= 1.15x)\n", lp / w, tp / w
}'
