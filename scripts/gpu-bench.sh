#!/usr/bin/env bash
# The official-size stages side by side with the official PyTorch path on a GPU (issue 17):
# LaVIT-7B-v2's sizes with random weights in bf16 (LLaMA-7B with the 48,386-row vocabulary:
# prefill, decode at batch 1 and 2, and one image token with CFG, which PyTorch runs as two
# batch-1 forwards as the official code does; SDXL's U-Net at 1024 px and SD-1.5's at 512 px,
# one CFG step each; SDXL's VAE decoding 1024 px in float32, as the official pipeline
# upcasts it; EVA-CLIP-G + the merger + the quantizer on 1 and 64 images), the same files,
# inputs and outputs for both sides. Prints the `bench NAME lavit_ms torch_ms ratio` lines of
# scripts/bench.sh, with weight-only int8 and int4 (group 128) decoding at batch 1
# (`llm_decode_b1_official_int8` / `_int4`: lavit's quantised LLM against PyTorch's bf16
# decoding, and a `check` line with the share of greedy tokens equal to the bf16 model's; a
# kernel the device lacks prints `check ... failed` and the run goes on).
#
# Two steps, because the GPU machine has no cargo and no network:
#   here:   bash scripts/gpu-bench.sh --prepare
#           builds the stage bench in release into .gpu/stages (stripped; libtorch stays a
#           shared library) and downloads the diffusers wheel (absent there) into .gpu/whl
#   there:  bash scripts/gpu-bench.sh [OUT]          (OUT: /tmp/gpu-bench)
#           with the device tool: run(command="bash scripts/gpu-bench.sh", carry=[".gpu"],
#           timeout_s=580); the PyTorch side writes the folders to OUT and times itself
#           (at most 5 min), then lavit's side loads them, checks its outputs against
#           PyTorch's and times the same calls (at most 4 min; the LLM is loaded three more
#           times for the int8 and int4 lines).
# Settings: DEVICE (cuda), DTYPE (bf16), SIZE (official), PYTHON (python3). With DEVICE=cpu
# SIZE=tiny it runs on any machine (a check of the script itself).
# Serving under load at the official size: `bash scripts/gpu-bench.sh --load [DIR]` (below;
# --prepare also copies the release `lavit` binary into .gpu).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  cargo bench --quiet --bench stages --no-run
  cargo build --quiet --release --bin lavit
  exe=$(ls -t target/release/deps/stages-* | grep -v '\.d$' | head -1)
  mkdir -p .gpu/whl
  cp "$exe" .gpu/stages
  strip .gpu/stages
  cp target/release/lavit .gpu/lavit
  strip .gpu/lavit
  # the versions bench.sh uses here; the GPU machine has transformers, safetensors and
  # huggingface_hub but neither diffusers nor importlib_metadata
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 -d .gpu/whl \
    "diffusers==0.35.2" "importlib_metadata==8.7.0"
  du -sh .gpu
  exit 0
fi

if [ "${1:-}" = "--load" ]; then
  # Continuous batching at the official size (issue 28): `lavit serve` on a LaVIT-7B-v2-shaped
  # folder of random bf16 weights (scripts/dev/lavit_files.py, written once into DIR), every
  # stage on cuda:0, text → image at 1, 8 and 32 in flight. Prints per concurrency
  # `gpu_load t2i c=C images_per_min=X llm_tokens_per_s=Y p50_s=A p95_s=B ok=K http_5xx=E`
  # (LLM tokens from the server's lavit_llm_tokens_total) and `gpu_scaling images_per_min
  # c32/c1 = X`, at the decoder's native 1024 px. Settings: STEPS (diffusion steps, 25),
  # PYTHON.
  #   with the device tool: run(command="bash scripts/gpu-bench.sh --load", carry=[".gpu"],
  #   timeout_s=600)
  DIR=${2:-/tmp/lavit-7b-random}
  PY=${PYTHON:-python3}
  STEPS=${STEPS:-25}
  [ -x .gpu/lavit ] || { echo "no .gpu/lavit: run 'bash scripts/gpu-bench.sh --prepare' first" >&2; exit 1; }
  TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  if [ ! -d "$DIR/language_model" ]; then
    PYTHONWARNINGS=ignore "$PY" scripts/dev/lavit_files.py "$DIR"
  fi
  LOG=$(mktemp)
  env LAVIT__PIPELINE__DTYPE=bf16 LAVIT__PIPELINE__MAX_IN_FLIGHT=64 LAVIT__PIPELINE__MAX_QUEUE=256 \
    LAVIT__PIPELINE__PLACEMENT__ENCODER=cuda:0 LAVIT__PIPELINE__PLACEMENT__SELECTOR_MERGER=cuda:0 \
    LAVIT__PIPELINE__PLACEMENT__QUANTIZER=cuda:0 LAVIT__PIPELINE__PLACEMENT__LLM=cuda:0 \
    LAVIT__PIPELINE__PLACEMENT__DECODER=cuda:0 LAVIT__PIPELINE__BATCHING__KV_CACHE_MIB=24576 \
    LAVIT__PIPELINE__BATCHING__LLM_MAX_SEQS=128 LAVIT__PIPELINE__BATCHING__DECODER_MAX_BATCH=32 \
    LAVIT__SERVER__MAX_N=4 LAVIT__SERVER__MAX_REQUEST_COST=100000 RUST_LOG=warn \
    .gpu/lavit serve --checkpoint "$DIR" --bind 127.0.0.1:0 >"$LOG" 2>&1 &
  PID=$!
  trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true' EXIT
  URL=
  for _ in $(seq 900); do
    URL=$(grep -o 'http://[0-9.:]*' "$LOG" | head -1 || true)
    if [ -n "$URL" ] && curl -sf "$URL/ready" >/dev/null 2>&1; then break; fi
    kill -0 "$PID" 2>/dev/null || { cat "$LOG" >&2; exit 1; }
    sleep 0.5
  done
  tokens() { curl -sf "$URL/metrics" | awk '/^lavit_llm_tokens_total/ {print $2}'; }
  declare -A IPM
  for c in 1 8 32; do
    n=$(( c == 1 ? 2 : c ))
    t0=$(tokens)
    line=$("$PY" scripts/dev/load_client.py "$URL" t2i "$c" "$n" --steps "$STEPS")
    t1=$(tokens)
    rps=$(sed -E 's/.* rps=([0-9.]+).*/\1/' <<<"$line")
    rest=$(sed -E 's/.* (p50_s=.*)/\1/' <<<"$line")
    IPM[$c]=$(awk -v r="$rps" 'BEGIN { printf "%.2f", r * 60 }')
    awk -v c="$c" -v r="$rps" -v n="$n" -v a="$t0" -v b="$t1" -v rest="$rest" \
      'BEGIN { printf "gpu_load t2i c=%d images_per_min=%.2f llm_tokens_per_s=%.0f %s\n", c, r * 60, (b - a) * r / n, rest }'
  done
  awk -v a="${IPM[1]}" -v b="${IPM[32]}" 'BEGIN { printf "gpu_scaling images_per_min c32/c1 = %.2f\n", b / a }'
  exit 0
fi

OUT=${1:-/tmp/gpu-bench}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
SIZE=${SIZE:-official}
PY=${PYTHON:-python3}
[ -x .gpu/stages ] || { echo "no .gpu/stages: run 'bash scripts/gpu-bench.sh --prepare' first" >&2; exit 1; }
if ! "$PY" -c 'import diffusers' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-bench-site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/gpu-bench-site${PYTHONPATH:+:$PYTHONPATH}
fi
# lavit's binary links the libtorch of the machine's PyTorch (the same version, 2.11)
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
THREADS=$(nproc)
rm -rf "$OUT"
PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore timeout 300 "$PY" scripts/dev/bench_reference.py "$OUT" \
  --only "$SIZE" --device "$DEVICE" --dtype "$DTYPE" --threads "$THREADS" 2>&1 | grep -v 'it/s\]'
timeout 240 .gpu/stages "$OUT" --device "$DEVICE" --dtype "$DTYPE" --threads "$THREADS" |
  tee "$OUT/lavit.txt"
