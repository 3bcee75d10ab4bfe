#!/usr/bin/env python3
"""The official `openai` Python client, unmodified, against `lavit serve` on 127.0.0.1.

Two servers are started from the built binary, each on a free port:
  - the tiny LaVIT fixture (real stages; ../shared/fixtures/tiny-lavit): models.list/retrieve,
    images.generate (b64_json, n, size, the `seed` extension), images.edit (multipart: one
    image or several, with and without text; too many images, a mask, a broken image, a
    `url` format and another model refused), chat.completions with an
    image_url data URL, non-streamed `usage`, stream=True with stream_options.include_usage,
    the API key from the config overridden by the environment, the token view's keep mask;
  - the mock stages with one request slot, no queue and fault injection on: RateLimitError
    (429) while a long request holds the slot, InternalServerError (500) from an injected stage
    fault, BadRequestError (400), NotFoundError (404), AuthenticationError (401).
The client runs with `_strict_response_validation=True` (every reply must match its models)
and no retries. Exits non-zero on the first failure.

    .venv/bin/python scripts/openai-check.py [--lavit target/debug/lavit] [--fixture DIR]
"""
import argparse
import base64
import http.client
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib

import openai
from openai import OpenAI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = []


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    CHECKS.append(what)


def png(width, height, seed=0):
    """A small RGB PNG (no imaging library needed): a gradient with a bright square."""
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            inside = width // 4 <= x < width // 2 and height // 4 <= y < height // 2
            row += bytes([255, 220, 40]) if inside else bytes(
                [(x * 5 + seed * 40) % 256, (y * 3) % 256, (90 + seed * 17) % 256])
        rows.append(bytes(row))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def png_size(data):
    """(width, height) from a PNG's header, checking the signature."""
    check(data[:8] == b"\x89PNG\r\n\x1a\n", "b64_json decodes to a PNG")
    return struct.unpack(">II", data[16:24])


class Server:
    """`lavit serve` on 127.0.0.1:0 with a config written to a temporary folder."""

    def __init__(self, lavit, name, config, env=None):
        self.dir = tempfile.mkdtemp(prefix=f"lavit-openai-{name}-")
        path = os.path.join(self.dir, "serve.toml")
        with open(path, "w") as f:
            f.write(config)
        self.log = open(os.path.join(self.dir, "server.log"), "w+")
        e = {k: v for k, v in os.environ.items() if k != "LAVIT_API_KEY"}
        e.update(env or {})
        self.proc = subprocess.Popen(
            [lavit, "serve", "--config", path, "--bind", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=self.log, env=e, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.fail(f"{name}: no 'listening on' line (got {line!r})")
        self.url = line.split()[-1]
        self.addr = self.url.removeprefix("http://")
        deadline = time.time() + 120
        while self.get("/ready")[0] != 200:
            if self.proc.poll() is not None or time.time() > deadline:
                self.fail(f"{name}: not ready")
            time.sleep(0.2)

    def fail(self, msg):
        self.stop()
        self.log.seek(0)
        sys.stderr.write(self.log.read()[-4000:])
        raise SystemExit(msg)

    def get(self, path, headers=None):
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def post(self, path, body, headers=None):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def metric(self, name):
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def client(self, key="none", **kw):
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120,
                      _strict_response_validation=True, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def expect(exc_type, status, fn, param=None):
    """`fn()` must raise `exc_type` with `status` (and the `param` named in the error body)."""
    try:
        fn()
    except exc_type as e:
        check(e.status_code == status, f"{exc_type.__name__} has status {status}")
        check(isinstance(e.body, dict) and {"message", "type", "param", "code"} <= e.body.keys(),
              f"{exc_type.__name__}: the error object has message, type, param, code")
        if param is not None:
            check(e.param == param, f"{exc_type.__name__}: param is {param!r} (got {e.param!r})")
        return e
    except openai.APIError as e:
        raise AssertionError(f"expected {exc_type.__name__}, got {type(e).__name__}: {e}")
    raise AssertionError(f"expected {exc_type.__name__}, nothing was raised")


def fixture_checks(lavit, fixture):
    cfg = f"""
[server]
bind = "127.0.0.1:0"
workers = 2
api_key = "from-the-config"
api_key_env = "LAVIT_API_KEY"
warmup = true

[pipeline]
stages = "checkpoint"
checkpoint = "{fixture}"
placement_file = "{ROOT}/configs/placement-cpu.toml"
max_in_flight = 2
max_queue = 4
"""
    s = Server(lavit, "fixture", cfg, env={"LAVIT_API_KEY": "from-the-env"})
    try:
        # The environment overrides the config's key.
        expect(openai.AuthenticationError, 401,
               lambda: s.client("from-the-config").models.list())
        expect(openai.AuthenticationError, 401, lambda: s.client("wrong").models.list())
        c = s.client("from-the-env")
        models = c.models.list()
        check([m.id for m in models] == ["lavit"], "models.list() gives [lavit]")
        check(models.data[0].object == "model" and models.data[0].owned_by, "model object")
        check(c.models.retrieve("lavit").id == "lavit", "models.retrieve(lavit)")
        expect(openai.NotFoundError, 404, lambda: c.models.retrieve("gpt-4o"))

        _, info = s.get("/playground/info")
        info = json.loads(info)
        w, h = info["default_size"]
        side = info["image_size"]

        # images.generate: b64_json, n, size, seed (an extension: extra_body).
        r = c.images.generate(prompt="a photo of a cat", n=2, size=f"{w}x{h}",
                              response_format="b64_json", extra_body={"seed": 7, "steps": 3})
        check(len(r.data) == 2, "images.generate n=2 gives 2 images")
        first = [base64.b64decode(d.b64_json) for d in r.data]
        check(all(png_size(p) == (w, h) for p in first), f"images are {w}x{h}")
        again = c.images.generate(prompt="a photo of a cat", n=2, size=f"{w}x{h}",
                                  response_format="b64_json",
                                  extra_body={"seed": 7, "steps": 3})
        check([base64.b64decode(d.b64_json) for d in again.data] == first,
              "the same seed gives the same images")
        other = c.images.generate(prompt="a photo of a cat", n=2, size=f"{w}x{h}",
                                  response_format="b64_json",
                                  extra_body={"seed": 8, "steps": 3})
        check([base64.b64decode(d.b64_json) for d in other.data] != first,
              "another seed gives other images")
        expect(openai.BadRequestError, 400,
               lambda: c.images.generate(prompt="x", n=100), param="n")
        expect(openai.BadRequestError, 400,
               lambda: c.images.generate(prompt="x", size="7x7"), param="size")
        expect(openai.BadRequestError, 400,
               lambda: c.images.generate(prompt="x", response_format="url"),
               param="response_format")
        expect(openai.NotFoundError, 404,
               lambda: c.images.generate(prompt="x", model="dall-e-3"), param="model")

        # images.edit: multimodal synthesis (the images, then the prompt text → image) as
        # multipart/form-data; one image or several (sent as image[]), the `seed`/`steps`
        # extensions as extra form fields.
        photo, other_photo = png(side, side, seed=1), png(side, side, seed=2)
        r = c.images.edit(image=("dog.png", photo, "image/png"),
                          prompt="It is running in the snow", n=1, size=f"{w}x{h}",
                          response_format="b64_json", extra_body={"seed": 3, "steps": 2})
        check(len(r.data) == 1, "images.edit gives 1 image")
        edit = base64.b64decode(r.data[0].b64_json)
        check(png_size(edit) == (w, h), f"images.edit image is {w}x{h}")
        again = c.images.edit(image=("dog.png", photo, "image/png"),
                              prompt="It is running in the snow", n=1, size=f"{w}x{h}",
                              response_format="b64_json", extra_body={"seed": 3, "steps": 2})
        check(base64.b64decode(again.data[0].b64_json) == edit,
              "images.edit: the same seed gives the same image")
        r = c.images.edit(image=[("a.png", photo, "image/png"),
                                 ("b.png", other_photo, "image/png")],
                          prompt="", n=2, response_format="b64_json",
                          extra_body={"seed": 3, "steps": 2})
        check(len(r.data) == 2 and all(png_size(base64.b64decode(d.b64_json)) == (w, h)
                                       for d in r.data),
              "images.edit with two images and no text gives n=2 images")
        expect(openai.BadRequestError, 400, lambda: c.images.edit(
            image=[("a.png", photo, "image/png")] * 9, prompt="x"), param="image")
        expect(openai.BadRequestError, 400, lambda: c.images.edit(
            image=("a.png", photo, "image/png"), mask=("m.png", photo, "image/png"),
            prompt="x"), param="mask")
        expect(openai.BadRequestError, 400, lambda: c.images.edit(
            image=("a.png", photo[:60], "image/png"), prompt="x"), param="image[0]")
        expect(openai.BadRequestError, 400, lambda: c.images.edit(
            image=("a.png", photo, "image/png"), prompt="x", response_format="url"),
            param="response_format")
        expect(openai.NotFoundError, 404, lambda: c.images.edit(
            image=("a.png", photo, "image/png"), prompt="x", model="dall-e-2"), param="model")

        # chat.completions with an image_url data URL.
        url = "data:image/png;base64," + base64.b64encode(png(side, side)).decode()
        messages = [{"role": "user", "content": [
            {"type": "text", "text": "What is in the image?"},
            {"type": "image_url", "image_url": {"url": url}}]}]
        r = c.chat.completions.create(model="lavit", messages=messages, max_tokens=6)
        text = r.choices[0].message.content
        check(isinstance(text, str) and r.choices[0].message.role == "assistant",
              "chat reply has assistant text")
        u = r.usage
        check(u is not None and 1 <= u.completion_tokens <= 6, "usage.completion_tokens")
        check(u.prompt_tokens > 3, "usage.prompt_tokens counts the image and the question")
        check(u.total_tokens == u.prompt_tokens + u.completion_tokens, "usage.total_tokens")
        check(r.choices[0].finish_reason in ("stop", "length"), "finish_reason")
        check(r.model == "lavit" and r.object == "chat.completion", "chat.completion object")

        # Streamed with include_usage: the same text, then one usage chunk with no choices.
        chunks = list(c.chat.completions.create(
            model="lavit", messages=messages, max_tokens=6, stream=True,
            stream_options={"include_usage": True}))
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        check(streamed == text, "streamed text = non-streamed text")
        check(chunks[-1].choices == [] and chunks[-1].usage is not None,
              "the last chunk carries usage and empty choices")
        check(chunks[-1].usage.completion_tokens == u.completion_tokens
              and chunks[-1].usage.prompt_tokens == u.prompt_tokens,
              "streamed usage = non-streamed usage")
        check(all(ch.usage is None for ch in chunks[:-1]), "earlier chunks have usage null")
        fin = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
        check(fin[-1] == r.choices[0].finish_reason, "streamed finish_reason")
        chunks = list(c.chat.completions.create(model="lavit", messages=messages,
                                                max_tokens=3, stream=True))
        check(all(ch.usage is None for ch in chunks), "no usage chunk unless asked")
        expect(openai.NotFoundError, 404, lambda: c.chat.completions.create(
            model="gpt-4o", messages=messages), param="model")
        expect(openai.BadRequestError, 400, lambda: c.chat.completions.create(
            model="lavit", messages=messages, temperature=-1), param="temperature")
        expect(openai.BadRequestError, 400, lambda: c.chat.completions.create(
            model="lavit", messages=[{"role": "user", "content": "no image"}]),
            param="messages")
        bad = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(png(32, 32)[:60]).decode()}}]}]
        expect(openai.BadRequestError, 400, lambda: c.chat.completions.create(
            model="lavit", messages=bad), param="image")

        # The token view's endpoint: the keep mask agrees with the token counts.
        code, tok = s.post("/v1/tokenize", {"images": [url, url], "keep_mask": True},
                           headers={"Authorization": "Bearer from-the-env"})
        check(code == 200, "tokenize with keep_mask")
        rows, cols = tok["grid"]
        check(rows * cols == tok["patches"] == len(tok["keep"][0]), "keep mask covers the grid")
        check(all(sum(k) == n == len(t) for k, t, n in
                  zip(tok["keep"], tok["tokens"], tok["counts"])),
              "kept patches = token count per image")
    finally:
        s.stop()


def mock_checks(lavit):
    cfg = f"""
[server]
bind = "127.0.0.1:0"
workers = 2
max_steps = 100000000
max_request_cost = 1e12
api_key = "mock-key"
warmup = true
fault_injection = true

[pipeline]
stages = "mock"
placement_file = "{ROOT}/configs/placement-cpu.toml"
max_in_flight = 1
max_queue = 0
"""
    s = Server(lavit, "mock", cfg)
    try:
        auth = {"Authorization": "Bearer mock-key"}
        expect(openai.AuthenticationError, 401, lambda: s.client().models.list())
        c = s.client("mock-key")
        check(c.models.list().data[0].id == "lavit", "config key alone works")
        r = c.images.generate(prompt="a red cat", n=1, extra_body={"steps": 2})
        check(png_size(base64.b64decode(r.data[0].b64_json)) == (16, 16), "mock image")

        # 429: one slot, no queue; a long request holds it (then its client goes away).
        body = json.dumps({"prompt": "long", "steps": 100_000_000}).encode()
        conn = http.client.HTTPConnection(s.addr, timeout=120)
        holder = threading.Thread(target=lambda: _send_and_ignore(
            conn, body, auth), daemon=True)
        holder.start()
        deadline = time.time() + 30
        while s.metric("lavit_in_flight") != 1.0:
            check(time.time() < deadline, "the long request took the slot")
            time.sleep(0.05)
        e = expect(openai.RateLimitError, 429,
                   lambda: c.images.generate(prompt="second", extra_body={"steps": 1}))
        check(e.type == "rate_limit_error" and e.code == "rate_limit_exceeded",
              "429 type/code")
        conn.sock.shutdown(2)  # the holder's client disconnects: its slot frees
        conn.close()
        deadline = time.time() + 30
        while s.metric("lavit_admitted") != 0.0:
            check(time.time() < deadline, "the slot freed after the disconnect")
            time.sleep(0.05)

        # 500: an injected stage error.
        code, _ = s.post("/admin/fault", {"stage": "decoder", "fault": "error"}, headers=auth)
        check(code == 200, "fault armed")
        e = expect(openai.InternalServerError, 500,
                   lambda: c.images.generate(prompt="x", extra_body={"steps": 1}))
        check("injected" in e.message and e.type == "server_error", "500 message and type")
        r = c.images.generate(prompt="after", extra_body={"steps": 1})
        check(len(r.data) == 1, "the stage recovers after the fault")
        # An error in the middle of a stream reaches the client as an APIError.
        code, _ = s.post("/admin/fault", {"stage": "llm", "fault": "error"}, headers=auth)
        url = "data:image/png;base64," + base64.b64encode(png(28, 28)).decode()
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        try:
            list(c.chat.completions.create(model="lavit", messages=msgs, stream=True))
            raise AssertionError("a failed stream raised nothing")
        except openai.APIError as err:
            check("injected" in str(err), "a stream's failure raises APIError with the message")
        expect(openai.NotFoundError, 404, lambda: c.get("/nothing", cast_to=object))
        n429 = s.metric('lavit_http_responses_total{class="429"}')
        n5xx = s.metric('lavit_http_responses_total{class="5xx"}')
        check(n429 == 1.0 and n5xx >= 1.0,
              f"/metrics counted the 429 and the 500 (429: {n429}, 5xx: {n5xx})")
    finally:
        s.stop()


def _send_and_ignore(conn, body, headers):
    try:
        conn.request("POST", "/v1/images/generations", body=body,
                     headers={"Content-Type": "application/json", **headers})
        conn.getresponse().read()
    except OSError:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lavit", default=os.path.join(ROOT, "target/debug/lavit"))
    ap.add_argument("--fixture", default=os.path.join(ROOT, "../shared/fixtures/tiny-lavit"))
    a = ap.parse_args()
    fixture = os.path.abspath(a.fixture)
    t0 = time.time()
    try:
        mock_checks(a.lavit)
        fixture_checks(a.lavit, fixture)
    except AssertionError as e:
        print(f"openai-check: FAILED: {e}", file=sys.stderr)
        print(f"{len(CHECKS)} passed, 1 failed")
        return 1
    print(f"openai-check: openai {openai.__version__}, strict validation, "
          f"{time.time() - t0:.1f} s")
    print(f"{len(CHECKS)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
