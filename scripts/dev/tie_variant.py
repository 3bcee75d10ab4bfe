#!/usr/bin/env python3
"""A variant of the shared fixture whose selector scores some patches with an exact keep/drop
tie, and the tokenizer's reference tensors on it (tests/data/tie-variant.safetensors, read by
tests/tokenizer.rs; development only, nothing at run time needs Python).

torch.argmax over [log p(keep), log p(drop)] returns the first index on an exact tie, so a tied
patch is kept. The variant edits two layers of `token_predictor.out_conv` (Linear 2 → GELU →
Linear 4 → LogSoftmax):

- hidden unit j of `out_conv.2` is rescaled to a·(z_j − c), with c in a wide gap of z_j's
  values over the fixture's patches and a large enough that every patch is ≥ 20 away from 0:
  GELU gives exactly 0 below (erf saturates at −1) and ≥ 20 above;
- `out_conv.4`'s keep row becomes its drop row except at column j (keep = drop − δ), with equal
  biases, so log p(keep) − log p(drop) = −δ·GELU(a·(z_j − c)): exactly 0 (a tie, kept) where
  the unit is off, ≤ −20·δ (dropped) where it is on.

It first checks that the references it computes (tokenizer_reference.py for the tokenizer,
generate_reference.py's feature decoders) reproduce the fixture's own reference tensors (made
by the official modules), then applies the edit and writes the edited tensors (as
`variant.<key>`) with the tokenizer parity rows that depend on the selector, recomputed on the
variant (`images` and `encoder_features` stay the fixture's).

    .venv/bin/python scripts/dev/tie_variant.py ../shared/fixtures/tiny-lavit tests/data/tie-variant.safetensors
"""
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tokenizer_reference as tref  # noqa: E402
from generate_reference import HighresDecoder, LowresDecoder  # noqa: E402

# safetensors dtype names (only what this script reads and writes).
DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}
NAMES = {v: k for k, v in DTYPES.items()}

# The edit: distance of every patch's rescaled unit from 0, and the keep row's offset δ.
MARGIN = 20.0
DELTA = 0.01


def read_safetensors(path):
    """A safetensors file -> {name: tensor} (the format: u64 header size, JSON header, data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        a, b = h["data_offsets"]
        t = torch.frombuffer(bytearray(data[a:b]), dtype=DTYPES[h["dtype"]])
        out[name] = t.reshape(h["shape"]).clone()
    return out


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = bytes(t.reshape(-1).view(torch.uint8).tolist())  # little-endian, as the format
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def feature_decoder_section(folder):
    with open(os.path.join(folder, "manifest.json")) as f:
        return json.load(f)["feature_decoder"]


@torch.no_grad()
def tokenizer_rows(tok, lowres, highres, images):
    """The tokenizer group's parity rows (src/parity/tokenizer.rs ROWS but encoder_features)."""
    tr = tok.tokenize(images, trace=True)
    counts = [int(c) for c in tr["token_counts"]]
    quantized = tok.enc.quantize.embedding.weight[tr["codes"]]
    und, und_counts = tok.understanding_embeds(images)
    prompt, pooled = highres(quantized, counts)
    return {
        "predictor_log_probs": tr["log_probs"],
        "keep_decisions": tr["decisions"],
        "merged_features": tr["merged"],
        "token_counts": tr["token_counts"].to(torch.int64),
        "token_ids": tr["token_ids"].to(torch.int64),
        "quantized_embeddings": quantized,
        "understanding_counts": und_counts.to(torch.int64),
        "understanding_embeddings": und,
        "lowres_decoder_out": lowres(quantized, counts),
        "highres_prompt_embeds": prompt,
        "highres_pooled_embeds": pooled,
    }


def check_against(rows, exp):
    ok = True
    for name, got in rows.items():
        want = exp[name].to(got.dtype)
        if got.is_floating_point() and name != "keep_decisions":
            err = (got - want).abs().max().item()
            good = got.shape == want.shape and err <= 1e-4 * max(1.0, want.abs().max().item())
        else:
            good = got.shape == want.shape and bool((got == want).all())
            err = 0.0 if good else float("inf")
        ok &= good
        print(f"  {name:26s} {'ok' if good else 'MISMATCH'} (max abs err {err:.2e})")
    return ok


@torch.no_grad()
def hidden_preactivations(pred, feats):
    """z = out_conv.2(GELU(out_conv.0(x))) of the selector: [B, N, C/4]."""
    policy = torch.ones(feats.shape[0], feats.shape[1], 1)
    x = pred.in_conv(feats)
    c = x.shape[-1]
    glob = (x[..., c // 2:] * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True)
    x = torch.cat([x[..., : c // 2], glob.expand(-1, x.shape[1], -1)], -1)
    return pred.out_conv[2](pred.out_conv[1](pred.out_conv[0](x)))


def choose_unit(z):
    """(unit j, threshold c, gap): the widest gap between consecutive values of z_j (relative to
    z_j's spread) with between a quarter and three quarters of the patches below it."""
    best = None
    for j in range(z.shape[-1]):
        v = z[..., j].flatten().sort().values
        n = v.numel()
        spread = (v[-1] - v[0]).item()
        for i in range(n // 4, 3 * n // 4):
            gap = (v[i + 1] - v[i]).item()
            if best is None or gap / spread > best[0]:
                best = (gap / spread, j, 0.5 * (v[i] + v[i + 1]).item(), gap)
    _, j, c, gap = best
    return j, c, gap


def main(fixture, out):
    torch.set_num_threads(1)
    exp = read_safetensors(os.path.join(fixture, "reference", "expected.safetensors"))
    images = exp["images"]
    tok = tref.VisualTokenizer.from_folder(fixture)
    tok.load_understanding(fixture)
    f = feature_decoder_section(fixture)
    lowres, highres = LowresDecoder(f).eval(), HighresDecoder(f).eval()
    lowres.load_state_dict(tref.load_state(tref.resolve(fixture, "visual_tokenizer/tokenizer_decoder")))
    highres.load_state_dict(
        tref.load_state(tref.resolve(fixture, "visual_tokenizer/highres_tokenizer_decoder")))

    print("the references reproduce the fixture:")
    if not check_against(tokenizer_rows(tok, lowres, highres, images), exp):
        sys.exit("FAILED: the references do not reproduce the fixture")

    pred = tok.enc.token_predictor
    feats = tok.eva.patch_features(images)
    z = hidden_preactivations(pred, feats)
    j, c, gap = choose_unit(z)
    a = 2.0 * MARGIN / gap
    lin2, lin4 = pred.out_conv[2], pred.out_conv[4]
    with torch.no_grad():
        lin2.weight[j] *= a
        lin2.bias[j] = a * (lin2.bias[j] - c)
        lin4.weight[0] = lin4.weight[1]
        lin4.weight[0, j] = lin4.weight[1, j] - DELTA
        lin4.bias[0] = lin4.bias[1]
    zj = hidden_preactivations(pred, feats)[..., j]
    print(f"unit {j}: threshold {c:.4f} in a gap of {gap:.4f}, scale {a:.1f}; "
          f"smallest |a(z - c)| {zj.abs().min().item():.2f}")

    rows = tokenizer_rows(tok, lowres, highres, images)
    lp = rows["predictor_log_probs"]
    ties = lp[..., 0] == lp[..., 1]
    strict_drop = lp[..., 0] < lp[..., 1]
    n = ties.numel()
    print(f"exact ties {int(ties.sum())} of {n} patches (per image {ties.sum(1).tolist()}), "
          f"strict drops {int(strict_drop.sum())}; kept per image "
          f"{rows['token_counts'].tolist()} (with log p(keep) > log p(drop) it would be "
          f"{(lp[..., 0] > lp[..., 1]).sum(1).tolist()} before the 1-patch floor)")
    if not (0 < int(ties.sum()) < n and int(strict_drop.sum()) > 0):
        sys.exit("FAILED: the variant needs both tied and dropped patches")
    if not bool((rows["keep_decisions"][ties] == 1).all()):
        sys.exit("FAILED: torch.argmax did not keep a tied patch")

    # The inputs (`images`) and `encoder_features` are the fixture's own (the ViT is not edited).
    written = dict(rows)
    for key, t in (("token_predictor.out_conv.2.weight", lin2.weight),
                   ("token_predictor.out_conv.2.bias", lin2.bias),
                   ("token_predictor.out_conv.4.weight", lin4.weight),
                   ("token_predictor.out_conv.4.bias", lin4.bias)):
        written["variant." + key] = t.detach().clone()
    for name, t in list(written.items()):
        ref = exp.get(name)
        if ref is not None and not name.startswith("variant."):
            written[name] = t.to(ref.dtype)
    write_safetensors(out, written)
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1], sys.argv[2])
