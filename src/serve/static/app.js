// The LaVIT playground: plain JavaScript over the server's /v1 endpoints (no framework, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
let info = { model: "lavit", api_key_required: false };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// POST JSON; resolves to the reply's JSON or throws with the server's error message.
async function api(path, body) {
  const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  let data = null;
  try { data = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const msg = data && data.error ? data.error.message : r.status + " " + r.statusText;
    throw new Error(msg);
  }
  return data;
}

function status(id, text, isError) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", !!isError);
}

function el(tag, attrs, children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children || []) e.appendChild(c);
  return e;
}

function stripDataUrl(u) {
  const i = u.indexOf(",");
  return u.startsWith("data:") && i >= 0 ? u.slice(i + 1) : u;
}

// "argmax" or "gumbel, seed N": how a tokenize reply's decisions were taken.
function selectionText(s) {
  return s.selection === "gumbel" ? `gumbel, seed ${s.seed}` : s.selection;
}

// One card of the token view: the image with its patch grid, dropped patches dimmed.
function tokenCard(label, dataUrl, ids, keep, grid, selection) {
  const canvas = el("canvas", { width: 400, height: 400 });
  const kept = keep.reduce((a, k) => a + k, 0);
  const card = el("div", { class: "token-card" }, [
    canvas,
    el("p", { class: "count", text: `${ids.length} tokens · ${kept} of ${keep.length} patches kept · ${selectionText(selection)}` }),
    el("p", { class: "label", text: label, title: label }),
    el("details", {}, [el("summary", { text: "visual ids" }), el("code", { text: ids.join(" ") })]),
  ]);
  const img = new Image();
  img.onload = () => {
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    const [rows, cols] = grid;
    const cw = canvas.width / cols, ch = canvas.height / rows;
    for (let p = 0; p < keep.length; p++) {
      const x = (p % cols) * cw, y = Math.floor(p / cols) * ch;
      if (keep[p]) {
        ctx.strokeStyle = "rgba(255, 212, 59, 0.95)";
        ctx.lineWidth = 2;
        ctx.strokeRect(x + 1, y + 1, cw - 2, ch - 2);
      } else {
        ctx.fillStyle = "rgba(20, 24, 33, 0.72)";
        ctx.fillRect(x, y, cw, ch);
      }
    }
  };
  img.src = dataUrl;
  return card;
}

// Tokenize images (data URLs) with their keep masks and add them to the token view. The
// selection and seed are the checkpoint's unless chosen above the view.
async function showTokens(labels, dataUrls) {
  const body = { images: dataUrls.map(stripDataUrl), keep_mask: true };
  if ($("tok-selection").value) body.selection = $("tok-selection").value;
  if ($("tok-seed").value !== "") body.seed = Number($("tok-seed").value);
  const r = await api("/v1/tokenize", body);
  const view = $("token-view");
  r.tokens.forEach((ids, i) => {
    view.prepend(tokenCard(labels[i], dataUrls[i], ids, r.keep[i], r.grid, r.selection));
  });
}

async function generate(ev) {
  ev.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) { status("gen-status", "Write a prompt first.", true); return; }
  const body = {
    model: info.model, prompt, response_format: "b64_json",
    n: Number($("n").value), seed: Number($("seed").value), steps: Number($("steps").value),
  };
  $("gen-btn").disabled = true;
  status("gen-status", "Generating…");
  const t0 = performance.now();
  try {
    const r = await api("/v1/images/generations", body);
    const out = $("gen-results");
    out.replaceChildren();
    const urls = r.data.map((d) => "data:image/png;base64," + d.b64_json);
    urls.forEach((u, i) => out.appendChild(el("img", { class: "generated", src: u, alt: `${prompt} #${i + 1}` })));
    status("gen-status", `${urls.length} image(s) in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    await showTokens(urls.map((_, i) => `generated #${i + 1}: ${prompt}`), urls);
  } catch (e) {
    status("gen-status", e.message, true);
  } finally {
    $("gen-btn").disabled = false;
  }
}

// Image + text → image: the chosen files and the text as multipart/form-data to
// /v1/images/edits (the browser writes the boundary).
async function edit(ev) {
  ev.preventDefault();
  const files = Array.from($("edit-files").files);
  if (!files.length) { status("edit-status", "Choose at least one image first.", true); return; }
  const form = new FormData();
  files.forEach((f) => form.append("image[]", f, f.name));
  form.append("prompt", $("edit-prompt").value.trim());
  form.append("n", $("edit-n").value);
  form.append("seed", $("edit-seed").value);
  form.append("model", info.model);
  form.append("response_format", "b64_json");
  const h = {};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  $("edit-btn").disabled = true;
  status("edit-status", "Drawing…");
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/images/edits", { method: "POST", headers: h, body: form });
    let data = null;
    try { data = await r.json(); } catch (_) { /* not JSON */ }
    if (!r.ok) throw new Error(data && data.error ? data.error.message : r.status + " " + r.statusText);
    const out = $("edit-results");
    out.replaceChildren();
    const urls = data.data.map((d) => "data:image/png;base64," + d.b64_json);
    urls.forEach((u, i) => out.appendChild(el("img", { class: "generated edited", src: u, alt: `edit #${i + 1}` })));
    status("edit-status", `${urls.length} image(s) in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  } catch (e) {
    status("edit-status", e.message, true);
  } finally {
    $("edit-btn").disabled = false;
  }
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const fr = new FileReader();
    fr.onload = () => resolve(fr.result);
    fr.onerror = () => reject(fr.error);
    fr.readAsDataURL(file);
  });
}

async function caption() {
  const file = $("file").files[0];
  if (!file) return;
  status("cap-status", "Reading the image…");
  try {
    const url = await readAsDataUrl(file);
    const content = [{ type: "image_url", image_url: { url } }];
    const q = $("question").value.trim();
    if (q) content.unshift({ type: "text", text: q });
    const tokens = showTokens([file.name], [url]);
    const r = await api("/v1/chat/completions", {
      model: info.model, max_tokens: 32, messages: [{ role: "user", content }],
    });
    const text = r.choices[0].message.content;
    $("cap-results").replaceChildren(el("div", { class: "caption-row" }, [
      el("img", { src: url, alt: file.name }),
      el("p", { id: "caption", text: text || "(empty caption)" }),
    ]));
    status("cap-status", `${r.usage.completion_tokens} tokens generated after reading ${r.usage.prompt_tokens}`);
    await tokens;
  } catch (e) {
    status("cap-status", e.message, true);
  }
}

async function init() {
  $("gen-form").addEventListener("submit", generate);
  $("file").addEventListener("change", caption);
  $("edit-form").addEventListener("submit", edit);
  $("edit-files").addEventListener("change", () => {
    $("edit-chosen").textContent = Array.from($("edit-files").files).map((f) => f.name).join(", ");
  });
  try {
    const r = await fetch("/playground/info");
    info = await r.json();
    $("model").textContent = info.model;
    $("key-box").hidden = !info.api_key_required;
    $("n").max = info.max_n;
    $("steps").max = info.max_steps;
    if (info.selection) {
      $("tok-default").textContent = `checkpoint default (${selectionText(info.selection)})`;
      $("tok-note").textContent = info.selection_note || "";
    }
    if (!info.generate) {
      $("gen-btn").disabled = true;
      $("edit-btn").disabled = true;
      status("gen-status", "This server runs the tokenizer only.");
    }
  } catch (e) {
    status("gen-status", "Cannot reach the server: " + e.message, true);
  }
}

init();
