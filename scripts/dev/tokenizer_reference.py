#!/usr/bin/env python3
"""PyTorch-eager reference of LaVIT's dynamic visual tokenizer (development only; nothing at run
time needs Python): the EVA-CLIP ViT, the token selector (`token_predictor`), the token merger
(`causal_encoder`), `encode_task_layer` and the l2-normalised codebook (`quantize`), built from a
manifest's `tokenizer` section and loaded from a LaVIT folder with the official key names.

It mirrors lavit's own code step for step (actors/encoder/src/eva_vit.rs,
actors/selector/src/{token_predictor,token_merger,selection,stage}.rs,
actors/quantizer/src/*.rs, src/tokenizer.rs `tokenize_with`), written independently of the
official jy0205/LaVIT modules; `--check` proves it is the same computation on the shared
fixture, whose reference tensors the official modules computed.

    .venv/bin/python scripts/dev/tokenizer_reference.py --check ../shared/fixtures/tiny-lavit

scripts/dev/bench_reference.py imports it for the tokenizer stage of the bench.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

# The official LaVIT-7B-v2 values (runtime/src/manifest.rs); a manifest overrides them.
TOKENIZER_DEFAULTS = dict(
    img_size=224, patch_size=14, encoder_width=1408, encoder_depth=40, encoder_heads=16,
    encoder_mlp_ratio=4.3637, encoder_norm_eps=1e-6, encoder_head_dim_out=1024,
    merger_depth=12, merger_heads=16, merger_mlp_ratio=4.3637, merger_qkv_bias=True,
    merger_norm_eps=1e-5, n_code=16384, code_dim=32, llm_hidden=4096, selection="argmax",
    selection_seed=0, selection_note=None,
)
LLM_DEFAULTS = dict(text_vocab_size=32000, image_start_id=32000, image_end_id=32001,
                    visual_token_offset=32002, vocab_size=48386, bos_id=1, eos_id=2)

EVA_FILE = "visual_tokenizer/eva_vitg_psz14"
ENCODER_FILE = "visual_tokenizer/tokenizer_encoder"
VISUAL_WEIGHT_FILE = "language_model/visual_weight"

# Key prefixes of tokenizer_encoder, one per part (runtime/src/layout.rs).
ENCODER_PARTS = ("token_predictor", "causal_encoder", "vit_proj", "encode_task_layer", "quantize")

# The selector's LayerNorm eps is hard-coded (token_predictor.rs), not the manifest's.
PREDICTOR_NORM_EPS = 1e-5
# softmax_with_policy's eps (token_merger.rs).
POLICY_EPS = 1e-6
# Fewest patches an image keeps (selection.rs MIN_KEPT).
MIN_KEPT = 1


def mlp_hidden(dim, ratio):
    """int(dim * mlp_ratio), as Python and lavit's mlp_hidden compute it."""
    return int(dim * ratio)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


# ---------------------------------------------------------------------------------------------
# EVA-CLIP ViT (eva_vitg_psz14): qkv without bias plus q_bias / v_bias (k bias zero), no layer
# scale, no rope, no relative position bias; LaVIT reads every token after the last block with
# no final norm (`norm` and `head` are in the file but unused).


class PatchEmbed(nn.Module):
    def __init__(self, patch, width):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class EvaAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, hs)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class EvaBlock(nn.Module):
    def __init__(self, dim, heads, ratio, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EvaAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden(dim, ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaViT(nn.Module):
    def __init__(self, t):
        super().__init__()
        w = t["encoder_width"]
        n = (t["img_size"] // t["patch_size"]) ** 2
        self.img_size = t["img_size"]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, w))
        self.patch_embed = PatchEmbed(t["patch_size"], w)
        self.blocks = nn.ModuleList(
            EvaBlock(w, t["encoder_heads"], t["encoder_mlp_ratio"], t["encoder_norm_eps"])
            for _ in range(t["encoder_depth"]))
        self.norm = nn.LayerNorm(w, eps=t["encoder_norm_eps"])
        self.head = nn.Linear(w, t["encoder_head_dim_out"])

    def all_features(self, images):
        """`forward(x, return_all_features=True)`: [B, 1+N, C], cls first, no final norm."""
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"images must be {self.img_size} px, got {tuple(images.shape)}")
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x

    def patch_features(self, images):
        return self.all_features(images)[:, 1:]


# ---------------------------------------------------------------------------------------------
# Token selector: log-probs [B, N, 2], index 0 = keep.


class TokenPredictor(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.in_conv = nn.Sequential(
            nn.LayerNorm(c, eps=PREDICTOR_NORM_EPS), nn.Linear(c, c), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(c, c // 2), nn.GELU(), nn.Linear(c // 2, c // 4), nn.GELU(),
            nn.Linear(c // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x, policy):
        """x [B, N, C], policy [B, N, 1] -> [B, N, 2]: the first half of the channels stays
        per token, the second half is averaged over the policy's tokens."""
        x = self.in_conv(x)
        c = x.shape[-1]
        local = x[..., : c // 2]
        glob = (x[..., c // 2:] * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True)
        x = torch.cat([local, glob.expand(-1, x.shape[1], -1)], -1)
        return self.out_conv(x)


def keep_argmax(log_probs):
    """Decisions [B, N] in {0., 1.}: keep where torch.argmax over [keep, drop] is 0 (an exact
    tie keeps, NaN counts as the maximum), then every image keeps at least MIN_KEPT patches
    (its best-margin dropped ones, equal margins in raster order)."""
    dec = (log_probs.argmax(-1) == 0).to(log_probs.dtype)
    n = dec.shape[1]
    need_min = min(MIN_KEPT, n)
    counts = (dec > 0.5).sum(1, keepdim=True)
    if need_min > 0 and int(counts.min()) < need_min:
        margin = log_probs[..., 0] - log_probs[..., 1]
        margin = margin.masked_fill(dec > 0.5, float("-inf"))
        order = margin.sort(dim=1, descending=True, stable=True).indices
        best = order[:, :need_min]  # (B, min), dropped patches first
        need = (need_min - counts).clamp_min(0)
        take = (torch.arange(need_min, device=dec.device).unsqueeze(0) < need).to(dec.dtype)
        dec = dec + torch.zeros_like(dec).scatter(1, best, take)
    return dec


# ---------------------------------------------------------------------------------------------
# Token merger (`causal_encoder`): causal self-attention among kept tokens (each also sees
# itself), cross-attention onto the dropped tokens of ln_vision(features), MLP.


def policy_softmax(attn, attn_policy):
    """softmax_with_policy's tail: exp(a - max) * policy, then (a + eps/N) / (sum + eps)."""
    n = attn.shape[-1]
    a = (attn - attn.amax(-1, keepdim=True)).float().exp() * attn_policy.float()
    return ((a + POLICY_EPS / n) / (a.sum(-1, keepdim=True) + POLICY_EPS)).to(attn.dtype)


class TokenCausalAttention(nn.Module):
    def __init__(self, dim, heads, bias):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, decisions):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        pol = decisions.reshape(b, 1, 1, n)
        eye = torch.eye(n, dtype=pol.dtype, device=pol.device).view(1, 1, n, n)
        pol = pol + (1.0 - pol) * eye
        causal = torch.ones(n, n, dtype=pol.dtype, device=pol.device).tril().view(1, 1, n, n)
        attn = policy_softmax(attn, pol * causal)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TokenCrossAttention(nn.Module):
    def __init__(self, dim, heads, bias):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.query = nn.Linear(dim, dim, bias=bias)
        self.key = nn.Linear(dim, dim, bias=bias)
        self.value = nn.Linear(dim, dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, x_origin, decisions):
        b, n, c = x.shape

        def heads(t):
            return t.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x_origin)), heads(self.value(x_origin))
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = policy_softmax(attn, (1.0 - decisions).reshape(b, 1, 1, n))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class CausalFuserBlock(nn.Module):
    def __init__(self, dim, heads, ratio, bias, eps):
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=eps)
        self.token_causal_attn = TokenCausalAttention(dim, heads, bias)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.token_cross_attn = TokenCrossAttention(dim, heads, bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden(dim, ratio))

    def forward(self, x, x_origin, decisions):
        x = x + self.token_causal_attn(self.norm0(x), decisions)
        x = x + self.token_cross_attn(self.norm1(x), x_origin, decisions)
        return x + self.mlp(self.norm2(x))


class TokenMerger(nn.Module):
    def __init__(self, t):
        super().__init__()
        w, eps = t["encoder_width"], t["merger_norm_eps"]
        self.blocks = nn.ModuleList(
            CausalFuserBlock(w, t["merger_heads"], t["merger_mlp_ratio"], t["merger_qkv_bias"], eps)
            for _ in range(t["merger_depth"]))
        self.ln_vision = nn.LayerNorm(w, eps=eps)
        self.norm = nn.LayerNorm(w, eps=eps)

    def forward(self, x, decisions):
        """x [B, N, C] patch features, decisions [B, N] -> [B, N, C] at every position."""
        x_origin = self.ln_vision(x)
        for blk in self.blocks:
            x = blk(x, x_origin, decisions)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# Quantizer: encode_task_layer = Linear, Tanh, Linear; l2-normalised z, nearest row of
# `quantize.embedding.weight` by squared distance (the weight is used as stored).


class VectorQuantizer(nn.Module):
    def __init__(self, n_code, code_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_code, code_dim)

    def nearest(self, z):
        z = F.normalize(z, p=2, dim=-1, eps=1e-12)
        w = self.embedding.weight
        d = z.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2.0 * (z @ w.t())
        return d.argmin(1)


class TokenizerEncoder(nn.Module):
    """The parts of `tokenizer_encoder.*` (key prefixes: ENCODER_PARTS)."""

    def __init__(self, t):
        super().__init__()
        w = t["encoder_width"]
        self.token_predictor = TokenPredictor(w)
        self.causal_encoder = TokenMerger(t)
        self.vit_proj = nn.Linear(w, t["llm_hidden"])
        self.encode_task_layer = nn.Sequential(
            nn.Linear(w, w), nn.Tanh(), nn.Linear(w, t["code_dim"]))
        self.quantize = VectorQuantizer(t["n_code"], t["code_dim"])


class UnderstandingHead(nn.Module):
    """`language_model/visual_weight.*`: the merger and vit_proj tuned with the LLM."""

    def __init__(self, t):
        super().__init__()
        self.causal_encoder = TokenMerger(t)
        self.vit_proj = nn.Linear(t["encoder_width"], t["llm_hidden"])


# ---------------------------------------------------------------------------------------------


def resolve(folder, name):
    for ext in ("bin", "safetensors"):
        p = os.path.join(folder, f"{name}.{ext}")
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{folder}: neither {name}.bin nor {name}.safetensors exists")


def load_state(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_manifest(folder):
    """(tokenizer section, llm section) with the official defaults under them."""
    t, llm = dict(TOKENIZER_DEFAULTS), dict(LLM_DEFAULTS)
    p = os.path.join(folder, "manifest.json")
    if os.path.exists(p):
        m = json.load(open(p))
        for sec, dst in (("tokenizer", t), ("llm", llm)):
            extra = set(m.get(sec, {})) - set(dst)
            if extra:
                raise ValueError(f"{p}: unknown keys in `{sec}`: {sorted(extra)}")
            dst.update(m.get(sec, {}))
    if t["selection"] != "argmax":
        print(f"note: manifest selection is {t['selection']!r}; this reference always uses arg-max",
              file=sys.stderr)
    return t, llm


class VisualTokenizer:
    """EVA ViT -> selector (arg-max) -> merger -> encode_task_layer -> codebook -> ids + offset."""

    def __init__(self, t, visual_token_offset):
        self.t = t
        self.offset = visual_token_offset
        self.eva = EvaViT(t).eval()
        self.enc = TokenizerEncoder(t).eval()
        self.understanding = None

    def load_eva(self, sd, source="eva"):
        self.eva.load_state_dict(sd, strict=True)

    def load_tokenizer_encoder(self, sd, source="tokenizer_encoder"):
        """Every key belongs to one part; each part is loaded strictly."""
        stray = sorted(k for k in sd if k.split(".", 1)[0] not in ENCODER_PARTS)
        if stray:
            raise KeyError(f"{source}: keys no part loads: {stray[:8]}")
        for part in ENCODER_PARTS:
            sub = {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
            getattr(self.enc, part).load_state_dict(sub, strict=True)

    @classmethod
    def from_folder(cls, folder):
        t, llm = read_manifest(folder)
        me = cls(t, llm["visual_token_offset"])
        p = resolve(folder, EVA_FILE)
        me.load_eva(load_state(p), p)
        p = resolve(folder, ENCODER_FILE)
        me.load_tokenizer_encoder(load_state(p), p)
        return me

    def load_understanding(self, folder):
        head = UnderstandingHead(self.t).eval()
        head.load_state_dict(load_state(resolve(folder, VISUAL_WEIGHT_FILE)), strict=True)
        self.understanding = head

    def to(self, device, dtype):
        """Move both modules (the official code runs the whole tokenizer in one dtype)."""
        self.eva.to(device, dtype)
        self.enc.to(device, dtype)
        return self

    def state_dicts(self):
        """(eva state dict, tokenizer_encoder state dict) with the official key names."""
        return self.eva.state_dict(), self.enc.state_dict()

    @torch.no_grad()
    def select(self, features):
        policy = torch.ones(features.shape[0], features.shape[1], 1, dtype=features.dtype,
                            device=features.device)
        log_probs = self.enc.token_predictor(features, policy)
        return log_probs, keep_argmax(log_probs)

    @torch.no_grad()
    def tokenize(self, images, trace=False):
        """images [B, 3, S, S] (CLIP-normalised) -> (patch_features [B, N, C], decisions [B, N],
        merged [B, N, C], token_counts [B] int64, token_ids [T] int64 = code + offset, the kept
        positions of every image in raster order, images concatenated). With trace, a dict
        that also has the log-probs and the raw code ids."""
        feats = self.eva.patch_features(images)
        log_probs, dec = self.select(feats)
        merged = self.enc.causal_encoder(feats, dec)
        keep = dec > 0.5
        counts = keep.sum(1)
        kept = merged[keep]  # (T, C), raster order within each image
        codes = self.enc.quantize.nearest(self.enc.encode_task_layer(kept))
        ids = codes + self.offset
        if trace:
            return dict(patch_features=feats, log_probs=log_probs, decisions=dec, merged=merged,
                        token_counts=counts, token_ids=ids, codes=codes)
        return feats, dec, merged, counts, ids

    @torch.no_grad()
    def understanding_embeds(self, images):
        """The understanding path (`encode_features`): kept merged features through vit_proj."""
        head = self.understanding or self.enc
        feats = self.eva.patch_features(images)
        _, dec = self.select(feats)
        out = head.vit_proj(head.causal_encoder(feats, dec))
        keep = dec > 0.5
        return out[keep], keep.sum(1)


def check(fixture):
    from safetensors.torch import load_file
    exp = load_file(os.path.join(fixture, "reference", "expected.safetensors"))
    tok = VisualTokenizer.from_folder(fixture)
    images = exp["images"]
    tr = tok.tokenize(images, trace=True)
    with torch.no_grad():
        all_feats = tok.eva.all_features(images)
    ok = True

    def close(name, got, want):
        nonlocal ok
        err = (got - want).abs().max().item()
        scale = max(1.0, want.abs().max().item())
        good = err <= 1e-4 * scale
        ok &= good
        print(f"{name:28s} max abs err {err:.3e} (|ref| max {want.abs().max().item():.3g}) "
              f"{'ok' if good else 'MISMATCH'}")

    def equal(name, got, want):
        nonlocal ok
        same = got.shape == want.shape and bool((got == want).all())
        ok &= same
        extra = "" if same else f"  got {got.tolist()} want {want.tolist()}"
        print(f"{name:28s} exactly equal: {same}{extra}")

    close("encoder_features", all_feats, exp["encoder_features"])
    close("patch_features", tr["patch_features"], exp["encoder_features"][:, 1:])
    close("predictor_log_probs", tr["log_probs"], exp["predictor_log_probs"])
    equal("keep_decisions", tr["decisions"], exp["keep_decisions"].to(tr["decisions"].dtype))
    close("merged_features", tr["merged"], exp["merged_features"])
    equal("token_counts", tr["token_counts"], exp["token_counts"])
    equal("token_ids", tr["token_ids"], exp["token_ids"])
    close("quantized_embeddings", tok.enc.quantize.embedding.weight[tr["codes"]],
          exp["quantized_embeddings"])
    try:
        resolve(fixture, VISUAL_WEIGHT_FILE)
        has_vw = True
    except FileNotFoundError:
        has_vw = False
    if has_vw and "understanding_embeddings" in exp:
        tok.load_understanding(fixture)
        emb, counts = tok.understanding_embeds(images)
        equal("understanding_counts", counts, exp["understanding_counts"])
        close("understanding_embeddings", emb, exp["understanding_embeddings"])
    margin = (tr["log_probs"][..., 0] - tr["log_probs"][..., 1]).abs().min().item()
    print(f"smallest |keep - drop| log-prob margin: {margin:.3e}")
    print("OK: the reference reproduces the fixture" if ok
          else "FAILED: mismatch against the fixture")
    return 0 if ok else 1


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        sys.exit(check(sys.argv[2]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
