"""PyTorch-eager reference for benches/unet_step.rs (development only; nothing at run time
needs Python). For each U-Net config: build diffusers' UNet2DConditionModel with seeded random
weights, save it as a diffusers folder, run one CFG-batched step (batch 2) on fixed inputs,
save inputs/outputs, and time the forward on CPU (median of N runs).

    .venv/bin/pip install diffusers safetensors
    .venv/bin/python benches/unet_step_reference.py OUT_DIR [--threads 2]
"""
import json, statistics, sys, time
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

CONFIGS = {
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

def main():
    out = sys.argv[1]
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
    torch.set_num_threads(threads)
    import os
    results = {}
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**cfg).eval()
        d = os.path.join(out, name)
        unet.save_pretrained(d, safe_serialization=True)
        s = cfg["sample_size"]
        x = torch.randn(2, 4, s, s)
        t = torch.tensor(701)
        ehs = torch.randn(2, 16, cfg["cross_attention_dim"])
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[0, 5:] = 0
        kw = dict(encoder_hidden_states=ehs)
        tensors = dict(sample=x, timestep=t.reshape(1), encoder_hidden_states=ehs)
        if cfg.get("addition_embed_type") == "text_time":
            te = torch.randn(2, 128)
            ids = torch.tensor([[s * 8.0, s * 8.0, 0, 0, s * 8.0, s * 8.0]] * 2)
            kw["added_cond_kwargs"] = {"text_embeds": te, "time_ids": ids}
            tensors.update(text_embeds=te, time_ids=ids)
        else:
            kw["encoder_attention_mask"] = mask
            tensors.update(encoder_attention_mask=mask)
        with torch.no_grad():
            y = unet(x, t, **kw).sample
            times = []
            for _ in range(5 if name == "mid" else 20):
                t0 = time.perf_counter()
                unet(x, t, **kw)
                times.append(time.perf_counter() - t0)
        tensors["out"] = y
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "io.safetensors"))
        results[name] = statistics.median(times) * 1000
        print(f"{name}: pytorch eager {results[name]:.2f} ms / CFG step (batch 2, {threads} threads)")
    json.dump(results, open(os.path.join(out, "pytorch_ms.json"), "w"))

if __name__ == "__main__":
    main()
