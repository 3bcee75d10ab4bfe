#!/usr/bin/env bash
# Data-parallel smoke test of the real CLI: `lavit train decoder` as 2 ranks under the venv's
# torchrun (Gloo on 127.0.0.1), against 1 rank with twice the per-rank batch, 10 steps each
# from the same seed. The two runs must end with the same parameters (≤ 1e-5 relative, L2).
# Prints the step rate of both and the 2-rank run's share of time in collectives, and, last:
#   ddp: 2 ranks vs 1 rank, max relative parameter difference X
# Needs scripts/setup.sh --data (the photos) and a built binary (LAVIT=…, default
# target/debug/lavit, built when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
LAVIT=${LAVIT:-target/debug/lavit}
[ -x "$LAVIT" ] || cargo build --quiet --bin lavit
PY=.venv/bin/python
TORCHRUN=.venv/bin/torchrun
STEPS=${STEPS:-10}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The tiny decoder config with this run's steps, per-rank batch and folder.
config() { # out_dir batch
  sed -e "s|^out_dir = .*|out_dir = \"$1\"|" \
      -e "s|^steps = .*|steps = $STEPS|" \
      -e "s|^batch_size = .*|batch_size = $2|" \
      -e "s|^save_every = .*|save_every = $STEPS|" \
      -e "s|^sample_every = .*|sample_every = 0|" \
      -e "s|^log_every = .*|log_every = 1|" \
      configs/train-decoder-tiny.toml
}
config "$tmp/two" 8 > "$tmp/two.toml"
config "$tmp/one" 16 > "$tmp/one.toml"

echo "ddp-smoke: 2 ranks × batch 8 under torchrun (Gloo)"
OMP_NUM_THREADS=1 "$TORCHRUN" --standalone --nproc_per_node=2 --no-python \
  "$LAVIT" train decoder --config "$tmp/two.toml" > "$tmp/two.json"
echo "ddp-smoke: 1 rank × batch 16"
OMP_NUM_THREADS=1 "$LAVIT" train decoder --config "$tmp/one.toml" > "$tmp/one.json"

"$PY" - "$tmp" "$STEPS" <<'PYEOF'
import json, struct, sys, pathlib
import torch

tmp, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
DT = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16, "F16": torch.float16,
      "I64": torch.int64, "I32": torch.int32}

def read(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    out = {}
    for k, v in head.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        buf = bytearray(raw[8 + n + a:8 + n + b])
        out[k] = torch.frombuffer(buf, dtype=DT[v["dtype"]]).reshape(v["shape"]).double()
    return out

def summary(name):
    return json.loads((tmp / f"{name}.json").read_text())

step = f"step-{steps:08d}"
# ‖θ₂ − θ₁‖ / ‖θ₁‖ over the U-Net and its EMA copy (see tests/dist.rs for why not element-wise).
num = den = 0.0
for part in ["model", "ema"]:
    a = read(tmp / "two" / "checkpoints" / step / f"{part}.safetensors")
    b = read(tmp / "one" / "checkpoints" / step / f"{part}.safetensors")
    assert a.keys() == b.keys(), part
    for k in b:
        num += ((a[k] - b[k]) ** 2).sum().item()
        den += (b[k] ** 2).sum().item()
worst = (num / den) ** 0.5
two, one = summary("two"), summary("one")
assert two["world_size"] == 2 and one["world_size"] == 1, (two["world_size"], one["world_size"])
r2, r1 = steps / two["loop_seconds"], steps / one["loop_seconds"]
print(f"ddp-smoke: 2 ranks × batch 8: {r2:.2f} steps/s ({100 * two['comm_seconds'] / two['loop_seconds']:.0f} % in collectives); "
      f"1 rank × batch 16: {r1:.2f} steps/s; speed-up {r2 / r1:.2f}×")
print(f"ddp: 2 ranks vs 1 rank, max relative parameter difference {worst:.2e}")
sys.exit(0 if worst <= 1e-5 else 1)
PYEOF
