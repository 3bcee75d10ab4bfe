#!/usr/bin/env bash
# Serving under load (issue 28): starts `lavit serve` on a checkpoint and sends N requests at
# concurrency 1, 4 and 16 for text → image, captions and a mix of the two; then 64 in flight
# for the resident memory.
#
#   bash scripts/load-bench.sh [CHECKPOINT]        (default: the quick/full demo's checkpoint
#                                                   at target/demo/checkpoint)
#
# Prints, per kind and concurrency, `load KIND c=C rps=R p50_s=A p95_s=B n=N ok=K http_5xx=E
# other=O` (scripts/dev/load_client.py), then `scaling KIND c16/c1 = X` (requests per second
# at 16 in flight over one at a time) and `rss c=1 MB=… c=64 MB=… ratio=…` (the server's
# resident set after a run at 1 and at 64 in flight).
#
# Settings (environment): LAVIT_BIN (the binary; default target/release/lavit — build it
# with `cargo build --release`), N (requests per line, default 48), CONCURRENCY ("1 4 16"),
# KINDS ("t2i caption mix"), STEPS (diffusion steps of text → image; default: the
# checkpoint's), IMAGE (a PNG to caption; default: a synthetic one), EXTRA_ENV (more
# `LAVIT__…` overrides, e.g. "LAVIT__PIPELINE__BATCHING__MAX_WAIT_MS=0").
# Admission is opened to 64 in flight and a queue of 256 (LAVIT__PIPELINE__MAX_IN_FLIGHT /
# MAX_QUEUE), the same for any binary, so a binary from before continuous batching can be
# measured with the same script.
set -euo pipefail
cd "$(dirname "$0")/.."

CKPT=${1:-target/demo/checkpoint}
BIN=${LAVIT_BIN:-target/release/lavit}
N=${N:-48}
CONCURRENCY=${CONCURRENCY:-"1 4 16"}
KINDS=${KINDS:-"t2i caption mix"}
PY=${PYTHON:-python3}
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release (or set LAVIT_BIN)" >&2; exit 1; }
[ -d "$CKPT" ] || { echo "no checkpoint folder $CKPT" >&2; exit 1; }
if [ -d .venv ]; then
  TORCH_LIB=$(ls -d .venv/lib/python3*/site-packages/torch/lib 2>/dev/null | head -1 || true)
  [ -n "$TORCH_LIB" ] && export LD_LIBRARY_PATH=$PWD/$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

LOG=$(mktemp)
# shellcheck disable=SC2086
env LAVIT__PIPELINE__MAX_IN_FLIGHT=64 LAVIT__PIPELINE__MAX_QUEUE=256 \
  LAVIT__SERVER__MAX_N=4 RUST_LOG=warn ${EXTRA_ENV:-} \
  "$BIN" serve --checkpoint "$CKPT" --bind 127.0.0.1:0 >"$LOG" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -f "$LOG"' EXIT
URL=
for _ in $(seq 600); do
  URL=$(grep -o 'http://[0-9.:]*' "$LOG" | head -1 || true)
  if [ -n "$URL" ] && curl -sf "$URL/ready" >/dev/null 2>&1; then break; fi
  kill -0 "$PID" 2>/dev/null || { cat "$LOG" >&2; exit 1; }
  sleep 0.5
done
curl -sf "$URL/ready" >/dev/null || { echo "the server did not get ready" >&2; cat "$LOG" >&2; exit 1; }

rss_mb() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$PID/status"; }
client() { "$PY" scripts/dev/load_client.py "$URL" "$@" ${IMAGE:+--image "$IMAGE"} ${STEPS:+--steps "$STEPS"}; }

declare -A RPS
for kind in $KINDS; do
  client "$kind" 1 4 >/dev/null # warm the paths of this kind
  for c in $CONCURRENCY; do
    line=$(client "$kind" "$c" "$N")
    echo "$line"
    RPS[$kind.$c]=$(sed -E 's/.* rps=([0-9.]+).*/\1/' <<<"$line")
  done
done
for kind in $KINDS; do
  lo=${RPS[$kind.1]:-}
  hi=${RPS[$kind.16]:-}
  if [ -n "$lo" ] && [ -n "$hi" ]; then
    awk -v k="$kind" -v a="$lo" -v b="$hi" 'BEGIN { printf "scaling %s c16/c1 = %.2f\n", k, b / a }'
  fi
done
# Resident memory: the most the server holds while a run goes on (sampled every 0.1 s), one
# at a time and then 64 in flight.
peak_rss_during() {
  local f
  f=$(mktemp)
  ( while kill -0 "$PID" 2>/dev/null; do rss_mb >>"$f"; echo >>"$f"; sleep 0.1; done ) &
  local sampler=$!
  client "$@" >/dev/null
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  sort -n "$f" | tail -1
  rm -f "$f"
}
r1=$(peak_rss_during mix 1 16)
r64=$(peak_rss_during mix 64 128)
awk -v a="$r1" -v b="$r64" 'BEGIN { printf "rss c=1 MB=%d c=64 MB=%d ratio=%.2f\n", a, b, b / a }'
