"""Development only (no test or CI step runs this): list what PyTorch sees in every weight
file of the shared fixture — key, shape, dtype — as tests/data/fixture-tensors.json, the
reference `tests/checkpoint.rs` compares `lavit inspect` and the Rust loader against.

    .venv/bin/python scripts/dev/fixture_tensors.py ../shared/fixtures/tiny-lavit > tests/data/fixture-tensors.json
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file

DTYPES = {
    torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.float64: "Double", torch.int64: "Int64", torch.int32: "Int",
    torch.uint8: "Uint8", torch.int8: "Int8", torch.bool: "Bool",
}


def flatten(obj, prefix, out):
    if isinstance(obj, torch.Tensor):
        out[prefix] = {"shape": list(obj.shape), "dtype": DTYPES[obj.dtype]}
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), out)


def main(root):
    listing = {}
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, root)
            out = {}
            if f.endswith(".safetensors"):
                flatten(load_file(path), "", out)
            elif f.endswith(".bin"):
                flatten(torch.load(path, map_location="cpu", weights_only=True), "", out)
            else:
                continue
            listing[rel] = out
    json.dump(listing, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
