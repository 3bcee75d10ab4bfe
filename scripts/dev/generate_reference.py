"""PyTorch-eager reference of LaVIT's text -> image generation (development only; nothing at run
time needs Python), for the `generate` line of scripts/bench.sh: the prompt through
SentencePiece, image tokens from transformers' LlamaForCausalLM with classifier-free guidance
(paper eq. 7; the conditional and the unconditional stream in one left-padded batch, as lavit's
generate runs them), the codebook rows of those tokens, LaVIT's highres feature decoder
(`HighresVQDecoder`: own nn.Modules below), then diffusers' UNet2DConditionModel with
DDIMScheduler and classifier-free guidance (zero negative embeddings, SDXL time ids) and
AutoencoderKL. It mirrors lavit's code step for step (actors/llm/src/generate.rs,
actors/decoder/src/feature_decoder*.rs, actors/decoder/src/pixel_decoder.rs), written
independently of the official modules; the bench checks both sides give the same picture.
"""
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenizer_reference import Mlp  # noqa: E402  (the same fc1 -> GELU -> fc2)

NORM_EPS = 1e-5  # FeatureDecoderConfig::norm_eps


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, codes, mask):
        b, n, c = codes.shape
        h = self.heads

        def split(t):
            return t.reshape(b, -1, h, c // h).permute(0, 2, 1, 3)
        q, k, v = split(self.query(x)), split(self.key(codes)), split(self.value(codes))
        attn = q @ k.transpose(-2, -1) * (c // h) ** -0.5
        attn = (attn + (1.0 - mask[:, None, None, :]) * -10000.0).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, x.shape[1], c))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.self_attn = SelfAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x, codes, mask):
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), codes, mask)
        return x + self.mlp(self.norm2(x))


class AttentionPool(nn.Module):
    """CLIP's AttentionPool2d over the decoded sequence (mean token first)."""

    def __init__(self, seq_len, dim, heads, out_dim):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(seq_len + 1, dim) / dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.c_proj = nn.Linear(dim, out_dim)

    def forward(self, x):
        b, _, e = x.shape
        x = torch.cat([x.mean(1, keepdim=True), x], 1) + self.positional_embedding[None]
        h = self.heads

        def split(t):
            return t.reshape(b, -1, h, e // h).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        attn = (q @ k.transpose(-2, -1) * (e // h) ** -0.5).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, e)
        return self.c_proj(y[:, 0])


class FeatureDecoderTrunk(nn.Module):
    """The part `VQDecoder` and `HighresVQDecoder` share: learned queries cross-attending to
    the codebook vectors of the kept tokens, then `decode_task_layer`."""

    def __init__(self, f):
        super().__init__()
        d, n = f["embed_dim"], f["num_patches"]
        self.in_proj = nn.Linear(f["in_chans"], d)
        self.pos_embed = nn.Parameter(torch.randn(1, n, d) * 0.02)
        self.query_embed = nn.Parameter(torch.randn(1, n, d) * 0.02)
        self.blocks = nn.ModuleList(
            Block(d, f["heads"], int(d * f["mlp_ratio"])) for _ in range(f["depth"]))
        self.norm = nn.LayerNorm(d, eps=NORM_EPS)
        o = f["decoder_out_dim"]
        self.decode_task_layer = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, o))

    def decode(self, codes, counts):
        """codes [T, in_chans] of all images + per-image counts -> [B, N, decoder_out_dim]."""
        x = self.in_proj(codes)
        longest = max(max(counts), 1)
        rows, masks, off = [], [], 0
        for c in counts:
            rows.append(F.pad(x[off:off + c], (0, 0, 0, longest - c)))
            masks.append(torch.cat([torch.ones(c), torch.zeros(longest - c)]).to(x))
            off += c
        x, mask = torch.stack(rows), torch.stack(masks)
        x = x + self.pos_embed[:, :longest]
        q = self.query_embed.expand(x.shape[0], -1, -1)
        for blk in self.blocks:
            q = blk(q, x, mask)
        return self.decode_task_layer(self.norm(q))


class LowresDecoder(FeatureDecoderTrunk):
    """`VQDecoder` (tokenizer_decoder) at the sizes of a manifest's `feature_decoder`."""

    def __init__(self, f):
        super().__init__(f)
        self.unet_proj = nn.Linear(f["decoder_out_dim"], f["lowres_unet_proj"])

    def forward(self, codes, counts):
        """codes [T, in_chans] + per-image counts -> [B, N, lowres_unet_proj]."""
        return self.unet_proj(self.decode(codes, counts))


class HighresDecoder(FeatureDecoderTrunk):
    """`HighresVQDecoder` at the sizes of a manifest's `feature_decoder` section."""

    def __init__(self, f):
        super().__init__(f)
        d, n = f["embed_dim"], f["num_patches"]
        o = f["decoder_out_dim"]
        self.unet_proj_1 = nn.Linear(o, f["highres_unet_proj_1"])
        self.unet_proj_2 = nn.Linear(o, f["highres_unet_proj_2"])
        self.unet_attnpool = AttentionPool(n, o, f["highres_attnpool_heads"],
                                           f["highres_unet_proj_2"])

    def forward(self, codes, counts):
        """codes [T, in_chans] of all images + per-image counts -> (prompt, pooled)."""
        rec = self.decode(codes, counts)
        prompt = torch.cat([self.unet_proj_1(rec), self.unet_proj_2(rec)], -1)
        return prompt, self.unet_attnpool(rec)


def _splitmix64(x):
    import numpy as np  # only the seeded latents need numpy
    x = (x + np.uint64(0x9E3779B97F4A7C15))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seeded_gaussian(seed, shape):
    """lavit's initial latents of a seed (pixel_decoder.rs `seeded_gaussian`): splitmix64 of
    (seed, index) through Box-Muller, float32."""
    import numpy as np
    n = math.prod(shape)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) ^ np.uint64(0x6C617669745F6E6F))
        idx = np.arange(n + (n % 2), dtype=np.uint64)
        bits = _splitmix64(key ^ _splitmix64(idx)) >> np.uint64(11)
    unit = (bits.astype(np.float64) + 0.5) / float(1 << 53)
    u1, u2 = unit[0::2], unit[1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    a = 2.0 * math.pi * u2
    v = np.stack([r * np.cos(a), r * np.sin(a)], 1).reshape(-1)[:n]
    return torch.from_numpy(v.astype(np.float32)).reshape(shape)


@torch.no_grad()
def image_tokens(model, prompt_ids, img_start, img_end, visual_offset, vocab, n_tokens, scale):
    """`n_tokens` visual ids ([/IMG] forbidden throughout, since min = max), greedy on the
    guided scores: l = lsm(uncond) + scale * (lsm(cond) - lsm(uncond)), the cond stream
    prompt + [IMG], the uncond stream [IMG], left-padded into one batch."""
    cond, uncond = prompt_ids + [img_start], [img_start]
    width = len(cond)
    ids = torch.tensor([cond, [0] * (width - 1) + uncond])
    mask = torch.tensor([[1] * width, [0] * (width - 1) + [1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    bias = torch.full((vocab,), float("-inf"))
    bias[visual_offset:] = 0.0
    out = model(ids, attention_mask=mask, position_ids=pos, use_cache=True)
    past, logits, toks = out.past_key_values, out.logits[:, -1], []
    for step in range(n_tokens):
        lsm = logits.float().log_softmax(-1)
        nxt = (lsm[1] + scale * (lsm[0] - lsm[1]) + bias).argmax()
        toks.append(int(nxt))
        if step + 1 == n_tokens:
            break
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        pos = pos[:, -1:] + 1
        out = model(nxt.view(1, 1).repeat(2, 1), attention_mask=mask, position_ids=pos,
                    past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return toks


@torch.no_grad()
def pixels(decoder, unet, vae, scheduler, codebook, codes, steps, guidance, seed, side):
    """The highres pixel decoding of `codes` (codebook indices of one image) at side x side
    px: [1, 3, side, side] in [0, 1]."""
    prompt, pooled = decoder(codebook[codes], [len(codes)])
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    lat = seeded_gaussian(seed, (1, unet.config.in_channels, side // scale, side // scale))
    scheduler.set_timesteps(steps)
    lat = lat * scheduler.init_noise_sigma
    ehs = torch.cat([torch.zeros_like(prompt), prompt])
    te = torch.cat([torch.zeros_like(pooled), pooled])
    tid = torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=torch.float32)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([lat, lat]), t)
        out = unet(x, t, encoder_hidden_states=ehs,
                   added_cond_kwargs={"text_embeds": te, "time_ids": tid}).sample
        uncond, cond = out.chunk(2)
        lat = scheduler.step(uncond + guidance * (cond - uncond), t, lat).prev_sample
    img = vae.decode(lat / vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1)
