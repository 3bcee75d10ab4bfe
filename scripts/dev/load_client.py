#!/usr/bin/env python3
"""HTTP load of a running `lavit serve` (issue 28): N requests of one kind at concurrency C.

    python3 scripts/dev/load_client.py URL KIND C N [--image PNG] [--steps S] [--n IMAGES]

KIND: t2i (POST /v1/images/generations), caption (POST /v1/chat/completions with an image),
mix (the two alternating). Prints one line:

    load KIND c=C rps=R p50_s=A p95_s=B n=N ok=K http_5xx=E other=O

rps = N / wall time from the first request sent to the last answer; p50/p95 over the N
latencies. The standard library only (urllib, threads), so it runs beside the server with
nothing installed.
"""

import base64
import json
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib


def synthetic_png(side=28):
    """A small RGB gradient PNG (no imaging library needed)."""
    rows = b"".join(
        b"\x00" + bytes((x * 9 + y * 3) % 256 for x in range(side) for _ in range(3))
        for y in range(side)
    )

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def body_of(kind, i, image_b64, args):
    if kind == "t2i":
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "n": args["n"], "seed": i}
        if args["steps"]:
            body["steps"] = args["steps"]
        return "/v1/images/generations", body
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64}}]
    return "/v1/chat/completions", {"model": "lavit", "messages": [{"role": "user", "content": content}]}


PROMPTS = [
    "a photo of a shirt",
    "a photo of a sneaker",
    "a photo of a bag",
    "a photo of a dress",
    "a photo of a coat",
    "a photo of an ankle boot",
    "a photo of a pullover",
    "a photo of a sandal",
]


def main():
    if len(sys.argv) < 5:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    url, kind, c, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    opts = dict(zip(sys.argv[5::2], sys.argv[6::2]))
    image = open(opts["--image"], "rb").read() if "--image" in opts else synthetic_png()
    image_b64 = base64.b64encode(image).decode()
    args = {"steps": int(opts.get("--steps", 0)), "n": int(opts.get("--n", 1))}
    kinds = {"t2i": ["t2i"], "caption": ["caption"], "mix": ["t2i", "caption"]}[kind]
    lat, codes = [None] * n, [None] * n
    next_i = [0]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= n:
                return
            path, body = body_of(kinds[i % len(kinds)], i, image_b64, args)
            req = urllib.request.Request(
                url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    r.read()
                    codes[i] = r.status
            except urllib.error.HTTPError as e:
                codes[i] = e.code
            except Exception:  # connection refused / reset: counted as "other"
                codes[i] = 0
            lat[i] = time.perf_counter() - t0

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    s = sorted(lat)
    pct = lambda q: s[min(len(s) - 1, int(q * len(s)))]
    ok = sum(1 for x in codes if x == 200)
    e5 = sum(1 for x in codes if x and x >= 500)
    print(
        f"load {kind} c={c} rps={n / wall:.2f} p50_s={pct(0.5):.3f} p95_s={pct(0.95):.3f} "
        f"n={n} ok={ok} http_5xx={e5} other={n - ok - e5}",
        flush=True,
    )


if __name__ == "__main__":
    main()
