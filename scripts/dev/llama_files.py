#!/usr/bin/env python3
"""Write a LLaMA-2-7B-shaped Hugging Face folder with random bf16 weights (for load benchmarks).

    .venv/bin/python scripts/dev/llama_files.py OUT [--layers 32] [--shard-gb 5] [--vocab 32000]

OUT gets `config.json`, `model-0000K-of-0000N.safetensors` shards and
`model.safetensors.index.json`, as `save_pretrained` writes them. With the default 32 layers
the weights are 13.5 GB (6.74 B parameters); fewer layers keep every other shape. Tensors are
drawn and written one shard at a time, so the script never holds more than one shard.
Needs torch and safetensors (in the project's .venv).
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

HIDDEN, INTER, HEADS, VOCAB = 4096, 11008, 32, 32000


def shapes(layers, vocab):
    yield "model.embed_tokens.weight", (vocab, HIDDEN)
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{n}.weight", (HIDDEN, HIDDEN)
        yield p + "mlp.gate_proj.weight", (INTER, HIDDEN)
        yield p + "mlp.up_proj.weight", (INTER, HIDDEN)
        yield p + "mlp.down_proj.weight", (HIDDEN, INTER)
        yield p + "input_layernorm.weight", (HIDDEN,)
        yield p + "post_attention_layernorm.weight", (HIDDEN,)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (vocab, HIDDEN)


def random_tensor(shape):
    """A bf16 weight: normal(0, 0.02), or ones for a vector (as norms start)."""
    t = torch.empty(shape, dtype=torch.bfloat16)
    return t.fill_(1.0) if len(shape) <= 1 else t.normal_(0.0, 0.02)


def write(out, layers=32, shard_gb=5.0, vocab=VOCAB):
    """Write the folder; returns the bytes of weights written."""
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    cap = int(shard_gb * 2**30)
    groups, cur, size = [], [], 0
    for name, shape in shapes(layers, vocab):
        n = 2 * int(torch.tensor(shape).prod())
        if cur and size + n > cap:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    groups.append(cur)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            t = random_tensor(shape)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
        del tensors
        print(f"wrote {fname}", flush=True)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(f"{out}: {total / 1e9:.2f} GB of bf16 weights, {len(groups)} shards")
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--vocab", type=int, default=VOCAB)
    a = ap.parse_args()
    write(a.out, a.layers, a.shard_gb, a.vocab)


if __name__ == "__main__":
    main()
