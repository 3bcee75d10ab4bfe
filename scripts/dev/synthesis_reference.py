#!/usr/bin/env python3
"""Reference image tokens of multimodal synthesis on the shared fixture (development only;
nothing at run time needs Python): tests/data/synthesis-references.json, which
tests/synthesis.rs checks `Pipeline::synthesize`'s ids against.

The official `LaVITforGeneration.multimodal_synthesis` (jy0205/LaVIT,
LaVIT/models/lavit_for_generation.py) builds its token prompt so:
  - a text part: `llama_tokenizer([text], add_special_tokens=False)` (the slow LlamaTokenizer);
  - an image part: `visual_tokenizer.tokenize_image(image, add_special=False)[0]`, the image's
    visual ids (offset into the vocabulary) without [IMG]/[/IMG] around them;
  - the parts' ids concatenated in order, then `generate_image_tokenids(..., is_token_prompt=True)`
    appends [IMG] and calls `LlamaForCausalLM.generate(inputs_embeds=..., guidance_scale=g,
    suppress_tokens=..., bos_token_id=[IMG], eos_token_id=[/IMG], min/max_new_tokens, ...)`
    with `multimodal_synthesis`'s default guidance 5.0 and no negative prompt.

This script makes that same `generate` call with transformers on the fixture's language model
(float32, CPU, greedy), with two facts of the official setup written out:
  - the unconditional stream: with `negative_prompt_ids=None`, the transformers of LaVIT's time
    started `input_ids` at `bos_token_id` = [IMG] for an `inputs_embeds` prompt, and the
    classifier-free-guidance processor takes the last input id as its unconditional prompt:
    [IMG] alone. Newer transformers start from an empty `input_ids` (and fail there), so it is
    passed explicitly as `negative_prompt_ids=[[IMG]]`;
  - suppressed ids: every id below [/IMG] ([IMG] included), as the fixture's
    `t2i_greedy_cfg_*` references forbid them (the official range(3, 32000) leaves ids 0-2 and
    [IMG] open, which the trained model never picks but random weights may).
The image ids are the fixture's `token_ids` (what the official `tokenize_image` gave for its
images with arg-max selection). As a check, the same call reproduces the fixture's
`t2i_greedy_cfg_*` for the text prompt first.

Needs torch (the project's .venv) plus transformers and sentencepiece:
    .venv/bin/pip install "transformers==4.57.1" "sentencepiece==0.2.3"
    .venv/bin/python scripts/dev/synthesis_reference.py ../shared/fixtures/tiny-lavit \
        > tests/data/synthesis-references.json
"""
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, LlamaTokenizer

# (name, parts, guidance): a part is {"image": index into the fixture's images} or
# {"text": str}. The first is the official inference example's shape (a photo, then
# "It is running in the snow"); the official default guidance of multimodal synthesis is 5.0.
CASES = [
    ("image_text", [{"image": 0}, {"text": "It is running in the snow"}], 5.0),
    ("image_only", [{"image": 1}], 5.0),
    ("text_image_image", [{"text": "a photo of"}, {"image": 2}, {"image": 0}], 2.0),
]


def image_ids(expected):
    """The official visual ids of each fixture image (offset into the vocabulary)."""
    counts = expected["token_counts"].tolist()
    flat = expected["token_ids"].tolist()
    out, at = [], 0
    for n in counts:
        out.append(flat[at:at + n])
        at += n
    return out


@torch.no_grad()
def image_tokens(model, llm, gen, prompt_ids, guidance):
    """The official `generate_image_tokenids` call, greedy: the visual ids generated (the
    leading [IMG] and a final [/IMG] dropped)."""
    p = torch.tensor([prompt_ids + [llm["image_start_id"]]])
    out = model.generate(
        inputs_embeds=model.get_input_embeddings()(p),
        attention_mask=torch.ones_like(p),
        do_sample=False,
        num_beams=1,
        max_new_tokens=gen["t2i_max_new_tokens"],
        min_new_tokens=gen["t2i_min_new_tokens"],
        suppress_tokens=list(range(0, llm["image_end_id"])),
        bos_token_id=llm["image_start_id"],
        eos_token_id=llm["image_end_id"],
        pad_token_id=llm["eos_id"],
        guidance_scale=guidance,
        negative_prompt_ids=torch.tensor([[llm["image_start_id"]]]),
    )[0].tolist()
    return [i for i in out if i >= llm["visual_token_offset"]]


def main():
    d = sys.argv[1]
    manifest = json.load(open(f"{d}/manifest.json"))
    llm, gen = manifest["llm"], manifest["generation"]
    expected = load_file(f"{d}/reference/expected.safetensors")
    tok = LlamaTokenizer.from_pretrained(f"{d}/language_model", use_fast=False, legacy=True)
    model = LlamaForCausalLM.from_pretrained(f"{d}/language_model", dtype=torch.float32).eval()

    def text_ids(t):
        return tok([t], add_special_tokens=False).input_ids[0]

    # The same call reproduces the official text -> image references.
    prompt = text_ids(gen["t2i_prompt"])
    assert prompt == expected["prompt_ids"].tolist(), "the tokenizer differs from the fixture's"
    for a in gen["cfg_scales"]:
        want = expected[f"t2i_greedy_cfg_{a:g}"].tolist()
        got = image_tokens(model, llm, gen, prompt, a)
        assert got == [i for i in want if i >= llm["visual_token_offset"]], (a, got, want)

    images = image_ids(expected)
    cases = []
    for name, parts, guidance in CASES:
        ids = []
        for p in parts:
            ids += images[p["image"]] if "image" in p else text_ids(p["text"])
        cases.append({
            "name": name,
            "parts": parts,
            "llm_guidance": guidance,
            "prompt_ids": ids,
            "image_tokens": image_tokens(model, llm, gen, ids, guidance),
        })
    json.dump({
        "about": "scripts/dev/synthesis_reference.py on the shared fixture: the official "
                 "multimodal_synthesis token prompt and LlamaForCausalLM.generate with "
                 "classifier-free guidance, greedy, float32",
        "t2i_max_new_tokens": gen["t2i_max_new_tokens"],
        "t2i_min_new_tokens": gen["t2i_min_new_tokens"],
        "cases": cases,
    }, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
