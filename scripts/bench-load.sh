#!/usr/bin/env bash
# Real-size load memory (issue 17), random weights written once, loaded in bf16:
#   bash scripts/bench-load.sh [DIR] [LAYERS]
#     a LLaMA-2-7B-shaped Hugging Face folder (DIR: target/llama-bench-<LAYERS>; LAYERS 32 =
#     13.5 GB; fewer layers keep every other shape), loaded by lavit and by transformers'
#     from_pretrained in the same run; prints, per loader, the wall time and the peak RSS the
#     load added over the weight bytes, then `bench llama_load_bf16 lavit_ms torch_ms ratio`.
#   bash scripts/bench-load.sh --pipeline [DIR] [LLM_LAYERS]
#     a LaVIT-7B-v2-shaped checkpoint folder (scripts/dev/lavit_files.py; DIR:
#     target/lavit-bench-<LLM_LAYERS>, LLM_LAYERS 32 = 24.3 GB), loaded as `lavit serve` loads
#     it (every stage, dtype bf16), then one tokenize, caption and generate request, which use
#     every weight; prints the load time and the peak RSS over the bytes of the files it reads.
# Needs the venv's torch plus transformers, safetensors (and diffusers for --pipeline),
# installed here if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ "${1:-}" = "--pipeline" ]; then
  LAYERS=${3:-32}
  DIR=${2:-target/lavit-bench-$LAYERS}
  "$PY" -c 'import diffusers, safetensors' 2>/dev/null ||
    .venv/bin/pip install --quiet --disable-pip-version-check "diffusers==0.35.2" safetensors
  [ -f "$DIR/language_model/config.json" ] ||
    PYTHONWARNINGS=ignore "$PY" scripts/dev/lavit_files.py "$DIR" --llm-layers "$LAYERS"
  cargo bench --quiet --bench load --no-run
  ours=$(cargo bench --quiet --bench load -- pipeline "$DIR")
  echo "$ours"
  field() { sed -n "s/.*$1=\([0-9]*\).*/\1/p" <<<"$2"; }
  awk -v ms="$(field ms "$ours")" -v p="$(field peak_over_baseline "$ours")" \
      -v w="$(field weights "$ours")" 'BEGIN {
    printf "pipeline (bf16): load %.0f ms; weights read %.2f GB; peak RSS %.2f GB = %.2fx the weights\n", ms, w / 1e9, p / 1e9, p / w
  }'
  exit 0
fi
LAYERS=${2:-32}
DIR=${1:-target/llama-bench-$LAYERS}
"$PY" -c 'import transformers, safetensors' 2>/dev/null ||
  .venv/bin/pip install --quiet --disable-pip-version-check "transformers==4.57.1" safetensors
[ -f "$DIR/config.json" ] || "$PY" scripts/dev/llama_files.py "$DIR" --layers "$LAYERS"
cargo bench --quiet --bench load --no-run
ours=$(cargo bench --quiet --bench load -- llama "$DIR")
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
