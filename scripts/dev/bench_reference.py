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
  tokenizer_b1     the visual tokenizer on 1 image (EVA ViT -> selector + merger -> quantizer ->
  tokenizer_b8     visual ids), and on 8 images; scripts/dev/tokenizer_reference.py is the
                   PyTorch side (own nn.Modules, checked against the fixture's official outputs)

    .venv/bin/python scripts/dev/bench_reference.py OUT [--threads 2] [--only tiny|mid]

Writes OUT/<case>/ (weights, config, io.safetensors) and OUT/torch_ms.json (best-of-N ms).
OUT/tokenizer_<size>/ is a LaVIT folder (manifest.json, visual_tokenizer/eva_vitg_psz14.safetensors,
visual_tokenizer/tokenizer_encoder.safetensors) that lavit's VisualTokenizer::from_checkpoint loads.
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

# The visual tokenizer's manifest sections. tiny: the fixture's (tiny-lavit/manifest.json) with
# arg-max selection; mid: a 224 px / 14 px ViT (256 patches) of width 384.
_TOK_TINY = dict(img_size=112, patch_size=14, encoder_width=64, encoder_depth=2, encoder_heads=4,
                 encoder_mlp_ratio=4.3637, encoder_norm_eps=1e-6, encoder_head_dim_out=32,
                 merger_depth=2, merger_heads=4, merger_mlp_ratio=4.3637, merger_qkv_bias=True,
                 merger_norm_eps=1e-5, n_code=256, code_dim=16, llm_hidden=96, selection="argmax")
TOKENIZER = {
    "tiny": dict(
        tokenizer=_TOK_TINY,
        feature_decoder=dict(depth=2, heads=4, embed_dim=64, mlp_ratio=4.3637, in_chans=16,
                             decoder_out_dim=96, lowres_unet_proj=32, highres_unet_proj_1=32,
                             highres_unet_proj_2=48, highres_attnpool_heads=4, num_patches=64),
        llm=dict(text_vocab_size=200, image_start_id=200, image_end_id=201, visual_token_offset=202,
                 vocab_size=458, bos_id=1, eos_id=2)),
    "mid": dict(
        tokenizer=dict(_TOK_TINY, img_size=224, encoder_width=384, encoder_depth=6,
                       encoder_heads=6, encoder_head_dim_out=256, merger_heads=6, n_code=1024,
                       code_dim=32, llm_hidden=256),
        # unused by tokenize (no decoder files); in_chans must equal code_dim
        feature_decoder=dict(depth=2, heads=6, embed_dim=384, mlp_ratio=4.3637, in_chans=32,
                             decoder_out_dim=384, lowres_unet_proj=256, highres_unet_proj_1=256,
                             highres_unet_proj_2=384, highres_attnpool_heads=6, num_patches=256),
        # the official ids (visual ids 32002..32002+n_code)
        llm=dict(text_vocab_size=32000, image_start_id=32000, image_end_id=32001,
                 visual_token_offset=32002, vocab_size=48386, bos_id=1, eos_id=2)),
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def runs_for(size):
    """Timed calls per measurement (the PyTorch and lavit sides take the same count)."""
    return 20 if size == "tiny" else 8


def seeded_folder(make, out, name):
    """`make()` with the weights of seed 0, saved as the folder OUT/name; returns (model, folder)."""
    torch.manual_seed(0)
    model = make().eval()
    d = os.path.join(out, name)
    model.save_pretrained(d, safe_serialization=True)
    return model, d


def save_io(d, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "io.safetensors"))


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
    cfg = LlamaConfig(**LLM[size], max_position_embeddings=256, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    model, d = seeded_folder(lambda: LlamaForCausalLM(cfg), out, f"llm_{size}")
    g = torch.Generator().manual_seed(1)
    ids1 = torch.randint(3, cfg.vocab_size, (1, PROMPT), generator=g)
    ids2 = torch.randint(3, cfg.vocab_size, (2, PROMPT), generator=g)
    runs = runs_for(size)
    with torch.no_grad():
        io = dict(ids_b1=ids1, ids_b2=ids2, prefill_logits=model(ids1).logits[:, -1])
        res[f"llm_prefill_b1_{size}"] = best_ms(lambda: model(ids1), runs)
        for name, ids in (("b1", ids1), ("b2", ids2)):
            io[f"tokens_{name}"] = greedy(model, ids)[0]
            secs = [greedy(model, ids)[1] for _ in range(5)]
            res[f"llm_decode_{name}_{size}"] = min(secs) * 1000 / (NEW - 1)
    save_io(d, io)


def unet(out, size, res):
    from diffusers import UNet2DConditionModel
    cfg = UNET[size]
    model, d = seeded_folder(lambda: UNet2DConditionModel(**cfg), out, f"unet_{size}")
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
        res[f"unet_cfg_step_{size}"] = best_ms(lambda: model(x, t, **kw), runs_for(size))
    save_io(d, tensors)


def vae(out, size, res):
    from diffusers import AutoencoderKL
    cfg = VAE[size]
    model, d = seeded_folder(lambda: AutoencoderKL(**cfg), out, f"vae_{size}")
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    z = torch.randn(1, cfg["latent_channels"], cfg["sample_size"] // f, cfg["sample_size"] // f)
    with torch.no_grad():
        y = model.decode(z).sample
        res[f"vae_decode_{size}"] = best_ms(lambda: model.decode(z), runs_for(size))
    save_io(d, {"latent": z, "out": y})


def tokenizer(out, size, res):
    """The visual tokenizer: EVA ViT -> token selector (arg-max) + merger -> encode_task_layer ->
    codebook -> visual ids, with PyTorch's default initialisation (cls/pos embeddings 0.02
    normal, an l2-normalised normal codebook), saved as a LaVIT folder."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tokenizer_reference as ref
    man = TOKENIZER[size]
    t = dict(man["tokenizer"])
    torch.manual_seed(0)
    tok = ref.VisualTokenizer(t, man["llm"]["visual_token_offset"])
    with torch.no_grad():
        torch.nn.init.trunc_normal_(tok.eva.cls_token, std=0.02)
        torch.nn.init.trunc_normal_(tok.eva.pos_embed, std=0.02)
        cb = tok.enc.quantize.embedding.weight
        cb.copy_(torch.nn.functional.normalize(torch.randn_like(cb), dim=-1))
    s = t["img_size"]
    g = torch.Generator().manual_seed(1)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    # uniform pixels in [0, 1], CLIP-normalised (the model input lavit's processor produces)
    images = {b: (torch.rand(b, 3, s, s, generator=g) - mean) / std for b in (1, 8)}
    with torch.no_grad():
        # Random weights make the selector keep every patch (its last bias dominates the keep/drop
        # margin). Rescale its last layer, out_conv.4, on the b8 images' activations: the weight
        # so the margin log p(keep) - log p(drop) has a spread (std) of 4, far above float error,
        # and the bias so the threshold lies mid-way in the widest gap between sorted margins
        # within the middle fifth (40-60 % kept) -- about half the patches kept, some dropped in
        # every image, and no margin near 0. The saved file holds the rescaled layer.
        feats = tok.eva.patch_features(images[8])
        pol = torch.ones(*feats.shape[:2], 1)
        last = tok.enc.token_predictor.out_conv[4]
        seen = {}
        hook = last.register_forward_hook(lambda m, i, o: seen.update(h=i[0]))
        tok.enc.token_predictor(feats, pol)
        hook.remove()
        dw = last.weight[0] - last.weight[1]
        m = seen["h"] @ dw  # weight part of the margin, (8, N)
        k = 4.0 / m.std().item()
        last.weight.mul_(k)
        srt = (m * k).flatten().sort().values
        lo, hi = int(0.4 * srt.numel()), int(0.6 * srt.numel())
        i = lo + int((srt[lo + 1:hi + 1] - srt[lo:hi]).argmax())
        thr = ((srt[i] + srt[i + 1]) / 2).item()
        last.bias.copy_(torch.tensor([-thr / 2, thr / 2]))
    d = os.path.join(out, f"tokenizer_{size}")
    os.makedirs(os.path.join(d, "visual_tokenizer"), exist_ok=True)
    json.dump({"about": f"lavit-rs stage bench ({size}): random weights, arg-max selection",
               **man}, open(os.path.join(d, "manifest.json"), "w"), indent=1)
    eva_sd, enc_sd = tok.state_dicts()
    for name, sd in ((ref.EVA_FILE, eva_sd), (ref.ENCODER_FILE, enc_sd)):
        save_file({k: v.contiguous() for k, v in sd.items()},
                  os.path.join(d, name + ".safetensors"), metadata={"format": "pt"})
    # the folder as lavit loads it: the same modules, strictly
    tok = ref.VisualTokenizer.from_folder(d)
    runs = runs_for(size)
    io = {"images_b1": images[1], "images_b8": images[8]}
    with torch.no_grad():
        for b in (1, 8):
            o = tok.tokenize(images[b], trace=True)
            io[f"token_ids_b{b}"], io[f"token_counts_b{b}"] = o["token_ids"], o["token_counts"]
            if b == 8:
                io["patch_features_b8"] = o["patch_features"]
            margin = (o["log_probs"][..., 0] - o["log_probs"][..., 1]).abs().min().item()
            # how far the arg-max decisions and the nearest codes are from a tie (vs float error)
            kept = o["merged"][o["decisions"] > 0.5]
            z = torch.nn.functional.normalize(tok.enc.encode_task_layer(kept), dim=-1)
            w = tok.enc.quantize.embedding.weight
            dist = (z.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * z @ w.t()).sort(1).values
            gap = (dist[:, 1] - dist[:, 0]).min().item()
            print(f"tokenizer_{size} b{b}: kept {o['token_counts'].tolist()} of "
                  f"{o['decisions'].shape[1]}; smallest keep margin {margin:.2e}, "
                  f"smallest nearest-code gap {gap:.2e}")
            res[f"tokenizer_b{b}_{size}"] = best_ms(lambda: tok.tokenize(images[b]), runs)
    save_io(d, io)


def main():
    out = sys.argv[1]
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
    sizes = [sys.argv[sys.argv.index("--only") + 1]] if "--only" in sys.argv else ["tiny", "mid"]
    torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    res = {}
    for size in sizes:
        for stage in (llm, unet, vae, tokenizer):
            stage(out, size, res)
    for k, v in res.items():
        print(f"torch {k} {v:.3f} ms ({threads} threads)")
    json.dump(res, open(os.path.join(out, "torch_ms.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
