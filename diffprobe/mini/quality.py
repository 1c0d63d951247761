"""Is a model's attention good enough for the heads? Two scores against the world's exact ground truth.

- own_object_ratio: DiffSeg-style self-attention grouping. For a query cell inside object o, the
  attention mass on o's key cells divided by the mass uniform attention would put there (|o| / K).
  1.0 = no grouping; K / |o| = all mass on the own object.
- own_part_ratios: the same one level down, inside an object: for a query cell in part p (eye, beak,
  roof, ...), the share of the object's attention mass that falls on p, divided by |p| / |object|. 1.0 = the
  object is one blob to the model; keypoints need parts told apart.
- peak_in_object: cross-attention localisation. The map of a word's token, upsampled bilinearly to the
  image, has its maximum inside the named object (or, for a close-up's part word, inside the named part).

`score_attention` computes both for a backbone on world scenes (benchmarks/mini_quality.py, the tests).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from diffprobe.backbone import Backbone
from diffprobe.data.world import Scene
from diffprobe.data.world.vocab import PART_IDS
from diffprobe.hooks import BatchLayout, Reduce
from diffprobe.drives import encode_images, encode_prompt, unet_step


def grid_masks(instance: np.ndarray, ids: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """(n, h*w) bool: grid cells (row-major) covered at least half by each instance id of an (H, W) map."""
    h, w = grid
    H, W = instance.shape
    inst = torch.from_numpy(instance).long()
    onehot = torch.stack([(inst == i).float() for i in ids]) if ids else torch.zeros(0, H, W)
    frac = F.adaptive_avg_pool2d(onehot[:, None], (h, w))[:, 0] if ids else torch.zeros(0, h, w)
    return (frac >= 0.5).reshape(len(ids), h * w)


def own_object_ratios(probs: torch.Tensor, masks: torch.Tensor) -> list[float]:
    """Per object: mean over its query cells of (mass on own cells) / (|own cells| / K).

    probs (Q, K) self-attention of one image with Q = K cells; masks (n, K) bool. Objects with no cell
    at this resolution are skipped.
    """
    out = []
    k = probs.shape[-1]
    for m in masks:
        size = int(m.sum())
        if size == 0:
            continue
        mass = probs[m][:, m].sum(-1)  # (|o|,) mass each own query puts on own keys
        out.append(float(mass.mean()) / (size / k))
    return out


def own_part_ratios(probs: torch.Tensor, part_masks: torch.Tensor, object_mask: torch.Tensor) -> list[float]:
    """Per part: mean over its query cells of (mass on own part / mass on own object) / (|part| / |object|).

    probs (Q, K); part_masks (n, K) bool; object_mask (K,) bool. Parts with no cell are skipped."""
    out = []
    size = int(object_mask.sum())
    for m in part_masks:
        part = int(m.sum())
        if part == 0 or part >= size:
            continue
        rows = probs[m]
        share = rows[:, m].sum(-1) / rows[:, object_mask].sum(-1).clamp_min(1e-12)
        out.append(float(share.mean()) / (part / size))
    return out


def peak_in_object(token_map: torch.Tensor, grid: tuple[int, int], mask: np.ndarray) -> bool:
    """token_map (Q,) over a row-major query grid; mask (H, W) bool of the object at image resolution."""
    up = F.interpolate(token_map.reshape(1, 1, *grid).float(), size=mask.shape, mode="bilinear",
                       align_corners=False)[0, 0]
    y, x = divmod(int(up.argmax()), mask.shape[1])
    return bool(mask[y, x])


def part_tokens(bb: Backbone, scene: Scene) -> list[tuple[int, str, int]]:
    """(object index, part word, token position) of every part word of a close-up's caption that this
    tokenizer writes as one token (a model trained before part words has none)."""
    ids = bb.tokenizer(scene.caption).input_ids
    return [(k, part, i + 1) for k, w in enumerate(scene.words) for part, i in w.get("parts", {}).items()
            if ids[i + 1] == bb.tokenizer.convert_tokens_to_ids(part + "</w>")]


def token_positions(bb: Backbone, scene: Scene) -> list[tuple[int, int]]:
    """(category token, colour token) per object; checks each caption word is one token after BOS."""
    ids = bb.tokenizer(scene.caption).input_ids
    words = scene.caption.split()
    out = []
    for w in scene.words:
        for key in ("category", "colour"):
            expect = bb.tokenizer.convert_tokens_to_ids(words[w[key]] + "</w>")
            if ids[w[key] + 1] != expect:
                raise ValueError(f"caption word {words[w[key]]!r} is not one token of this tokenizer")
        out.append((w["category"] + 1, w["colour"] + 1))
    return out


@torch.no_grad()
def score_attention(bb: Backbone, scenes: list[Scene], timestep: int, noised: bool) -> dict[str, dict[str, float]]:
    """{grid "16x16" | ... | "all": {"self/unif", "part/obj", "cat peak", "col peak", "part peak": mean}} of
    one UNet call per scene at `timestep` (clean latent, or noised to t with seed 0), conditioned on its
    caption; heads averaged, sites of one grid averaged; "all" averages every grid's cross-attention
    upsampled to the image."""
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = encode_images(bb, images)
    cond = encode_prompt(bb, [s.caption for s in scenes])
    probe = bb.probe
    with probe.capture("*.attn[12].hook_probs", reduce=Reduce(heads="mean"), layout=BatchLayout(cfg=False)) as cache:
        unet_step(bb, latents, timestep, cond, noise="random" if noised else None,
                  generator=torch.Generator().manual_seed(0))
    groups: dict[tuple[str, tuple[int, int]], list[torch.Tensor]] = defaultdict(list)
    for name in cache.names:
        groups[(probe.sites[name].kind, cache.grid(name))].append(cache[name])
    size = scenes[0].image.shape[:2]
    tokens = [token_positions(bb, s) for s in scenes]
    named_parts = [part_tokens(bb, s) for s in scenes]
    rows: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    all_maps = []
    for (kind, grid), tensors in sorted(groups.items(), key=lambda kv: -kv[0][1][0]):
        probs = torch.stack(tensors).mean(0)  # (B, Q, K)
        row = rows[f"{grid[0]}x{grid[1]}"]
        if kind == "self_attn":
            for b, s in enumerate(scenes):
                ids = [o.instance for o in s.objects]
                row["self/unif"] += own_object_ratios(probs[b], grid_masks(s.instance, ids, grid))
                for o, obj_mask in zip(s.objects, grid_masks(s.instance, ids, grid)):
                    parts = np.where(s.instance == o.instance, s.parts, 0)
                    part_ids = [int(p) for p in np.unique(parts) if p]
                    row["part/obj"] += own_part_ratios(probs[b], grid_masks(parts, part_ids, grid), obj_mask)
        else:
            all_maps.append(F.interpolate(
                probs.transpose(1, 2).reshape(len(scenes), -1, *grid), size=size, mode="bilinear",
                align_corners=False).flatten(2).transpose(1, 2))
            _peaks(row, probs, grid, scenes, tokens, named_parts)
    _peaks(rows["all"], torch.stack(all_maps).mean(0), size, scenes, tokens, named_parts)
    return {res: {k: float(np.mean(v)) if v else float("nan") for k, v in r.items()}   # nan: no part that
            for res, r in rows.items()}                                                    # grid can resolve


def _peaks(row, probs: torch.Tensor, grid, scenes, tokens: list[list[tuple[int, int]]], named_parts) -> None:
    for b, s in enumerate(scenes):
        for obj, (cat_tok, col_tok) in zip(s.objects, tokens[b]):
            mask = s.instance == obj.instance
            row["cat peak"].append(peak_in_object(probs[b, :, cat_tok], grid, mask))
            row["col peak"].append(peak_in_object(probs[b, :, col_tok], grid, mask))
        for k, part, tok in named_parts[b]:
            obj = s.objects[k]
            mask = (s.instance == obj.instance) & (s.parts == PART_IDS[(obj.category, part)])
            row["part peak"].append(peak_in_object(probs[b, :, tok], grid, mask))


def untrained_control(bb: Backbone, seed: int = 0) -> Backbone:
    """Same architecture, the denoiser freshly initialised, the trained VAE and tokenizer. The text encoder is
    fresh too where it was trained with the denoiser (mini); a transformer trained on a frozen text encoder
    (mini-dit on mini's) keeps it, so the control differs from the model only in what training changed."""
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    denoiser = type(bb.unet).from_config(bb.unet.config).eval().requires_grad_(False)
    text = bb.text_encoder if bb.family.name == "pixart" else CLIPTextModel(bb.text_encoder.config).eval().requires_grad_(False)
    return Backbone(unet=denoiser, vae=bb.vae, text_encoder=text, tokenizer=bb.tokenizer, scheduler=bb.scheduler,
                    family=bb.family, name="untrained")
