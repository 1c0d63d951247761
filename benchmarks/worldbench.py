"""WorldBench: diffprobe's heads beside the peers' methods and the classical baselines, on the procedural world's
exact ground truth, every setting chosen on val, test reported once, and a fresh test set from another world seed.

    python benchmarks/worldbench.py [--models mini mini_dit] [--n 100] [--results benchmarks/results/worldbench.json]
                                    [--doc docs/worldbench.md] [--jobs 2] [--threads 1] [--capabilities ...]

Parts (a model's segmentation, localisation or correspondence; the keypoint board's fits and evaluations) run
`--jobs` at a time, each in its own process with `--threads` torch threads (two one-thread jobs keep the 2 cores
busy). The keypoint board's jobs take a free slot first: its chain (val fits and evaluations, then the chosen
candidate's test fits, then their evaluations) is the run's longest.

Splits: val (world seed 0, split val), test (world seed 0, split test) and fresh (world seed 1, split test: scenes
nothing was ever tuned on). Each model is loaded and configured as `python -m diffprobe task=diffseg model=<m>` does
(its attention levels, its calibrated tau) and every scene's self-attention is captured once (the head's one call);
each method then segments it.

Segmentation, each method's setting chosen on val by the mean of the two mIoUs (robust to the metric), scored under
- the DiffSeg paper's protocol: COCO-Stuff-27 classes (the world's export), each image's segments matched to classes
  by Hungarian matching, TP/FP/FN accumulated over the split (large stuff regions weigh most), and
- per object: the world's own classes, each image matched on its own, its IoU averaged over the classes it shows,
  then over images (an object merged into its background costs its image a class),
each also as pixel accuracy. Methods: DiffSeg (reference merge), DiffSeg + PAMR, DiffCut's recursive normalised cut
on the same attention, the random walk then cut of "Diffusing, Walking and Cutting" (WACV 2026, k-step flow), and
the baselines: colour k-means (k chosen on val, and k told the true class count), Felzenszwalb and SLIC
(scikit-image), one segment, top/bottom halves. Seconds per image: each method's own work on the test split (the
diffusion methods add the capture, listed once).

Results go to the JSON file per (model, capability) as each finishes (a rerun skips what it holds); the markdown
of docs/worldbench.md is written from it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffprobe.concepts import SPACES, ConceptAttention  # noqa: E402
from diffprobe.data.coco_stuff import CocoStuff27  # noqa: E402
from diffprobe.data.images import image_to_tensor  # noqa: E402
from diffprobe.data.world import CLASSES, render_scene, scene_seed  # noqa: E402
from diffprobe.data.world.export import coco_fine_labels  # noqa: E402
from diffprobe.eval import segmentation_baselines as classical  # noqa: E402
from diffprobe.eval.segmentation import PerImageHungarian, PerObjectHungarian  # noqa: E402
from diffprobe.eval.wsol import WSOLMeter  # noqa: E402
from diffprobe.eval.pck import pck, threshold_bbox_max_side  # noqa: E402
from diffprobe.data.world.pairs import world_pairs  # noqa: E402
from diffprobe.data.world.vocab import FIGURES  # noqa: E402
from diffprobe.heads.dift import DiftHead, DiftSettings, adaln_features, is_unet  # noqa: E402
from diffprobe.heads.hyperfeatures.extract import (  # noqa: E402
    ExtractionSettings, default_layers, extract_descriptors, extract_features, image_generator)
from diffprobe.heads.hyperfeatures.matching import DescriptorField  # noqa: E402
from diffprobe.drives import Drive  # noqa: E402
from diffprobe.heads.heatmaps import amd_word_maps, daam_sites, daam_word_maps  # noqa: E402
from diffprobe.heads.localize import LocalizeHead, RefineSettings, refine  # noqa: E402
from diffprobe.hooks import Need, Reduce  # noqa: E402
from diffprobe.heads.diffseg import segment  # noqa: E402
from diffprobe.heads.diffseg.head import DiffSegHead  # noqa: E402
from diffprobe.heads.diffseg.ncut import NcutSettings, ncut_segment  # noqa: E402
from diffprobe.heads.pamr import refine_labels  # noqa: E402
from diffprobe.runner import Item, Plan, run_plans  # noqa: E402
from worker_slots import Slots  # noqa: E402
from worldbench_keypoints import PRIORITY, keypoints_doc, run_keypoints  # noqa: E402

NOTES = "<!-- the reading below is written by hand; the tables above by the script -->"
SPLITS = {"val": ("val", 0), "test": ("test", 0), "fresh": ("test", 1)}   # name: (world split, world seed)
TAUS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9, 1.1, 1.3, 1.6, 2.0, 2.5)
NCUT_TAUS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)
WALK_TAUS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4)
WALK_STEPS = (1, 2, 4)
DIFT_TIMESTEPS = (51, 101, 261, 401)   # DIFT's published t (261) and those it uses elsewhere (51 DAVIS, 101 ADM)
DITF_TIMESTEPS = (51, 101, 260, 401)   # DiTF's published t (260 of 1000; 90 on DAVIS)
PAIRS = 20             # correspondence pairs per category (face, bird, house) and split
HF_STEPS = 200         # hyperfeature training steps (benchmarks/hyperfeatures_world.py's)
HF_STORE = 1000        # training images whose features stay in memory: all 120 (about 1 MB each), each extracted once
INVERSION_STEPS = 10   # the DDIM inversion whose calls DAAM's and attention-map-diffusers' aggregations sum
CAPABILITIES = {"segmentation": "per model", "localisation": "per model", "correspondence": "per model",
                "keypoints": "board"}   # a board chooses its model on val: one run for every --models
REFINERS = {   # localize method: RefineSettings overrides swept on val
    "power": [{"power": k} for k in (1, 2, 4, 8)],
    "walk": [{"restart": g} for g in (0.3, 0.5, 0.7, 0.9)],
    "diffusion": [{"beta": b, "temperature": t} for b in (1, 10, 100) for t in (0.05, 0.1, 0.2)],
}


def user_config(task: str, model: str):
    """The configuration `python -m diffprobe task=<task> model=<model>` runs with (the model's task settings in)."""
    from hydra import compose, initialize_config_module

    from diffprobe.__main__ import CONFIG_MODULE, prepare_overrides

    overrides, _ = prepare_overrides([f"task={task}", f"model={model}"])
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose("config", overrides=overrides)


def scenes(split: str, n: int, size: int) -> list:
    world_split, seed = SPLITS[split]
    return [render_scene(scene_seed(world_split, i, seed), size) for i in range(n)]


def captured(bb, head: DiffSegHead, scene) -> dict:
    """One scene: its self-attention maps by grid (the head's one call), image and both label maps."""
    plan = head.plan(bb.probe.sites)
    x = image_to_tensor(Image.fromarray(scene.image), head.size, crop="none", resize=head.settings.resize)
    (view,) = run_plans(bb, [plan], [x])
    return {"maps": head.maps(view), "image": scene.image, "world": scene.classes.astype(np.int64),
            "coco": CocoStuff27.lut[coco_fine_labels(scene)].astype(np.int64)}


class Meters:
    """Both protocols' scores and the segment count of one method on one split."""

    def __init__(self):
        self.paper, self.objects, self.segments = PerImageHungarian(27), PerObjectHungarian(len(CLASSES)), []

    def add(self, d: dict, pred: np.ndarray) -> None:
        self.paper.update(d["coco"], pred)
        self.objects.update(d["world"], pred)
        self.segments.append(len(np.unique(pred)))

    def row(self) -> dict:
        paper, objects = self.paper.result(), self.objects.result()
        return {"paper_miou": 100 * paper["miou"], "paper_accuracy": 100 * paper["pixel_accuracy"],
                "object_miou": 100 * objects["miou"], "object_accuracy": 100 * objects["pixel_accuracy"],
                "segments": float(np.mean(self.segments))}


def score(data: list[dict], rule) -> dict:
    """rule(scene data) -> (H, W) labels, over a split: both protocols, segments per image, seconds per image (the
    rule's own)."""
    meters, seconds = Meters(), 0.0
    for d in data:
        start = time.perf_counter()
        pred = np.asarray(rule(d))
        seconds += time.perf_counter() - start
        meters.add(d, pred)
    return {**meters.row(), "seconds": seconds / len(data)}


def _image(d: dict) -> torch.Tensor:
    return torch.from_numpy(d["image"]).permute(2, 0, 1).float() / 255


def segmentation_methods(head: DiffSegHead) -> dict:
    """{method: ({setting: rule}, what the setting is)}; every rule maps a scene's data to labels at its size."""
    def diffseg(tau, pamr=False):
        params = head.params.replace(tau=tau)

        def rule(d):
            labels = segment(d["maps"], size=d["world"].shape, params=params).labels
            return (refine_labels(labels, _image(d)) if pamr else labels).numpy()
        return rule

    def ncut(**kw):
        params = NcutSettings(**kw)
        return lambda d: ncut_segment(d["maps"], d["world"].shape, params).labels.numpy()

    def true_k(d):
        return classical.colour_kmeans(d["image"], len(np.unique(d["world"])), seed=0)

    return {
        "DiffSeg (reference merge)": ({f"tau {t}": diffseg(t) for t in TAUS}, "tau"),
        "DiffSeg + PAMR": ({f"tau {t}": diffseg(t, pamr=True) for t in TAUS}, "tau"),
        "DiffCut normalised cut (attention rows, alpha 10)": (
            {f"tau {t}": ncut(tau=t, affinity="attention_rows") for t in NCUT_TAUS}, "ncut_tau"),
        "random walk then cut (WACV 2026)": (
            {f"k {k}, tau {t}": ncut(tau=t, affinity="walk", walk_steps=k) for k in WALK_STEPS for t in WALK_TAUS},
            "ncut_walk_steps, ncut_tau"),
        "colour k-means, k chosen on val": (
            {f"k {k}": (lambda d, k=k: classical.colour_kmeans(d["image"], k, seed=0)) for k in (2, 3, 4, 5, 6)}, "k"),
        "colour k-means, k = true classes (told the answer)": ({"-": true_k}, ""),
        "Felzenszwalb (scikit-image)": (
            {f"scale {s}": (lambda d, s=s: classical.felzenszwalb(d["image"], scale=s, min_size=10))
             for s in (50, 100, 200, 400, 800, 1600, 3200)}, "scale"),
        "SLIC (scikit-image)": (
            {f"{n} segments": (lambda d, n=n: classical.slic(d["image"], n)) for n in (2, 3, 4, 6, 8, 12, 16, 24)},
            "n_segments"),
        "one segment": ({"-": lambda d: classical.one_segment(*d["world"].shape)}, ""),
        "top / bottom halves": ({"-": lambda d: classical.top_bottom(*d["world"].shape)}, ""),
    }


@contextmanager
def concept_watch(bb):
    """ConceptAttention's read-only analogue in both spaces over the same inversion, with every class of the world
    as a concept (those the caption does not name included): {space: ConceptAttention}."""
    with ExitStack() as stack:
        yield {space: stack.enter_context(ConceptAttention(bb, list(CLASSES), space=space)) for space in SPACES}


def word_data(bb, settings, scene) -> list[dict]:
    """Per category a scene's caption names: the word's maps by every method's own calls, and its exact boxes
    and mask. diffprobe's localize head: one call (its own: t = 300, clean latent) with cross- and self-attention;
    DAAM and attention-map-diffusers: every cross-attention map per head over a DDIM inversion conditioned on the
    caption (their tools trace the calls of a pass over an image; here, the image's inversion)."""
    from dataclasses import replace

    words = sorted({o.category for o in scene.objects})
    groups = bb.word_positions(scene.caption, words)
    head = LocalizeHead(replace(settings, words=words, prompt=scene.caption), groups, bb.sample_size)
    x = image_to_tensor(Image.fromarray(scene.image), head.size, crop="none", resize=settings.resize)
    (view,) = run_plans(bb, [head.plan(bb.probe.sites)], [x])
    maps, probs, grid = head.attention(view)
    sites = bb.probe.sites
    cross = [n for n in sorted(sites, key=lambda n: sites[n].order) if sites[n].kind == "cross_attn"]
    plan = Plan(Drive("inversion", num_steps=INVERSION_STEPS), (Need(tuple(cross), Reduce(heads="none", steps="mean")),),
                prompt=scene.caption, watch=concept_watch)
    (trace,) = run_plans(bb, [plan], [x])
    concepts = {space: ca.maps()[0] for space, ca in trace.state["watch"].items()}   # (classes, h, w) each
    per_site = [(sites[n].divisor, trace.grid(n), trace[n][0]) for n in cross]     # (heads, Q, T) each
    daam = daam_word_maps([p for n, p in zip(cross, per_site) if n in daam_sites(sites)], groups)
    amd = amd_word_maps([(g, m) for _, g, m in per_site], groups)
    out = []
    for k, word in enumerate(words):
        objects = [o for o in scene.objects if o.category == word]
        out.append({"map": maps[k].reshape(-1), "probs": probs, "grid": grid, "daam": daam[k], "amd": amd[k],
                    **{f"concepts {space}": m[CLASSES.index(word)] for space, m in concepts.items()},
                    "boxes": np.array([o.bbox for o in objects], np.float64),
                    "mask": np.isin(scene.instance, [o.instance for o in objects]), "size": scene.image.shape[:2]})
    return out


def _at_image(m: torch.Tensor, size) -> np.ndarray:
    return torch.nn.functional.interpolate(m.reshape(1, 1, *m.shape[-2:]).float(), size=tuple(size),
                                           mode="bilinear", align_corners=False)[0, 0].numpy()


def localisation_rules() -> dict:
    """{method: ({setting: rule}, what the setting is)}: rule(word data) -> heat map (H, W) at the image's size."""
    def refined(method, kw):
        params = RefineSettings(method=method, **kw)
        return lambda d: _at_image(refine(d["map"][None], d["probs"], d["grid"], params).reshape(d["grid"]), d["size"])

    rules = {"raw cross-attention (diffprobe's call, heads and levels aggregated)": ({"-": refined("raw", {})}, ""),
             "DAAM's aggregation (inversion calls, layers x heads, bicubic, clamp)": (
                 {"-": lambda d: _at_image(d["daam"], d["size"])}, ""),
             "attention-map-diffusers' aggregation (inversion calls, heads summed, layers x calls mean)": (
                 {"-": lambda d: _at_image(d["amd"], d["size"])}, ""),
             "ConceptAttention analogue, keys (inversion calls, the 13 classes as concepts)": (
                 {"-": lambda d: _at_image(d["concepts keys"], d["size"])}, ""),
             "ConceptAttention analogue, output space (inversion calls, the 13 classes as concepts)": (
                 {"-": lambda d: _at_image(d["concepts output"], d["size"])}, "")}
    for method, grid in REFINERS.items():
        rules[f"diffprobe refiner: {method}"] = (
            {", ".join(f"{k} {v}" for k, v in kw.items()): refined(method, kw) for kw in grid}, "refine keys")
    rules["centre Gaussian (no model)"] = ({"-": lambda d: _centre(d["size"])}, "")
    return rules


def _centre(size) -> np.ndarray:
    y, x = np.mgrid[:size[0], :size[1]]
    return np.exp(-(((y - size[0] / 2) / (size[0] / 4)) ** 2 + ((x - size[1] / 2) / (size[1] / 4)) ** 2))


def wsol(data: list[dict], rule) -> tuple[dict, WSOLMeter]:
    meter, seconds = WSOLMeter(), 0.0
    for d in data:
        start = time.perf_counter()
        heat = rule(d)
        seconds += time.perf_counter() - start
        meter.update(heat, d["boxes"], d["mask"])
    return {**meter.result(), "seconds": seconds / len(data)}, meter


def run_localisation(model: str, n: int) -> dict:
    from diffprobe.config import load_configured_backbone
    from diffprobe.tasks.localize import settings_of

    cfg = user_config("localize", model)
    cfg.localize.words = ["placeholder"]   # replaced per scene
    bb = load_configured_backbone(cfg)
    settings = settings_of(cfg)
    start = time.perf_counter()
    data = {split: [w for s in scenes(split, n, bb.sample_size) for w in word_data(bb, settings, s)] for split in SPLITS}
    capture = (time.perf_counter() - start) / (n * len(SPLITS))
    out = {"words": {split: len(d) for split, d in data.items()}, "capture_seconds": capture,
           "default": {"method": settings.method, "threshold": settings.threshold}, "methods": {}}
    for method, (rules, knob) in localisation_rules().items():
        val = {setting: wsol(data["val"], rule) for setting, rule in rules.items()}
        best = max(val, key=lambda k: val[k][0]["max_box_acc_v2"])
        threshold = val[best][0]["gt_known_threshold"]         # the fixed mask threshold a user would be given
        row = {"knob": knob, "chosen": best, "threshold": threshold, "val": val[best][0]}
        for split in ("test", "fresh"):
            result, meter = wsol(data[split], rules[best])
            row[split] = {**result, "gt_known_fixed": meter.gt_known_at(threshold)}
        row["val"]["gt_known_fixed"] = val[best][1].gt_known_at(threshold)
        out["methods"][method] = row
        print(f"  {method}: {best} -> test {row['test']['max_box_acc_v2']:.1f}", file=sys.stderr, flush=True)
    shipped = settings.params()   # the refiner and mask threshold a user gets, nothing chosen here
    rule = lambda d: _at_image(refine(d["map"][None], d["probs"], d["grid"], shipped).reshape(d["grid"]),  # noqa: E731
                               d["size"])
    row = {"knob": "", "chosen": f"{shipped.method} (shipped)", "threshold": settings.threshold}
    for split in SPLITS:
        result, meter = wsol(data[split], rule)
        row[split] = {**result, "gt_known_fixed": meter.gt_known_at(settings.threshold)}
        if split == "val":   # the threshold this model should ship: the best on val for its shipped settings
            row["val_threshold"] = result["gt_known_threshold"]
        row[split]["gt_known_at_val_threshold"] = meter.gt_known_at(row["val_threshold"])
    out["methods"]["diffprobe default (shipped settings and threshold)"] = row
    return out


def dift_blocks(bb, image, t: int, prompt: str) -> dict:
    """DIFT's features of a PIL image at timestep t for every decoder block of a UNet, {block: (C, h, w)}, or on a
    transformer DiTF's for every block k >= 1, {("ditf", k): ..., ("no discard", k): ..., ("raw input", k): the
    noisy block input without the AdaLN}, all from one call (the head's plan with every block's sites)."""
    from dataclasses import replace

    sites = bb.probe.sites
    head = DiftHead(DiftSettings(timestep=t, prompt=prompt), bb.sample_size)
    if is_unet(sites):
        blocks = sorted(int(n.split(".")[1]) for n in sites if n.startswith("up_blocks.") and n.endswith(".hook_out"))
        names = tuple(f"up_blocks.{b}.hook_out" for b in blocks)
    else:
        outs = [s.name for s in sorted((s for s in sites.values() if s.kind == "block"), key=lambda s: s.order)]
        mods = [n.replace(".hook_out", ".hook_modulation") for n in outs]
        names = tuple(outs) + tuple(mods[1:])
    plan = replace(head.plan(sites), needs=(Need(names, Reduce()),))
    x = head.inputs(Item("x", image))
    (view,) = run_plans(bb, [plan], [x], draws=[head.draws(x)])
    if is_unet(sites):
        return {b: view[n].float().mean(0) for b, n in zip(blocks, names)}
    out = {}
    for k in range(1, len(outs)):
        stream, modulation = view[outs[k - 1]].float().mean(0), view[mods[k]].float().mean(0)
        out |= {("ditf", k): adaln_features(stream, modulation), ("no discard", k): adaln_features(stream, modulation,
                "none"), ("raw input", k): stream}
    return out


def spair_world(work: Path) -> Path:
    """World seed 0's train pairs in the SPair layout (20 per category and split, 40 train), written once."""
    world = work / "spair"
    if not (world / "SPair-71k" / "world.json").is_file():
        subprocess.run([sys.executable, "-m", "diffprobe", "task=world", "world.format=spair", "world.n=20",
                        "world.n_train=40", f"world.out={world}", f"hydra.run.dir={work / 'spair_run'}"],
                       cwd=ROOT, check=True)
    return world


def trained_hyperfeatures(model: str, work: Path, steps: int):
    """Diffusion Hyperfeatures trained as benchmarks/hyperfeatures_world.py does (world seed 0's train pairs in the
    SPair layout, 40 per category; S = 4 of T = 4 calls; 200 steps), through the command line; resumable. Its
    validation (on training pairs: the layout has no val split) runs once, at the end: the board scores the model on
    its own splits, and validation does not change the weights."""
    from diffprobe.heads.hyperfeatures.model import HyperfeatureModel

    world, run = spair_world(work), work / f"train_{model}_{steps}"
    if not (run / "model" / "aggregator.json").is_file():
        subprocess.run([sys.executable, "-m", "diffprobe", "task=hyperfeatures", f"model={model}", "data=spair",
                        f"data.root={world}", "hyperfeatures.num_steps=4", "hyperfeatures.save_every=1",
                        f"hyperfeatures.feature_store={HF_STORE}",
                        f"hyperfeatures.train_steps={steps}", f"hyperfeatures.val_every={steps}",
                        f"hydra.run.dir={run}"], cwd=ROOT, check=True)
    return HyperfeatureModel.load(run / "model")


def pair_data(bb, split: str, n: int, timesteps: tuple, hyperfeatures=None) -> list[dict]:
    """World pairs (n per category): each image's raw decoder layers at the clean step, DIFT's (DiTF's) blocks at
    each of `timesteps` and a trained hyperfeature model's descriptors, the pair's points and the target object's
    box."""
    from diffprobe.drives import unknown_words

    world_split, seed = SPLITS[split]
    # DIFT's "a photo of a {category}"; a model that does not know "photo" (mini's world vocabulary) gets "a {category}"
    template = "a photo of a {}" if not unknown_words(bb.tokenizer, "a photo of a") else "a {}"
    layers = default_layers(bb.probe.sites)
    raw = ExtractionSettings(layers=layers, process="one_step", image_size=bb.sample_size)

    def describe(scene, category):
        x = image_to_tensor(Image.fromarray(scene.image), bb.sample_size, crop="none", resize="bilinear")
        with torch.no_grad():
            feats = extract_features(bb, x, raw, layers=layers, generator=image_generator(0, x))[0]   # seeded VAE draw
            dift = {t: dift_blocks(bb, Image.fromarray(scene.image), t, template.format(category)) for t in timesteps}
            hf = None
            if hyperfeatures is not None:
                size = hyperfeatures.extraction.image_size
                y = image_to_tensor(Image.fromarray(scene.image), size, crop="none", resize="bilinear")
                hf = extract_descriptors(bb, hyperfeatures.net, y, hyperfeatures.extraction,
                                         generator=image_generator(0, y))[0].float()
        return {"raw": {n: f[0].float() for n, f in feats.items()}, "dift": dift, "hf": hf}

    out = []
    for category in FIGURES:
        for p in world_pairs(world_split, category, n, bb.sample_size, seed):
            out.append({"source": describe(p.source, category), "target": describe(p.target, category),
                        "source_points": p.source_points, "target_points": p.target_points,
                        "box": p.target.objects[0].bbox, "hw": p.source.image.shape[:2]})
    return out


def pck_of(data: list[dict], pick) -> dict:
    """PCK@0.1 of the target object's box (per point and mean per pair) for descriptors pick(image features)."""
    correct = total = 0
    per_pair, seconds = [], 0.0
    for d in data:
        start = time.perf_counter()
        if pick is None:   # the baseline: each point stays where it was
            pred = torch.as_tensor(d["source_points"], dtype=torch.float32)
        else:
            src, tgt = DescriptorField(pick(d["source"]), d["hw"]), DescriptorField(pick(d["target"]), d["hw"])
            pred, _ = tgt.argmax(src.sample(torch.as_tensor(d["source_points"], dtype=torch.float32)))
        seconds += time.perf_counter() - start
        r = pck(pred.numpy(), d["target_points"], threshold_bbox_max_side(d["box"], 0.1))
        correct, total = correct + int(r.correct.sum()), total + r.num_points
        per_pair.append(r.per_point)
    return {"pck_point": 100 * correct / total, "pck_pair": 100 * float(np.mean(per_pair)),
            "seconds": seconds / len(data)}


def correspondence_rules(first: dict, hf_steps: int) -> dict:
    """method: ({setting: (pick(image features) -> descriptors, the DIFT/DiTF timestep it reads or None)}, knob),
    from one image's features of every swept timestep."""
    rules = {
        "raw layer, clean step (the hyperfeatures paper's baseline; a DiT's block outputs), layer chosen on val": (
            {name: (lambda f, name=name: f["raw"][name], None) for name in first["raw"]}, "layer"),
    }
    if 261 in first["dift"]:   # DIFT reads a UNet's decoder blocks
        blocks = first["dift"][DIFT_TIMESTEPS[0]]
        rules["DIFT as published (up_blocks.1, t 261, 8 noise draws)"] = ({"-": (lambda f: f["dift"][261][1], 261)},
                                                                           "")
        rules["DIFT, block and timestep chosen on val"] = (
            {f"up_blocks.{b}, t {t}": (lambda f, b=b, t=t: f["dift"][t][b], t) for t in DIFT_TIMESTEPS for b in blocks},
            "block, timestep")
    else:   # DiTF reads a transformer block's input through its AdaLN
        keys = first["dift"][260]
        middle = (max(k for _, k in keys) + 1) // 2   # DiftSettings' default: len(blocks) // 2
        rules[f"DiTF as published (block {middle}'s input, t 260, 8 draws, massive channels discarded)"] = (
            {"-": (lambda f: f["dift"][260][("ditf", middle)], 260)}, "")
        for variant, label in (("ditf", "DiTF"), ("no discard", "DiTF without the channel discard"),
                               ("raw input", "DiTF's raw block input (no AdaLN, no discard)")):
            rules[f"{label}, block and timestep chosen on val"] = (
                {f"block {k}, t {t}": (lambda f, v=variant, k=k, t=t: f["dift"][t][(v, k)], t)
                 for t in DITF_TIMESTEPS for (v_, k) in keys if v_ == variant}, "block, timestep")
    rules[f"Diffusion Hyperfeatures (trained {hf_steps} steps on 120 world train pairs, S = 4 of T = 4)"] = (
        {"-": (lambda f: f["hf"], None)}, "")
    rules["same position (no model)"] = ({"-": (None, None)}, "")
    return rules


def run_correspondence(model: str, n: int, work: Path, hf_steps: int = HF_STEPS) -> dict:
    """Every method's setting chosen on val, where DIFT (DiTF) runs at every swept timestep; test and fresh then run
    only the timesteps the chosen settings read."""
    from diffprobe.config import load_configured_backbone

    began = time.perf_counter()
    hyperfeatures = trained_hyperfeatures(model, work, hf_steps)
    training = time.perf_counter() - began
    bb = load_configured_backbone(user_config("correspond", model))
    hyperfeatures.check_backbone(bb.probe.sites)
    swept = DIFT_TIMESTEPS if is_unet(bb.probe.sites) else DITF_TIMESTEPS
    start = time.perf_counter()
    data = {"val": pair_data(bb, "val", n, swept, hyperfeatures)}
    val_seconds = (time.perf_counter() - start) / (2 * len(data["val"]))
    rules = correspondence_rules(data["val"][0]["source"], hf_steps)
    choices = {}
    for method, (settings, _) in rules.items():
        val = {k: pck_of(data["val"], pick) for k, (pick, _) in settings.items()}
        choices[method] = max(val, key=lambda k: val[k]["pck_point"]), val
    needed = tuple(sorted({rules[m][0][best][1] for m, (best, _) in choices.items()} - {None}))
    start = time.perf_counter()
    for split in ("test", "fresh"):
        data[split] = pair_data(bb, split, n, needed, hyperfeatures)
    capture = (time.perf_counter() - start) / sum(2 * len(data[s]) for s in ("test", "fresh"))
    out = {"pairs": {split: len(d) for split, d in data.items()}, "per_category": n, "capture_seconds": capture,
           "val_capture_seconds": val_seconds, "swept_timesteps": list(swept), "test_timesteps": list(needed),
           "hyperfeatures_training_minutes": training / 60, "methods": {}}
    for method, (best, val) in choices.items():
        settings, knob = rules[method]
        out["methods"][method] = {"knob": knob, "chosen": best, "val": val[best],
                                  **{split: pck_of(data[split], settings[best][0]) for split in ("test", "fresh")}}
        print(f"  {method}: {best} -> test {out['methods'][method]['test']['pck_point']:.1f}", file=sys.stderr,
              flush=True)
    return out


def chosen(rows: dict) -> str:
    """The setting with the best mean of the two mIoUs on val (ties: the first listed)."""
    return max(rows, key=lambda s: (rows[s]["paper_miou"] + rows[s]["object_miou"]) / 2)


def run_segmentation(model: str, n: int) -> dict:
    from diffprobe.config import load_configured_backbone
    from diffprobe.tasks.diffseg import settings_of

    cfg = user_config("diffseg", model)
    bb = load_configured_backbone(cfg)
    settings = settings_of(cfg)
    head = DiffSegHead(settings, bb.check_image_size(settings.image_size))
    start = time.perf_counter()
    data = {split: [captured(bb, head, s) for s in scenes(split, n, bb.sample_size)] for split in SPLITS}
    capture = (time.perf_counter() - start) / (n * len(SPLITS))
    out = {"default": {"tau": settings.tau, "divisors": settings.divisors}, "capture_seconds": capture,
           "methods": {}}
    for method, (rules, knob) in segmentation_methods(head).items():
        val = {setting: score(data["val"], rule) for setting, rule in rules.items()}
        best = chosen(val)
        out["methods"][method] = {"knob": knob, "val_sweep": val, "chosen": best,
                                  **{split: score(data[split], rules[best]) for split in ("test", "fresh")}}
        print(f"  {method}: {best} -> test {out['methods'][method]['test']}", file=sys.stderr, flush=True)
    method = "DiffSeg + PAMR" if settings.pamr else "DiffSeg (reference merge)"
    rule = segmentation_methods(head)[method][0].get(f"tau {settings.tau}")
    if settings.method == "diffseg" and rule is not None:   # the shipped default, as a user runs it
        out["default"]["method"] = method
        out["default_rows"] = {split: score(data[split], rule) for split in SPLITS}
    return out


def fmt(r: dict) -> str:
    return (f"{r['paper_miou']:.1f} · {r['object_miou']:.1f} · {r['paper_accuracy']:.1f} · {r['object_accuracy']:.1f} · "
            f"{r['segments']:.1f}")


def segmentation_doc(model: str, r: dict) -> list[str]:
    lines = [f"### Segmentation on {model}", "",
             f"Shipped default: {r['default'].get('method', 'DiffSeg')}, tau {r['default']['tau']}, attention levels "
             f"{r['default']['divisors'] or 'all'}. Capture (one denoiser call per scene, shared by the diffusion "
             f"methods): {r['capture_seconds'] * 1000:.0f} ms per image.", "",
             "Cells: mIoU (%) under the paper's protocol (COCO-Stuff-27 classes, accumulated) · mIoU (%) per object "
             "(the world's 13 classes, image means) · pixel accuracy (%) under each · segments per image. Each "
             "method's setting was chosen on val by the mean of the two mIoUs; rows are sorted by that mean on "
             "test.", "",
             "| method | chosen on val | val | test | fresh test (world seed 1) | s / image (test) |",
             "|---|---|---|---|---|---|"]
    methods = r["methods"]
    order = sorted(methods, key=lambda m: -(methods[m]["test"]["paper_miou"] + methods[m]["test"]["object_miou"]))
    for m in order:
        row = methods[m]
        val = row["val_sweep"][row["chosen"]]
        lines.append(f"| {m} | {row['chosen']} | {fmt(val)} | {fmt(row['test'])} | {fmt(row['fresh'])} | "
                     f"{row['test']['seconds']:.3f} |")
    if "default_rows" in r:
        d = r["default_rows"]
        lines += ["", f"The shipped default ({r['default'].get('method', 'DiffSeg')}, tau {r['default']['tau']}) on the same "
                      f"scenes: val {fmt(d['val'])}; "
                      f"test {fmt(d['test'])}; fresh {fmt(d['fresh'])}."]
    return lines + [""]


def loc_fmt(r: dict) -> str:
    return f"{r['max_box_acc_v2']:.1f} · {r['pxap']:.1f} · {r['gt_known_fixed']:.1f}"


def localisation_doc(model: str, r: dict) -> list[str]:
    lines = [f"### Localisation on {model}", "",
             f"Words: {r['words']['val']} / {r['words']['test']} / {r['words']['fresh']} (val / test / fresh), each "
             f"category a scene's caption names, scored against the union of its objects' exact masks and any of "
             f"their boxes. Shipped default: `localize.method={r['default']['method']}`, mask threshold "
             f"{r['default']['threshold']}. Capture per scene (diffprobe's call and a {INVERSION_STEPS}-step DDIM "
             f"inversion): {r['capture_seconds'] * 1000:.0f} ms.", "",
             "Cells: MaxBoxAccV2 (%) · PxAP (%) · GT-known Loc (%) at the mask threshold chosen on val (fixed, "
             "what a user gets; MaxBoxAccV2 and PxAP pick their best thresholds per split). Settings chosen on val by "
             "MaxBoxAccV2.", "",
             "| method | chosen on val | threshold | val | test | fresh test | s / word (test) |",
             "|---|---|---|---|---|---|---|"]
    methods = r["methods"]
    for m in sorted(methods, key=lambda m: -methods[m]["test"]["max_box_acc_v2"]):
        row = methods[m]
        lines.append(f"| {m} | {row['chosen']} | {row['threshold']:.2f} | {loc_fmt(row['val'])} | "
                     f"{loc_fmt(row['test'])} | {loc_fmt(row['fresh'])} | {row['test']['seconds']:.3f} |")
    shipped = methods.get("diffprobe default (shipped settings and threshold)", {})
    if "val_threshold" in shipped:
        lines += ["", f"The shipped settings' best threshold on val is {shipped['val_threshold']:.2f}: GT-known Loc there "
                      + " / ".join(f"{shipped[s]['gt_known_at_val_threshold']:.1f}" for s in SPLITS)
                      + " (val / test / fresh)."]
    return lines + [""]


def correspondence_doc(model: str, r: dict) -> list[str]:
    pairs = r["pairs"]
    lines = [f"### Correspondence on {model}", "",
             f"World pairs: {pairs['val']} / {pairs['test']} / {pairs['fresh']} (val / test / fresh; up to "
             f"{r['per_category']} per category: faces, birds, houses), the points visible in both, PCK@0.1 of the "
             f"target object's box (per point · mean per pair, %). Features per image: "
             + (f"{r['val_capture_seconds'] * 1000:.0f} ms on val (the clean call, the hyperfeature calls, and DIFT's "
                f"(UNet) or DiTF's (transformer) calls at every swept timestep: {r['swept_timesteps']}), "
                f"{r['capture_seconds'] * 1000:.0f} ms on test and fresh (only the timesteps the chosen settings read: "
                f"{r['test_timesteps']})." if "val_capture_seconds" in r else
                f"{r['capture_seconds'] * 1000:.0f} ms (the clean call, and DIFT's (UNet) or DiTF's (transformer) "
                "calls at every swept timestep)."), "",
             "| method | chosen on val | val | test | fresh test | s / pair (matching) |", "|---|---|---|---|---|---|"]
    methods = r["methods"]
    for m in sorted(methods, key=lambda m: -methods[m]["test"]["pck_point"]):
        row = methods[m]
        cells = " | ".join(f"{row[s]['pck_point']:.1f} · {row[s]['pck_pair']:.1f}" for s in ("val", "test", "fresh"))
        lines.append(f"| {m} | {row['chosen']} | {cells} | {row['test']['seconds']:.3f} |")
    return lines + [""]


def runs_line(runs: list[dict]) -> str:
    """The invocations that computed the parts: which, when, how long, with how many jobs and threads."""
    if not runs:
        return "The parts were computed one after another by earlier versions of the script."
    return " ".join(f"{r['when']}: {len(r['parts'])} part(s) ({', '.join(r['parts'])}) in {r['minutes']:.0f} min "
                    f"wall, {r['jobs']} job(s) of {r['threads']} thread(s) at once." for r in runs)


def write_doc(results: dict, path: Path, meta: dict) -> None:
    lines = ["# WorldBench", "",
             "Every head beside the peers' methods and the classical baselines on the procedural world's exact ground "
             "truth (docs/world.md). Settings are chosen on val only; test is reported once; the fresh test set "
             "comes from another world seed, so a reader sees whether anything overfits. Written by:", "",
             f"    {meta['command']}", "",
             f"{meta['n']} scenes per split. " + runs_line(meta["runs"]) + " Time per part (wall minutes; the "
             "one-minute load average as it started and as it ended: with two jobs on the 2 cores a load near 2 is "
             "the run itself, above it other work shared the machine and the times are inflated): "
             + ", ".join(f"{k} {r['minutes']:.1f} (load {r['load_at_start']:.1f}"
                         + (f" to {r['load_at_end']:.1f})" if "load_at_end" in r else ")") for k, r in results.items()
                         if "minutes" in r) + ".", ""]
    for capability, title, doc in (("segmentation", "## Segmentation", segmentation_doc),
                                   ("localisation", "## Localisation", localisation_doc),
                                   ("correspondence", "## Correspondence", correspondence_doc),
                                   ("keypoints", "## Keypoints", lambda model, r: keypoints_doc(r))):
        if any(k.endswith("/" + capability) for k in results):
            lines += [title, ""]
        for key, r in sorted(results.items()):
            model, kind = key.split("/")
            if kind == capability:
                lines += doc(model, r)
    kept = path.read_text().split(NOTES, 1)[1] if path.is_file() and NOTES in path.read_text() else "\n"
    tmp = path.with_suffix(".partial")
    tmp.write_text("\n".join(lines) + "\n" + NOTES + kept)
    tmp.replace(path)


def run_part(args, key: str) -> dict:
    """One part (model/capability) in this process."""
    model, capability = key.split("/")
    if capability == "segmentation":
        return run_segmentation(model, args.n)
    if capability == "localisation":
        return run_localisation(model, args.n)
    return run_correspondence(model, min(args.n, PAIRS), args.work.resolve() / "correspondence", args.hf_steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mini", "mini_dit"])
    ap.add_argument("--n", type=int, default=100, help="scenes per split")
    ap.add_argument("--capabilities", nargs="+", default=list(CAPABILITIES), choices=list(CAPABILITIES))
    ap.add_argument("--jobs", type=int, default=2, help="parts (and the keypoint board's fits and evaluations) run "
                    "at once, each in its own process")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (mini's 64 px calls and the "
                    "methods' small tensors run best on one)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "worldbench.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "worldbench.md")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "worldbench",
                    help="the world datasets, every fit and evaluation run and each part's result (kept: a rerun "
                    "resumes)")
    ap.add_argument("--hf-steps", type=int, default=HF_STEPS, help="hyperfeature training steps (correspondence)")
    ap.add_argument("--keypoint-quick", action="store_true", help="keypoints plumbing only: 3 Adam steps, 1 "
                    "transform, 20 / 10 evaluation images (numbers meaningless)")
    ap.add_argument("--part", help=argparse.SUPPRESS)       # a child: run this model/capability, write --part-out
    ap.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part:
        result = run_part(args, args.part)
        tmp = args.part_out.with_suffix(".partial")
        tmp.write_text(json.dumps(result))
        tmp.replace(args.part_out)
        return
    saved = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results = saved.get("results", {}) if saved.get("n") == args.n else {}
    runs = saved.get("runs", []) if saved.get("n") == args.n else []
    slots, lock = Slots(args.jobs, args.threads), threading.Lock()
    keys = [f"{'faces' if CAPABILITIES[c] == 'board' else m}/{c}" for c in args.capabilities for m in args.models
            if CAPABILITIES[c] != "board" or m == args.models[0]]
    todo = sorted((k for k in dict.fromkeys(keys) if k not in results),
                  key=lambda k: ("keypoints", "correspondence", "segmentation", "localisation").index(k.split("/")[1]))

    def part(key: str) -> None:
        if key.endswith("/keypoints"):
            began, load = time.time(), os.getloadavg()[0]
            result = run_keypoints(args.work.resolve() / "keypoints", slots, args.keypoint_quick)
        else:
            out = args.work.resolve() / "parts" / f"{key.replace('/', '_')}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            with slots.slot():
                began, load = time.time(), os.getloadavg()[0]
                subprocess.run([sys.executable, __file__, "--part", key, "--part-out", str(out), "--n", str(args.n),
                                "--threads", str(args.threads), "--work", str(args.work.resolve()),
                                "--hf-steps", str(args.hf_steps)], cwd=ROOT, env=slots.env, check=True)
            result = json.loads(out.read_text())
        with lock:
            results[key] = {**result, "minutes": (time.time() - began) / 60, "load_at_start": load,
                            "load_at_end": os.getloadavg()[0]}
            save()
        print(f"{key}: {results[key]['minutes']:.1f} min", file=sys.stderr, flush=True)

    def save() -> None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_suffix(".partial")
        tmp.write_text(json.dumps({"n": args.n, "results": results, "runs": runs}, indent=1))
        tmp.replace(args.results)

    began = time.time()
    if any(k.endswith("/correspondence") for k in todo):   # the correspondence parts share one world dataset
        with slots.slot():
            spair_world(args.work.resolve() / "correspondence")
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        futures = [pool.submit(part, todo[0])]
        if todo[0].endswith("/keypoints"):   # its first jobs start in threads of its own: let them queue first
            slots.wait_for_queue(PRIORITY, timeout=30)
        for future in futures + [pool.submit(part, key) for key in todo[1:]]:
            future.result()
    if todo:
        runs.append({"parts": todo, "minutes": (time.time() - began) / 60, "jobs": args.jobs,
                     "threads": args.threads, "when": time.strftime("%Y-%m-%d %H:%M")})
        save()
    meta = {"command": "python benchmarks/worldbench.py " + " ".join(sys.argv[1:]), "n": args.n,
            "threads": args.threads, "jobs": args.jobs, "runs": runs}
    write_doc(results, args.doc, meta)
    print(f"wrote {args.doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
