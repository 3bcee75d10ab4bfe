#!/usr/bin/env python3
"""The web playground of `lavit serve` in a real headless browser (Debian `chromium` driven
by selenium through `chromium-driver`; nothing is downloaded).

Starts `lavit serve` on 127.0.0.1 with the tiny LaVIT fixture, loads `/`, submits a prompt and
waits for the generated <img>s, uploads an image and waits for its caption, draws from that
image and a text (the image + text box, /v1/images/edits), and checks the
token view: one card per image (generated and uploaded) whose text gives its token count and
kept patches, and whose canvas is drawn. Fails on any browser console error. Saves a
screenshot (default target/browser-check.png).

    .venv/bin/python scripts/browser-check.py [--lavit target/debug/lavit] [--fixture DIR]
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = []


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    CHECKS.append(what)


def png(width, height):
    """A small RGB PNG: a gradient with a bright square (no imaging library needed)."""
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            inside = width // 4 <= x < 3 * width // 4 and height // 3 <= y < 2 * height // 3
            row += bytes([250, 200, 30]) if inside else bytes([x * 2 % 256, y * 2 % 256, 120])
        rows.append(bytes(row))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def find(*names):
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    raise SystemExit(f"browser-check: none of {names} found (bash scripts/setup.sh --test-tools)")


def start_server(lavit, fixture, tmp):
    cfg = os.path.join(tmp, "serve.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[server]
bind = "127.0.0.1:0"
workers = 2
warmup = true

[pipeline]
stages = "checkpoint"
checkpoint = "{fixture}"
placement_file = "{ROOT}/configs/placement-cpu.toml"
max_in_flight = 2
max_queue = 8
""")
    log = open(os.path.join(tmp, "server.log"), "w")
    env = {k: v for k, v in os.environ.items() if k != "LAVIT_API_KEY"}
    proc = subprocess.Popen([lavit, "serve", "--config", cfg, "--bind", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"browser-check: the server did not start ({line!r}); see {log.name}")
    url = line.split()[-1]
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("browser-check: the server never became ready")
        time.sleep(0.2)
    return proc, url


def browser(width=1300, height=1100):
    opts = webdriver.ChromeOptions()
    opts.binary_location = find("chromium", "chromium-browser")
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},{height}", "--force-device-scale-factor=1"]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=find("chromedriver", "chromium-driver"))
    return webdriver.Chrome(service=service, options=opts)


def run(lavit, fixture, screenshot):
    tmp = tempfile.mkdtemp(prefix="lavit-browser-")
    proc, url = start_server(lavit, fixture, tmp)
    info = json.loads(urllib.request.urlopen(url + "/playground/info", timeout=10).read())
    d = browser()
    wait = WebDriverWait(d, 120)
    try:
        d.get(url + "/")
        check("LaVIT playground" in d.title, "the page loads")
        wait.until(lambda d: d.find_element(By.ID, "model").text == info["model"])
        check(True, "the page fetched /playground/info")

        # Prompt → images.
        d.find_element(By.ID, "prompt").send_keys("a photo of a cat sitting on a chair")
        for field, value in (("n", "2"), ("steps", "3")):
            el = d.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        d.find_element(By.ID, "gen-btn").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gen-results img")) == 2)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#gen-results img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"))
        sizes = d.execute_script(
            "return [...document.querySelectorAll('#gen-results img')]"
            ".map(i => [i.naturalWidth, i.naturalHeight])")
        check(sizes == [list(info["default_size"])] * 2, f"two generated images {sizes}")
        check("image(s) in" in d.find_element(By.ID, "gen-status").text, "generation status")

        # Image upload → caption.
        path = os.path.join(tmp, "upload.png")
        with open(path, "wb") as f:
            f.write(png(96, 96))
        d.find_element(By.ID, "file").send_keys(path)
        wait.until(EC.presence_of_element_located((By.ID, "caption")))
        caption = d.find_element(By.ID, "caption").text
        check(len(caption) > 0, f"a caption appears: {caption!r}")
        check("tokens generated after reading" in d.find_element(By.ID, "cap-status").text,
              "the caption's usage is shown")

        # Image + text → image: the uploaded file and a text through /v1/images/edits.
        d.find_element(By.ID, "edit-files").send_keys(path)
        d.find_element(By.ID, "edit-prompt").send_keys("It is running in the snow")
        d.find_element(By.ID, "edit-btn").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#edit-results img")) == 1)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#edit-results img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"))
        size = d.execute_script(
            "const i = document.querySelector('#edit-results img');"
            "return [i.naturalWidth, i.naturalHeight]")
        check(size == list(info["default_size"]), f"the image + text prompt draws {size}")
        check("image(s) in" in d.find_element(By.ID, "edit-status").text, "edit status")

        # Token view: a card per image, counts that match the keep mask, canvases drawn.
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".token-card")) == 3)
        cards = d.find_elements(By.CSS_SELECTOR, ".token-card")
        labels = [c.find_element(By.CLASS_NAME, "label").text for c in cards]
        check(labels[0] == "upload.png", f"the uploaded image's card comes first: {labels}")
        check(sum(lb.startswith("generated #") for lb in labels) == 2, "generated images' cards")
        for c in cards:
            text = c.find_element(By.CLASS_NAME, "count").text  # "T tokens · K of N patches kept"
            words = text.split()
            check(len(words) >= 7 and words[0] == words[3] and words[1] == "tokens",
                  f"token count = kept patches: {text!r}")
            check(0 < int(words[0]) <= int(words[5]), f"some patches kept: {text!r}")
        wait.until(lambda d: d.execute_script("""
            return [...document.querySelectorAll('.token-card canvas')].every(c => {
              const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
              let lit = 0; for (let i = 0; i < px.length; i += 4) if (px[i] + px[i+1] + px[i+2] > 60) lit++;
              return lit > c.width * c.height / 50;
            });"""))
        check(True, "every token-view canvas is drawn")
        errors = [e for e in d.get_log("browser") if e.get("level") == "SEVERE"
                  and "favicon.ico" not in e.get("message", "")]
        check(not errors, f"no console errors: {errors}")
        os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
        d.save_screenshot(screenshot)
        check(os.path.getsize(screenshot) > 10_000, f"screenshot saved to {screenshot}")
    finally:
        d.quit()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lavit", default=os.path.join(ROOT, "target/debug/lavit"))
    ap.add_argument("--fixture", default=os.path.join(ROOT, "../shared/fixtures/tiny-lavit"))
    ap.add_argument("--screenshot", default=os.path.join(ROOT, "target/browser-check.png"))
    a = ap.parse_args()
    t0 = time.time()
    try:
        run(a.lavit, os.path.abspath(a.fixture), a.screenshot)
    except AssertionError as e:
        print(f"browser-check: FAILED: {e}", file=sys.stderr)
        print(f"{len(CHECKS)} passed, 1 failed")
        return 1
    print(f"browser-check: chromium headless, {time.time() - t0:.1f} s")
    print(f"{len(CHECKS)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
