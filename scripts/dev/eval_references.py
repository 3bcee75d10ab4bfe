"""Reference values for `lavit eval`'s metrics (tests/data/eval-references.json).

Computed with the real COCO caption evaluation and scipy, so the Rust implementations in
src/eval/ are checked against them in tests/eval.rs:

- PTB tokenisation: pycocoevalcap's PTBTokenizer (the Stanford CoreNLP 3.4.1 jar it ships,
  run with Java) followed by its punctuation filter;
- BLEU-1..4 and CIDEr-D: pycocoevalcap's Bleu(4) and Cider() scorers on pre-tokenised,
  lower-case text (what they take);
- FID: pytorch-fid's formula with scipy.linalg.sqrtm on seeded random embeddings.

Setup (any Python 3 with Java on PATH):
    python3 -m venv /tmp/evalref && /tmp/evalref/bin/pip install pycocoevalcap scipy numpy
    /tmp/evalref/bin/python scripts/dev/eval_references.py > tests/data/eval-references.json
"""

import json
import shutil
import sys

import numpy as np
from scipy import linalg
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

RAW_SENTENCES = [
    "A man's dog (brown) is \"happy\", isn't it?",
    "Two dogs... playing -- in the snow; 3.5 feet, 1,000 dollars!",
    "I can't, won't; they're we've you'll she'd I'm. The dogs' toys.",
    "A giraffe standing next to a tree in the U.S. zoo.",
    "Mr. Smith rides a black-and-white bike: fast!",
    "A photo of a T-shirt/top.",
    "  Several   people walking down a   street  ",
]

# Hand-made corpora (already tokenised, lower case): hypothesis, references.
CORPORA = {
    "exact": [
        ("a dog runs on the grass", ["a dog runs on the grass", "a brown dog is running"]),
        ("two cats sleep on a bed", ["two cats sleep on a bed", "cats sleeping together"]),
    ],
    "short_hypotheses": [
        ("a dog", ["a dog runs on the grass", "a brown dog is running outside"]),
        ("cats on a bed", ["two cats sleep on a bed", "two cats are sleeping on a red bed"]),
        ("a man", ["a man rides a horse on the beach", "a person riding a horse"]),
    ],
    "mixed": [
        ("a man riding a horse on a beach", ["a man rides a horse on the beach", "a person riding a horse near the ocean", "horse and rider on the sand"]),
        ("a plate of food with broccoli", ["a plate with broccoli and rice", "a dish of vegetables and rice on a table", "broccoli and rice on a white plate"]),
        ("a red bus on the street", ["a double decker bus driving down a street", "a red bus in the city", "a bus on a road"]),
        ("the the the the", ["a cat sitting on a couch", "a cat on the sofa"]),
        ("a photo of a trouser", ["a photo of a trouser", "a picture of a trouser", "this is a trouser", "an image of a trouser"]),
    ],
    "fashion": [
        ("a photo of a trouser", ["a photo of a trouser", "a picture of a trouser", "this is a trouser", "an image of a trouser"]),
        ("a photo of a bag", ["a photo of a sneaker", "a picture of a sneaker", "this is a sneaker", "an image of a sneaker"]),
        ("a picture of a coat", ["a photo of a coat", "a picture of a coat", "this is a coat", "an image of a coat"]),
        ("an image of an ankle boot", ["a photo of an ankle boot", "a picture of an ankle boot", "this is an ankle boot", "an image of an ankle boot"]),
    ],
}


def ptb(sentences):
    tok = PTBTokenizer()
    data = {i: [{"caption": s}] for i, s in enumerate(sentences)}
    out = tok.tokenize(data)
    return [out[i][0] for i in range(len(sentences))]


def score(corpus):
    gts = {i: refs for i, (_, refs) in enumerate(corpus)}
    res = {i: [hyp] for i, (hyp, _) in enumerate(corpus)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per = Cider().compute_score(gts, res)
    return {
        "items": [{"hypothesis": h, "references": r} for h, r in corpus],
        "bleu": [float(b) for b in bleu],
        "cider_d": float(cider),
        "cider_d_per_item": [float(c) for c in per],
    }


def fid(a, b):
    # pytorch-fid calculate_frechet_distance (scipy sqrtm, real part)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = covmean.real
    d = mu1 - mu2
    return float(d.dot(d) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_cases():
    rng = np.random.default_rng(19)
    cases = []
    # well conditioned: 60 vs 50 samples in 6-d, different means and scales
    a = rng.normal(size=(60, 6))
    b = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6)) * 0.7 + 0.5
    cases.append(("full_rank", a, b))
    # correlated, one set nearly low-rank
    base = rng.normal(size=(40, 3))
    a = np.concatenate([base, base @ rng.normal(size=(3, 5)) + 1e-3 * rng.normal(size=(40, 5))], 1)
    b = rng.normal(size=(45, 8)) * 2.0 - 1.0
    cases.append(("near_singular", a, b))
    # identical sets: distance 0
    a = rng.normal(size=(30, 4))
    cases.append(("identical", a, a.copy()))
    return [
        {"name": n, "a": x.tolist(), "b": y.tolist(), "fid": fid(x, y)} for n, x, y in cases
    ]


def main():
    if shutil.which("java") is None:
        sys.exit("the PTB tokenizer needs java on PATH")
    out = {
        "about": "written by scripts/dev/eval_references.py (pycocoevalcap "
        "Bleu/Cider/PTBTokenizer, scipy sqrtm); do not edit by hand",
        "ptb": [{"raw": s, "tokens": t} for s, t in zip(RAW_SENTENCES, ptb(RAW_SENTENCES))],
        "corpora": {name: score(c) for name, c in CORPORA.items()},
        "fid": fid_cases(),
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
