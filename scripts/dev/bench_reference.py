#!/usr/bin/env python3
"""PyTorch-eager side of scripts/bench.sh (development only; nothing at run time needs Python).

For each stage and size (tiny, mid) it builds the reference module with seeded random weights
(transformers' LlamaForCausalLM, diffusers' UNet2DConditionModel and AutoencoderKL), saves it as a
Hugging Face / diffusers folder, saves fixed inputs and the reference outputs, and times the
same computation lavit's bench (benches/stages.rs) times on the same files:

  llm_prefill_b1   one forward of a 64-token prompt, batch 1 (last-position logits compared)
  llm_decode_b1    ms per new token, greedy with a KV cache after a 64-token prompt, batch 1
  llm_decode_b2    the same with 2 streams in one batch (CFG's conditional + unconditional)
  unet_cfg_step    one U-Net step on a CFG batch of 2
  vae_decode       the VAE decoder on one latent

    .venv/bin/python scripts/dev/bench_reference.py OUT [--threads 2] [--only tiny|mid]

Writes OUT/<case>/ (weights, config, io.safetensors) and OUT/torch_ms.json (best-of-N ms).
"""
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

PROMPT, NEW = 64, 32

LLM = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
    "mid": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, vocab_size=8192),
}

UNET = {
    # the fixture's SD-1.5-shaped toy U-Net
    "tiny": dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                 attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8),
    # mid-size, SDXL-shaped: text_time, linear projections, per-block depth and heads
    "mid": dict(sample_size=32, block_out_channels=[64, 128, 256], layers_per_block=2,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                attention_head_dim=[2, 4, 8], transformer_layers_per_block=[1, 2, 2],
                cross_attention_dim=256, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=32,
                projection_class_embeddings_input_dim=128 + 6 * 32, norm_num_groups=32),
}

VAE = {
    "tiny": dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4,
                 norm_num_groups=8, sample_size=32,
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
    "mid": dict(block_out_channels=[64, 128, 256, 256], layers_per_block=2, latent_channels=4,
                norm_num_groups=32, sample_size=256,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
}


def best_ms(fn, runs):
    """Best of `runs` timed calls after one warm-up (the least disturbed by other processes on
    a shared machine; lavit's side takes the same statistic)."""
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def greedy(model, ids):
    """Prefill `ids`, then NEW greedy tokens with the KV cache; returns (tokens, decode seconds)."""
    out = model(ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    toks = [nxt]
    t0 = time.perf_counter()
    for _ in range(NEW - 1):
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
    return torch.cat(toks, 1), time.perf_counter() - t0


def llm(out, size, res):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**LLM[size], max_position_embeddings=256, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    d = os.path.join(out, f"llm_{size}")
    model.save_pretrained(d, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    ids1 = torch.randint(3, cfg.vocab_size, (1, PROMPT), generator=g)
    ids2 = torch.randint(3, cfg.vocab_size, (2, PROMPT), generator=g)
    runs = 20 if size == "tiny" else 8
    with torch.no_grad():
        io = dict(ids_b1=ids1, ids_b2=ids2, prefill_logits=model(ids1).logits[:, -1])
        res[f"llm_prefill_b1_{size}"] = best_ms(lambda: model(ids1), runs)
        for name, ids in (("b1", ids1), ("b2", ids2)):
            io[f"tokens_{name}"] = greedy(model, ids)[0]
            secs = [greedy(model, ids)[1] for _ in range(5)]
            res[f"llm_decode_{name}_{size}"] = min(secs) * 1000 / (NEW - 1)
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))


def unet(out, size, res):
    from diffusers import UNet2DConditionModel
    cfg = UNET[size]
    torch.manual_seed(0)
    model = UNet2DConditionModel(**cfg).eval()
    d = os.path.join(out, f"unet_{size}")
    model.save_pretrained(d, safe_serialization=True)
    s = cfg["sample_size"]
    x = torch.randn(2, 4, s, s)
    t = torch.tensor(701)
    ehs = torch.randn(2, 16, cfg["cross_attention_dim"])
    kw = dict(encoder_hidden_states=ehs)
    tensors = dict(sample=x, timestep=t.reshape(1), encoder_hidden_states=ehs)
    if cfg.get("addition_embed_type") == "text_time":
        te = torch.randn(2, 128)
        ids = torch.tensor([[s * 8.0, s * 8.0, 0, 0, s * 8.0, s * 8.0]] * 2)
        kw["added_cond_kwargs"] = {"text_embeds": te, "time_ids": ids}
        tensors.update(text_embeds=te, time_ids=ids)
    with torch.no_grad():
        tensors["out"] = model(x, t, **kw).sample
        res[f"unet_cfg_step_{size}"] = best_ms(lambda: model(x, t, **kw), 20 if size == "tiny" else 8)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "io.safetensors"))


def vae(out, size, res):
    from diffusers import AutoencoderKL
    cfg = VAE[size]
    torch.manual_seed(0)
    model = AutoencoderKL(**cfg).eval()
    d = os.path.join(out, f"vae_{size}")
    model.save_pretrained(d, safe_serialization=True)
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    z = torch.randn(1, cfg["latent_channels"], cfg["sample_size"] // f, cfg["sample_size"] // f)
    with torch.no_grad():
        y = model.decode(z).sample
        res[f"vae_decode_{size}"] = best_ms(lambda: model.decode(z), 20 if size == "tiny" else 8)
    save_file({"latent": z, "out": y.contiguous()}, os.path.join(d, "io.safetensors"))


def main():
    out = sys.argv[1]
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
    sizes = [sys.argv[sys.argv.index("--only") + 1]] if "--only" in sys.argv else ["tiny", "mid"]
    torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    res = {}
    for size in sizes:
        for stage in (llm, unet, vae):
            stage(out, size, res)
    for k, v in res.items():
        print(f"torch {k} {v:.3f} ms ({threads} threads)")
    json.dump(res, open(os.path.join(out, "torch_ms.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
