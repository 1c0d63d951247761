"""report.html: one self-contained page per result (no server, no network: the image and every map inline) to look
at maps over an image: token chips, a layer and a step slider, overlay opacity, the value under the cursor, and a
task's segmentation labels or boxes.

The maps are slices {(layer, step): (W, h, w)}: layer 0 is the aggregate over layers, step 0 over steps, W words
(chips); a task gives the slices it has (every layer over all steps, every step over all layers). Each (h, w) map
is stored as bytes 0..255 of its own maximum (kept beside it), so the page shows each map's shape and the cursor
reads its value to 1/255 of that maximum.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from diffprobe.io import save_text


def _png(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(path: str | Path, title: str, image: np.ndarray, words: Sequence[str],
                 slices: Mapping[tuple[int, int], np.ndarray], layers: Sequence[str] = ("all layers",),
                 steps: Sequence[str] = ("all steps",), labels: np.ndarray | None = None,
                 boxes: Sequence[dict] = ()) -> Path:
    """Write the page. image: (H, W, 3) uint8; slices: {(layer index, step index): (len(words), h, w) maps}, (0, 0)
    required; labels: (H, W) int segments (drawn as coloured regions); boxes: [{"label", "box": [x0, y0, x1, y1]
    in image pixels}]."""
    if (0, 0) not in slices:
        raise ValueError("a report needs the (0, 0) slice: every layer, every step")
    packed, shape = {}, None
    for (layer, step), maps in slices.items():
        maps = np.asarray(maps, dtype=np.float32)
        if maps.ndim != 3 or len(maps) != len(words) or not (0 <= layer < len(layers) and 0 <= step < len(steps)):
            raise ValueError(f"slice {(layer, step)}: maps must be ({len(words)} words, h, w), got {maps.shape}")
        shape = shape or maps.shape[1:]
        peak = np.maximum(maps.max(axis=(1, 2)), 1e-30)
        quant = np.clip(np.round(maps / peak[:, None, None] * 255), 0, 255).astype(np.uint8)
        packed[f"{layer},{step}"] = {"peak": peak.tolist(), "maps": base64.b64encode(quant.tobytes()).decode()}
    data = {
        "title": title, "words": list(words), "layers": list(layers), "steps": list(steps),
        "h": int(shape[0]), "w": int(shape[1]), "slices": packed,
        "image": _png(np.asarray(image, dtype=np.uint8)),
        "labels": None if labels is None else _png(_label_colours(np.asarray(labels))),
        "boxes": [{"label": str(b["label"]), "box": [float(v) for v in b["box"]]} for b in boxes],
    }
    page = PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", json.dumps(data).replace("</", "<\\/"))
    return save_text(path, page)


def page_maps(maps: np.ndarray, side: int = 128) -> np.ndarray:
    """(n, h, w) maps averaged over blocks so the longer side is at most `side` (a page holds every map)."""
    import torch
    import torch.nn.functional as F

    maps = np.asarray(maps, dtype=np.float32)
    h, w = maps.shape[-2:]
    k = max(1, -(-max(h, w) // side))
    if k == 1:
        return maps
    return F.avg_pool2d(torch.from_numpy(maps)[None], k, ceil_mode=True)[0].numpy()


def _label_colours(labels: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 4) RGBA, a fixed colour per id, half transparent."""
    rng = np.random.default_rng(0)
    table = np.concatenate([rng.integers(40, 256, (int(labels.max()) + 1, 3)),
                            np.full((int(labels.max()) + 1, 1), 110)], 1).astype(np.uint8)
    return table[labels]


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
#chips button{margin:2px;padding:3px 8px;border:1px solid #888;border-radius:12px;background:#fff;cursor:pointer}
#chips button.on{background:#2a6;color:#fff;border-color:#2a6}
.row{margin:6px 0}
canvas{image-rendering:pixelated;border:1px solid #ccc}
#value{font-family:monospace}
</style></head><body>
<h3>__TITLE__</h3>
<div id="chips" class="row"></div>
<div class="row">layer <input id="layer" type="range" min="0" value="0"> <span id="layername"></span></div>
<div class="row">step <input id="step" type="range" min="0" value="0"> <span id="stepname"></span></div>
<div class="row">opacity <input id="opacity" type="range" min="0" max="100" value="60">
 <label id="labelsbox"><input id="showlabels" type="checkbox" checked> segments</label>
 <label id="boxesbox"><input id="showboxes" type="checkbox" checked> boxes</label></div>
<canvas id="view"></canvas>
<div class="row" id="value">move over the image</div>
<script>
const D = __DATA__;
const bytes = {};
for (const k in D.slices) bytes[k] = Uint8Array.from(atob(D.slices[k].maps), c => c.charCodeAt(0));
const L = D.layers.length, S = D.steps.length, W = D.words.length, h = D.h, w = D.w;
let word = 0;
const img = new Image(), seg = new Image();
const canvas = document.getElementById("view"), ctx = canvas.getContext("2d");
const el = id => document.getElementById(id);
el("layer").max = L - 1; el("step").max = S - 1;
if (!D.labels) el("labelsbox").hidden = true;
if (!D.boxes.length) el("boxesbox").hidden = true;
D.words.forEach((t, i) => { const b = document.createElement("button"); b.textContent = t;
  b.onclick = () => { word = i; draw(); }; el("chips").appendChild(b); });
function jet(v) { const f = (a) => Math.round(255 * Math.max(0, Math.min(1, a)));
  return [f(1.5 - Math.abs(4 * v - 3)), f(1.5 - Math.abs(4 * v - 2)), f(1.5 - Math.abs(4 * v - 1))]; }
function key() { return el("layer").value + "," + el("step").value; }
function draw() {
  const l = +el("layer").value, s = +el("step").value;
  el("layername").textContent = D.layers[l]; el("stepname").textContent = D.steps[s];
  [...el("chips").children].forEach((b, i) => b.className = i === word ? "on" : "");
  ctx.globalAlpha = 1; ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  const small = document.createElement("canvas"); small.width = w; small.height = h;
  const sctx = small.getContext("2d"), px = sctx.createImageData(w, h), b = bytes[key()];
  el("value").textContent = b ? "move over the image" : "not kept: this layer over every step, or this step over every layer";
  if (!b) return;
  for (let i = 0; i < h * w; i++) { const c = jet(b[word * h * w + i] / 255);
    px.data.set([c[0], c[1], c[2], 255], 4 * i); }
  sctx.putImageData(px, 0, 0);
  ctx.globalAlpha = +el("opacity").value / 100; ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height); ctx.globalAlpha = 1;
  if (D.labels && el("showlabels").checked) ctx.drawImage(seg, 0, 0, canvas.width, canvas.height);
  if (el("showboxes").checked) { const k = canvas.width / img.naturalWidth;
    ctx.strokeStyle = "#ff0"; ctx.lineWidth = 2; ctx.fillStyle = "#ff0"; ctx.font = "12px sans-serif";
    D.boxes.forEach(b => { const [x0, y0, x1, y1] = b.box.map(v => v * k);
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0); ctx.fillText(b.label, x0 + 2, y0 + 12); }); }
}
canvas.addEventListener("mousemove", e => {
  const r = canvas.getBoundingClientRect();
  const x = Math.floor((e.clientX - r.left) / r.width * w), y = Math.floor((e.clientY - r.top) / r.height * h);
  if (x < 0 || y < 0 || x >= w || y >= h) return;
  const b = bytes[key()];
  if (!b) return;
  const v = b[word * h * w + y * w + x] / 255 * D.slices[key()].peak[word];
  el("value").textContent = `${D.words[word]}  x ${x}  y ${y}  value ${v.toPrecision(4)}`;
});
["layer", "step", "opacity", "showlabels", "showboxes"].forEach(id => el(id).addEventListener("input", draw));
img.onload = () => { const k = Math.max(1, Math.floor(512 / Math.max(img.naturalWidth, img.naturalHeight)));
  canvas.width = img.naturalWidth * k; canvas.height = img.naturalHeight * k;
  if (D.labels) { seg.onload = draw; seg.src = "data:image/png;base64," + D.labels; } else draw(); };
img.src = "data:image/png;base64," + D.image;
</script></body></html>
"""
