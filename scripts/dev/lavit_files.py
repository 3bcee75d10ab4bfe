#!/usr/bin/env python3
"""Write a LaVIT-7B-v2-shaped checkpoint folder with random bf16 weights (memory benchmarks).

    .venv/bin/python scripts/dev/lavit_files.py OUT [--llm-layers 32]

OUT gets the official layout with the official sizes, as `scripts/bench-load.sh` loads it:
  visual_tokenizer/{eva_vitg_psz14,tokenizer_encoder,tokenizer_decoder,highres_tokenizer_decoder}.bin
  language_model/  LLaMA-2-7B shapes with LaVIT's 48,386-row vocabulary (sharded safetensors),
                   visual_weight.bin, and the fixture's SentencePiece model (a small one: the
                   text vocabulary does not change any weight)
  highres_pixel_decoding/{unet,vae,scheduler}/  the SDXL-shaped U-Net (cross-attention 2048 =
                   768 + 1280, pooled 1280) as a .bin, the SDXL-shaped VAE as safetensors
The tokenizer files' names and shapes are `../shared/fixtures/official-shapes.json`. No
manifest.json: the official values apply. `.bin` files are `torch.save` state dicts, as the
official release ships them. Every tensor is bf16 (normal(0, 0.02); vectors ones), so the
files' bytes are the weights' bytes of a bf16 pipeline. About 23.5 GB with 32 LLaMA layers.
Needs torch, safetensors and diffusers (the project's .venv).
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import llama_files  # noqa: E402

ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "fixtures"))
FIXTURE = os.path.join(SHARED, "tiny-lavit")
LAVIT_VOCAB = 48386

# The highres decoder of LaVIT-7B-v2: SDXL's U-Net and VAE.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
SDXL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


def random_state(shapes):
    """name → random bf16 tensor of that shape (llama_files.random_tensor)."""
    return {name: llama_files.random_tensor(shape) for name, shape in shapes.items()}


def diffusers_folder(cls, config, folder, safetensors):
    """A diffusers model folder: config.json and random bf16 weights of its shapes."""
    with torch.device("meta"):
        model = cls(**config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    os.makedirs(folder, exist_ok=True)
    model.save_config(folder)
    sd = random_state(shapes)
    if safetensors:
        save_file(sd, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(sd, os.path.join(folder, "diffusion_pytorch_model.bin"))
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {folder}: {n / 1e9:.2f} B parameters", flush=True)
    return 2 * n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--llm-layers", type=int, default=32)
    a = ap.parse_args()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    official = json.load(open(os.path.join(SHARED, "official-shapes.json")))["files"]
    total = 0
    for key, shapes in official.items():
        if key.startswith("language_model/ "):
            continue  # the LLaMA shards: below
        rel = key.split(" ")[0]
        path = os.path.join(a.out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sd = random_state({k: tuple(v) for k, v in shapes.items()})
        torch.save(sd, path)
        n = sum(t.numel() for t in sd.values())
        total += 2 * n
        print(f"wrote {rel}: {n / 1e9:.2f} B parameters", flush=True)
        del sd
    lm = os.path.join(a.out, "language_model")
    total += llama_files.write(lm, layers=a.llm_layers, vocab=LAVIT_VOCAB)
    shutil.copy(os.path.join(FIXTURE, "language_model", "tokenizer.model"), lm)
    hi = os.path.join(a.out, "highres_pixel_decoding")
    total += diffusers_folder(UNet2DConditionModel, SDXL_UNET, os.path.join(hi, "unet"), False)
    total += diffusers_folder(AutoencoderKL, SDXL_VAE, os.path.join(hi, "vae"), True)
    os.makedirs(os.path.join(hi, "scheduler"), exist_ok=True)
    shutil.copy(
        os.path.join(FIXTURE, "highres_pixel_decoding", "scheduler", "scheduler_config.json"),
        os.path.join(hi, "scheduler"),
    )
    print(f"{a.out}: {total / 1e9:.2f} GB of bf16 weights")


if __name__ == "__main__":
    main()
