#!/usr/bin/env bash
# Every stage side by side with PyTorch eager (issue 17): the same computation, the same
# weights, the same thread count, in one run. The reference side (scripts/dev/bench_reference.py:
# transformers' LLaMA, diffusers' U-Net and VAE, the visual tokenizer and LaVIT's text -> image
# generation in eager PyTorch of our own) builds tiny and mid-size modules with seeded
# random weights, saves them with their inputs and outputs, and times them; then lavit's bench
# (benches/stages.rs) loads the same folders, checks its outputs against theirs and times the
# same calls. One line per measurement:
#   bench NAME lavit_ms torch_ms ratio
#   bash scripts/bench.sh [OUT] [THREADS]      (OUT: target/stage-bench, THREADS: 2; ROUNDS=2;
#                                               ONLY=llm: one stage, both sides)
# Needs the venv's torch plus transformers, diffusers and sentencepiece (installed here if
# missing). On a GPU at the official sizes: scripts/gpu-bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/stage-bench}
THREADS=${2:-2}
PY=.venv/bin/python
"$PY" -c 'import transformers, diffusers, safetensors, sentencepiece' 2>/dev/null ||
  .venv/bin/pip install --quiet --disable-pip-version-check \
    "transformers==4.57.1" "diffusers==0.35.2" safetensors "sentencepiece==0.2.3"
cargo bench --quiet --bench stages --no-run
# The two sides alternate ROUNDS times (a shared machine's noise hits both alike); each side's
# time is its best over the rounds (each round: best of 8-20 calls, decoding best of 5 runs).
ROUNDS=${ROUNDS:-2}
rm -f "$OUT"/lavit.round-*.txt
for r in $(seq "$ROUNDS"); do
  PYTHONWARNINGS=ignore "$PY" scripts/dev/bench_reference.py "$OUT" --threads "$THREADS" \
    ${ONLY:+--stages "$ONLY"} >/dev/null
  cargo bench --quiet --bench stages -- "$OUT" --threads "$THREADS" ${ONLY:+--only "$ONLY"} \
    >"$OUT/lavit.round-$r.txt"
done
grep -h '^check' "$OUT/lavit.round-1.txt"
# bench NAME lavit_ms torch_ms ratio, over the rounds' lines
cat "$OUT"/lavit.round-*.txt | awk '$1 == "bench" {
  if (!($2 in l) || $3 < l[$2]) l[$2] = $3
  if (!($2 in t) || $4 < t[$2]) t[$2] = $4
  if (!($2 in seen)) { seen[$2] = 1; order[n++] = $2 }
} END { for (i = 0; i < n; i++) { k = order[i]; printf "bench %s %.3f %.3f %.2f\n", k, l[k], t[k], l[k] / t[k] } }'
