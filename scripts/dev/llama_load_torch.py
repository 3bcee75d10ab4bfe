#!/usr/bin/env python3
"""transformers' side of scripts/bench-load.sh: load a Hugging Face LLaMA folder in bf16 on the
CPU with `LlamaForCausalLM.from_pretrained` and print one line

    torch_load ms=<wall> peak_over_baseline=<bytes> weights=<bytes>

(peak RSS of this process after the load and one read of every weight, minus its RSS before
the load, libraries imported; the wall time is `from_pretrained` alone).
Needs torch, transformers and safetensors in the project's .venv.
"""
import os
import resource
import sys
import time

import torch
from transformers import LlamaForCausalLM


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    d = sys.argv[1]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    weights = sum(
        os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors")
    )
    base = rss_bytes()
    t0 = time.perf_counter()
    m = LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    ms = (time.perf_counter() - t0) * 1000
    # transformers may leave the weights as views of the mapped files, read on first use:
    # read every byte once (as a forward pass would) so they count in the resident set.
    with torch.no_grad():
        for p in m.parameters():
            p.view(torch.int16).max()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert next(m.parameters()).dtype == torch.bfloat16
    print(f"torch_load ms={ms:.0f} peak_over_baseline={peak - base} weights={weights}")


if __name__ == "__main__":
    main()
