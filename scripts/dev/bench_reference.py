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
  tokenizer_b8     visual ids), and on 8 images (64 at the official size);
                   scripts/dev/tokenizer_reference.py is the
                   PyTorch side (own nn.Modules, checked against the fixture's official outputs)

  generate         text -> image end to end (lavit: `Pipeline::generate` of a LaVIT folder, the
                   same path as `lavit serve`): image tokens with CFG, the highres feature
                   decoder, DDIM steps of the U-Net with CFG, the VAE; PyTorch:
                   scripts/dev/generate_reference.py on the same files (the pictures compared)
  llm_cfg_token    ms per image token with classifier-free guidance: the conditional and the
                   unconditional stream, one token each; PyTorch runs them one after the other
                   as the official LaVIT code does (two batch-1 forwards), lavit as one batch of 2

    .venv/bin/python scripts/dev/bench_reference.py OUT [--threads 2] [--only tiny|mid|official]
                                                        [--device cpu|cuda] [--dtype f32|bf16]
                                                        [--stages llm,unet,vae,tokenizer,generate]

`official` is LaVIT-7B-v2's sizes (LLaMA-7B with the 48,386-row vocabulary, SDXL's U-Net at
1024 px and SD-1.5's at 512 px, SDXL's VAE at 1024 px, EVA-CLIP-G + the 12-block merger on 1 and
64 images): for scripts/gpu-bench.sh on a GPU, in bf16. Modules are built on --device in --dtype.

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
    # LLaMA-2-7B with LaVIT's vocabulary
    "official": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=48386),
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
    # LaVIT-7B-v2's highres decoder: SDXL's U-Net at 1024 px (128 x 128 latents)
    "official": dict(sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                     cross_attention_dim=2048, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=1280 + 6 * 256, norm_num_groups=32),
    # its lowres decoder: SD-1.5's U-Net at 512 px, cross-attention 768
    "official_sd15": dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280],
                          layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
                          norm_num_groups=32),
}

VAE = {
    "tiny": dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4,
                 norm_num_groups=8, sample_size=32,
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
    "mid": dict(block_out_channels=[64, 128, 256, 256], layers_per_block=2, latent_channels=4,
                norm_num_groups=32, sample_size=256,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
    # SDXL's VAE at 1024 px
    "official": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                     norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
                     down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4),
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
                 visual_token_offset=32002, vocab_size=32002 + 1024, bos_id=1, eos_id=2)),
}
# LaVIT-7B-v2's tokenizer (the official manifest; the decoder section is unused by tokenize)
TOKENIZER["official"] = dict(
    tokenizer=dict(_TOK_TINY, img_size=224, encoder_width=1408, encoder_depth=40,
                   encoder_heads=16, encoder_head_dim_out=1024, merger_depth=12, merger_heads=16,
                   n_code=16384, code_dim=32, llm_hidden=4096),
    feature_decoder=dict(depth=12, heads=16, embed_dim=1408, mlp_ratio=4.3637, in_chans=32,
                         decoder_out_dim=1408, lowres_unet_proj=768, highres_unet_proj_1=768,
                         highres_unet_proj_2=1280, highres_attnpool_heads=16, num_patches=256),
    llm=dict(TOKENIZER["mid"]["llm"], vocab_size=48386))
# images per tokenizer batch ("many": the throughput batch)
TOKENIZER_BATCH = {"tiny": 8, "mid": 8, "official": 64}
# Where and in what the modules run (main sets them from --device / --dtype).
DEVICE, DTYPE = "cpu", torch.float32


def sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def best_ms(fn, runs):
    """Best of `runs` timed calls after one warm-up (the least disturbed by other processes on
    a shared machine; lavit's side takes the same statistic)."""
    fn()  # warm-up
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def runs_for(size):
    """Timed calls per measurement (the PyTorch and lavit sides take the same count)."""
    return {"tiny": 20, "mid": 8}.get(size, 5)


def seeded_folder(make, out, name, dtype=None):
    """`make()` with the weights of seed 0 on DEVICE in `dtype` (DTYPE), saved as the folder
    OUT/name; returns (model, folder)."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = make()
    model = model.to(dtype or DTYPE).eval()
    d = os.path.join(out, name)
    model.save_pretrained(d, safe_serialization=True)
    return model, d


def save_io(d, tensors):
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              os.path.join(d, "io.safetensors"))


def randn(*shape):
    """Normal inputs, drawn on the CPU (the same on every device), in DTYPE on DEVICE."""
    return torch.randn(*shape).to(DEVICE, DTYPE)


def greedy(model, ids):
    """Prefill `ids`, then NEW greedy tokens with the KV cache; returns (tokens, decode seconds)."""
    out = model(ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    toks = [nxt]
    sync()
    t0 = time.perf_counter()
    for _ in range(NEW - 1):
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
    sync()
    return torch.cat(toks, 1), time.perf_counter() - t0


def cfg_unbatched(model, cond, uncond):
    """Seconds for NEW - 1 image tokens with CFG run as the official code runs it: the
    conditional and the unconditional stream each a batch-1 forward per token, one after the
    other (the guided choice feeds both)."""
    streams = []
    for ids in (cond, uncond):
        out = model(ids, use_cache=True)
        streams.append(out)
    nxt = streams[0].logits[:, -1].argmax(-1, keepdim=True)
    past = [o.past_key_values for o in streams]
    sync()
    t0 = time.perf_counter()
    for _ in range(NEW - 1):
        logits = []
        for i in range(2):
            o = model(nxt, past_key_values=past[i], use_cache=True)
            past[i] = o.past_key_values
            logits.append(o.logits[:, -1].float().log_softmax(-1))
        guided = logits[1] + 4.0 * (logits[0] - logits[1])
        nxt = guided.argmax(-1, keepdim=True)
    sync()
    return time.perf_counter() - t0


def llm(out, size, res):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**LLM[size], max_position_embeddings=256, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    model, d = seeded_folder(lambda: LlamaForCausalLM(cfg), out, f"llm_{size}")
    g = torch.Generator().manual_seed(1)
    ids1 = torch.randint(3, cfg.vocab_size, (1, PROMPT), generator=g).to(DEVICE)
    ids2 = torch.randint(3, cfg.vocab_size, (2, PROMPT), generator=g).to(DEVICE)
    runs = runs_for(size)
    with torch.no_grad():
        io = dict(ids_b1=ids1, ids_b2=ids2, prefill_logits=model(ids1).logits[:, -1])
        res[f"llm_prefill_b1_{size}"] = best_ms(lambda: model(ids1), runs)
        for name, ids in (("b1", ids1), ("b2", ids2)):
            io[f"tokens_{name}"] = greedy(model, ids)[0]
            secs = [greedy(model, ids)[1] for _ in range(5)]
            res[f"llm_decode_{name}_{size}"] = min(secs) * 1000 / (NEW - 1)
        # CFG: the two rows of ids2 as the conditional and the unconditional stream
        secs = [cfg_unbatched(model, ids2[:1], ids2[1:]) for _ in range(3)]
        res[f"llm_cfg_token_{size}"] = min(secs) * 1000 / (NEW - 1)
    save_io(d, io)


def unet(out, size, res, name=None):
    from diffusers import UNet2DConditionModel
    name = name or size
    cfg = UNET[name]
    model, d = seeded_folder(lambda: UNet2DConditionModel(**cfg), out, f"unet_{name}")
    s = cfg["sample_size"]
    x = randn(2, 4, s, s)
    t = torch.tensor(701, device=DEVICE)
    ehs = randn(2, 16, cfg["cross_attention_dim"])
    kw = dict(encoder_hidden_states=ehs)
    tensors = dict(sample=x, timestep=t.reshape(1), encoder_hidden_states=ehs)
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        te = randn(2, pooled)
        ids = torch.tensor([[s * 8.0, s * 8.0, 0, 0, s * 8.0, s * 8.0]] * 2).to(DEVICE, DTYPE)
        kw["added_cond_kwargs"] = {"text_embeds": te, "time_ids": ids}
        tensors.update(text_embeds=te, time_ids=ids)
    with torch.no_grad():
        tensors["out"] = model(x, t, **kw).sample
        res[f"unet_cfg_step_{name}"] = best_ms(lambda: model(x, t, **kw), runs_for(size))
    save_io(d, tensors)
    if size == "official" and name == "official":
        unet(out, size, res, "official_sd15")


def vae(out, size, res):
    from diffusers import AutoencoderKL
    cfg = VAE[size]
    # float32 in any --dtype: the official pipeline upcasts the VAE (force_upcast), as lavit does
    model, d = seeded_folder(lambda: AutoencoderKL(**cfg), out, f"vae_{size}", torch.float32)
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    z = randn(1, cfg["latent_channels"], cfg["sample_size"] // f, cfg["sample_size"] // f)
    z = z.float()
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
    with torch.device(DEVICE):
        tok = ref.VisualTokenizer(t, man["llm"]["visual_token_offset"])
    tok.to(DEVICE, DTYPE)
    with torch.no_grad():
        torch.nn.init.trunc_normal_(tok.eva.cls_token, std=0.02)
        torch.nn.init.trunc_normal_(tok.eva.pos_embed, std=0.02)
        cb = tok.enc.quantize.embedding.weight
        cb.copy_(torch.nn.functional.normalize(torch.randn_like(cb), dim=-1))
    s = t["img_size"]
    g = torch.Generator().manual_seed(1)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    # uniform pixels in [0, 1], CLIP-normalised (the model input lavit's processor produces)
    many = TOKENIZER_BATCH[size]
    images = {b: ((torch.rand(b, 3, s, s, generator=g) - mean) / std).to(DEVICE, DTYPE)
              for b in (1, many)}
    with torch.no_grad():
        # Random weights make the selector keep every patch (its last bias dominates the keep/drop
        # margin). Rescale its last layer, out_conv.4, on the b8 images' activations: the weight
        # so the margin log p(keep) - log p(drop) has a spread (std) of 4, far above float error,
        # and the bias so the threshold lies mid-way in the widest gap between sorted margins
        # within the middle fifth (40-60 % kept) -- about half the patches kept, some dropped in
        # every image, and no margin near 0. The saved file holds the rescaled layer.
        feats = tok.eva.patch_features(images[many])
        pol = torch.ones(*feats.shape[:2], 1, dtype=feats.dtype, device=feats.device)
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
        save_file({k: v.cpu().contiguous() for k, v in sd.items()},
                  os.path.join(d, name + ".safetensors"), metadata={"format": "pt"})
    # the folder as lavit loads it: the same modules, strictly
    tok = ref.VisualTokenizer.from_folder(d).to(DEVICE, DTYPE)
    runs = runs_for(size)
    io = {f"images_b{b}": images[b] for b in (1, many)}
    with torch.no_grad():
        for b in (1, many):
            o = tok.tokenize(images[b], trace=True)
            io[f"token_ids_b{b}"], io[f"token_counts_b{b}"] = o["token_ids"], o["token_counts"]
            if b == many:
                io[f"patch_features_b{b}"] = o["patch_features"]
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


# The LaVIT folder of `generate`: the tokenizer case's folder (manifest, codebook) plus a
# LLaMA over the manifest's unified vocabulary, the highres feature decoder and an
# SDXL-shaped U-Net (cross-attention proj_1 + proj_2, pooled proj_2) and VAE.
GENERATE = {
    "tiny": dict(tokens=16, steps=5, runs=10,
                 unet=dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                           up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                           attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2],
                           use_linear_projection=True, addition_embed_type="text_time",
                           addition_time_embed_dim=8, norm_num_groups=8)),
    "mid": dict(tokens=64, steps=10, runs=3,
                unet={k: v for k, v in UNET["mid"].items()
                      if k not in ("cross_attention_dim", "projection_class_embeddings_input_dim")}),
}
PROMPT_TEXT = "a photo of a cat sitting on a chair"


def generate(out, size, res):
    """Text -> image end to end on OUT/lavit_<size> (needs the tokenizer case's folder)."""
    import shutil
    import sentencepiece
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import generate_reference as ref
    import tokenizer_reference as tref
    g, man = GENERATE[size], TOKENIZER[size]
    f, llm_man = man["feature_decoder"], man["llm"]
    d = os.path.join(out, f"lavit_{size}")
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(os.path.join(out, f"tokenizer_{size}"), d)
    os.remove(os.path.join(d, "io.safetensors"))
    fixture = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "fixtures",
                           "tiny-lavit")
    cfg = LlamaConfig(**dict(LLM[size], vocab_size=llm_man["vocab_size"]),
                      max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
    llm, lm_dir = seeded_folder(lambda: LlamaForCausalLM(cfg), d, "language_model")
    shutil.copy(os.path.join(fixture, "language_model", "tokenizer.model"), lm_dir)
    torch.manual_seed(0)
    dec = ref.HighresDecoder(f).eval()
    torch.save(dec.state_dict(), os.path.join(d, "visual_tokenizer",
                                              "highres_tokenizer_decoder.bin"))
    hi = os.path.join(d, "highres_pixel_decoding")
    ucfg = dict(g["unet"], cross_attention_dim=f["highres_unet_proj_1"] + f["highres_unet_proj_2"],
                projection_class_embeddings_input_dim=f["highres_unet_proj_2"]
                + 6 * g["unet"]["addition_time_embed_dim"])
    unet_m, _ = seeded_folder(lambda: UNet2DConditionModel(**ucfg), hi, "unet")
    vae_m, _ = seeded_folder(lambda: AutoencoderKL(**VAE[size]), hi, "vae", torch.float32)
    os.makedirs(os.path.join(hi, "scheduler"), exist_ok=True)
    sched_file = os.path.join(fixture, "highres_pixel_decoding", "scheduler",
                              "scheduler_config.json")
    shutil.copy(sched_file, os.path.join(hi, "scheduler"))
    sched = DDIMScheduler.from_config(json.load(open(sched_file)))
    codebook = tref.load_state(tref.resolve(d, tref.ENCODER_FILE))["quantize.embedding.weight"]
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(lm_dir, "tokenizer.model"))
    prompt_ids = sp.encode(PROMPT_TEXT)
    side = ucfg["sample_size"] * 2 ** (len(VAE[size]["block_out_channels"]) - 1)
    params = dict(prompt=PROMPT_TEXT, tokens=g["tokens"], steps=g["steps"], runs=g["runs"],
                  llm_guidance=4.0, guidance=7.0, seed=7, side=side)
    offset = llm_man["visual_token_offset"]

    def run():
        toks = ref.image_tokens(llm, prompt_ids, llm_man["image_start_id"],
                                llm_man["image_end_id"], offset, llm_man["vocab_size"],
                                g["tokens"], params["llm_guidance"])
        codes = torch.tensor(toks) - offset
        px = ref.pixels(dec, unet_m, vae_m, sched, codebook, codes, g["steps"],
                        params["guidance"], params["seed"], side)
        return toks, px
    toks, px = run()
    json.dump(params, open(os.path.join(d, "generate.json"), "w"), indent=1)
    save_io(d, {"tokens": torch.tensor(toks), "pixels": px})
    res[f"generate_{size}"] = best_ms(run, g["runs"])


def main():
    global DEVICE, DTYPE
    out = sys.argv[1]

    def opt(k, default):
        return sys.argv[sys.argv.index(k) + 1] if k in sys.argv else default
    threads = int(opt("--threads", 2))
    sizes = [opt("--only", None)] if "--only" in sys.argv else ["tiny", "mid"]
    DEVICE = opt("--device", "cpu")
    DTYPE = {"f32": torch.float32, "bf16": torch.bfloat16}[opt("--dtype", "f32")]
    torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    stages = opt("--stages", "llm,unet,vae,tokenizer,generate").split(",")
    res = {}
    for size in sizes:
        for stage in (llm, unet, vae, tokenizer):
            if stage.__name__ in stages:
                stage(out, size, res)
        if ("generate" in stages and size in GENERATE and DEVICE == "cpu"
                and DTYPE == torch.float32):
            with torch.no_grad():
                generate(out, size, res)
    for k, v in res.items():
        print(f"torch {k} {v:.3f} ms ({DEVICE}, {threads} threads)")
    json.dump(res, open(os.path.join(out, "torch_ms.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
