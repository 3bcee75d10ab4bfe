#!/usr/bin/env bash
# The official-size stages side by side with the official PyTorch path on a GPU (issue 17):
# LaVIT-7B-v2's sizes with random weights in bf16 (LLaMA-7B with the 48,386-row vocabulary:
# prefill, decode at batch 1 and 2, and one image token with CFG, which PyTorch runs as two
# batch-1 forwards as the official code does; SDXL's U-Net at 1024 px and SD-1.5's at 512 px,
# one CFG step each; SDXL's VAE decoding 1024 px in float32, as the official pipeline
# upcasts it; EVA-CLIP-G + the merger + the quantizer on 1 and 64 images), the same files,
# inputs and outputs for both sides. Prints the `bench NAME lavit_ms torch_ms ratio` lines of
# scripts/bench.sh.
#
# Two steps, because the GPU machine has no cargo and no network:
#   here:   bash scripts/gpu-bench.sh --prepare
#           builds the stage bench in release into .gpu/stages (stripped; libtorch stays a
#           shared library) and downloads the diffusers wheel (absent there) into .gpu/whl
#   there:  bash scripts/gpu-bench.sh [OUT]          (OUT: /tmp/gpu-bench)
#           with the device tool: run(command="bash scripts/gpu-bench.sh", carry=[".gpu"],
#           timeout_s=480); the PyTorch side writes the folders to OUT and times itself
#           (at most 5 min), then lavit's side loads them, checks its outputs against
#           PyTorch's and times the same calls (at most 3 min).
# Settings: DEVICE (cuda), DTYPE (bf16), SIZE (official), PYTHON (python3). With DEVICE=cpu
# SIZE=tiny it runs on any machine (a check of the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  cargo bench --quiet --bench stages --no-run
  exe=$(ls -t target/release/deps/stages-* | grep -v '\.d$' | head -1)
  mkdir -p .gpu/whl
  cp "$exe" .gpu/stages
  strip .gpu/stages
  # the versions bench.sh uses here; the GPU machine has transformers, safetensors and
  # huggingface_hub but neither diffusers nor importlib_metadata
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 -d .gpu/whl \
    "diffusers==0.35.2" "importlib_metadata==8.7.0"
  du -sh .gpu
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
timeout 180 .gpu/stages "$OUT" --device "$DEVICE" --dtype "$DTYPE" --threads "$THREADS" |
  tee "$OUT/lavit.txt"
