#!/usr/bin/env bash
# Issue 19's cross-machine check: `lavit demo --quick` on two CPU cores of this machine with the
# code-path variables of the "Reproducibility" section of docs/demo.md, so that its numbers can be set
# beside another machine's run of the same binary. Pinning to two cores (taskset) makes lavit see
# two cores, as on the 2-core machines docs/demo.md's numbers come from: stage 0 and the evaluation
# take both, the side-by-side stages one each.
#
#   bash scripts/dev/repro-quick.sh LAVIT_BINARY DATA_DIR OUT
#
# On a machine without cargo (the GPU machine), carry a stripped release `lavit` and the four
# Fashion-MNIST .gz files in a gitignored folder; the binary finds libtorch through
# LD_LIBRARY_PATH (set here from the project's .venv, or the machine's PyTorch).
# Prints the CPU, the time taken and report/metrics.json's accuracies.
set -euo pipefail
bin=${1:?lavit binary}
data=${2:?Fashion-MNIST folder}
out=${3:?output folder}
# the project's .venv (scripts/setup.sh) where it exists, else the machine's python3
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
if lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null); then
  export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
export ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
lscpu | grep -E '^(Model name|CPU\(s\))' || true
rm -rf "$out"
start=$(date +%s)
taskset -c 0,1 "$bin" demo --quick --out "$out" --data "$data" >"$out.log" 2>&1 || {
  tail -20 "$out.log"
  exit 1
}
echo "quick demo: $(($(date +%s) - start)) s"
python3 - "$out/report/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
for k in ("judge_accuracy", "stage0_accuracy", "caption_accuracy", "t2i_accuracy",
          "t2i_accuracy_unranked", "reconstruction_accuracy", "mean_kept_ratio", "wall_seconds"):
    print(f"{k} {m.get(k)!r}")
print("tokens_per_class", [round(x, 4) for x in m.get("mean_tokens_per_class", [])])
print("machine", json.dumps(m.get("machine")))
EOF
