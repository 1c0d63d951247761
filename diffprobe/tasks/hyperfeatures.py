"""task=hyperfeatures: train, evaluate and ablate the Diffusion Hyperfeatures aggregation network.

    mode=train    data=spair|cub|pairs  -> model/ (aggregator + extraction config), checkpoint/, history.json,
                                           curves.png, mixing_weights.png, metrics.json
    mode=eval     weights=DIR data=...  -> metrics.json (PCK@alpha_img and _bbox, per point and per image), pairs.json,
                                           pairs/<descriptor>_<pair>.png (matches of the first plot_pairs pairs)
    mode=ablate   weights=DIR data=...  -> ablation.json: full model vs the pruned layer/step raw and through
                                           its bottleneck
    mode=extract  weights=DIR image=... -> <image>/descriptors.safetensors (D, H, W) and <image>/pca.png
    mode=baseline data=...              -> metrics.json for one raw layer at t=-1 (SD-Layer-4), no training
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import ClassVar, Optional
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from diffprobe.config import keys_of, load_configured_backbone, run_config, section
from diffprobe.data.images import load_image
from diffprobe.data.pairs_json import CorrespondencePair
from diffprobe.errors import DiffprobeError
from diffprobe.heads.hyperfeatures.evaluate import Describe, PairPCK, evaluate_pairs, match_pair
from diffprobe.heads.hyperfeatures.extract import AUTO, DescriptorHead, ExtractionSettings
from diffprobe.heads.hyperfeatures.figures import plot_matches, plot_mixing_weights, plot_training_curves
from diffprobe.heads.hyperfeatures.matching import METHODS
from diffprobe.heads.hyperfeatures.model import (
    HyperfeatureModel,
    hyperfeature_describer,
    pruned_describers,
    raw_layer_describer,
    resolve_raw_layer,
)
from diffprobe.training.hyperfeatures import FeatureSource, AggregatorTrainSettings, check_batch_split, descriptor_fn, train
from diffprobe.io import save_json, save_png, save_tensors
from diffprobe.items import run_items
from diffprobe.runfolder import safe_name
from diffprobe.tasks.image_runs import Job, run_job

log = logging.getLogger(__name__)
MODES = ("train", "eval", "ablate", "extract", "baseline")


# hyperfeatures.*: the extraction's and the aggregator trainer's settings as written there (the model fixes the
# image size when it is null; layers are a list of names/globs or [auto]), and the task's own keys
EXTRACTION_KEYS = keys_of(ExtractionSettings, exclude=("sample_latent", "guidance"),
                          keys={"layers": (list[str], [AUTO]), "image_size": (Optional[int], None)},
                          limits={"num_steps": "1..10000", "save_every": ">= 1", "image_size": "8..16384"})
TRAINING_KEYS = keys_of(AggregatorTrainSettings, exclude=("seed", "alpha"),
                        limits={"train_steps": ">= 0", "batch": "1..4096", "lr": "> 0", "weight_decay": ">= 0",
                                "temperature": "> 0", "val_every": ">= 1", "checkpoint_minutes": "> 0"})


@dataclass
class HyperfeaturesSettings(EXTRACTION_KEYS, TRAINING_KEYS):
    LIMITS: ClassVar[dict] = {**EXTRACTION_KEYS.LIMITS, **TRAINING_KEYS.LIMITS, "output_size": "1..4096",
                              "projection_dim": "1..65536", "val_pairs": ">= 1", "feature_store": ">= 0",
                              "plot_pairs": "0..10000"}

    mode: str = "train"
    weights: str | None = None  # a model directory (eval, ablate, extract)
    resume: str | None = None  # a checkpoint directory to continue training from
    output_size: int | None = None  # null: image_size / VAE factor (ref 64)
    projection_dim: int = 384
    val_pairs: int = 360
    split: str = "test"  # eval/ablate split
    alpha: float = 0.1
    method: str = "nn"
    feature_store: int = 16
    raw_layer: str = AUTO  # mode=baseline
    plot_pairs: int = 4  # eval/ablate/baseline: match figures of the first pairs, in pairs/

    def part(self, keys: type) -> dict:
        """The values of one settings class's keys."""
        return {f.name: getattr(self, f.name) for f in fields(keys)}


def settings_of(cfg: DictConfig) -> HyperfeaturesSettings:
    """The hyperfeatures.* keys, validated (no model needed)."""
    p = section(cfg, "hyperfeatures", HyperfeaturesSettings)
    if p.mode not in MODES:
        raise DiffprobeError(f"mode must be one of {MODES}, got {p.mode!r}")
    if p.method not in METHODS:
        raise DiffprobeError(f"method must be one of {METHODS}, got {p.method!r}")
    if p.process not in ("inversion", "one_step"):
        raise DiffprobeError(f"task=hyperfeatures works on real images: process must be inversion or one_step, not {p.process!r}")
    if not 0 < p.alpha <= 1:
        raise DiffprobeError(f"alpha must be in (0, 1], got {p.alpha}")
    if p.mode not in ("train", "baseline") and not p.weights:
        raise DiffprobeError(f"mode={p.mode} needs weights=DIR (the model/ directory a training run wrote)")
    return p


def load_pairs(data: DictConfig | None, split: str, seed: int) -> tuple[list[CorrespondencePair], str]:
    """Pairs of cfg.data for `split` and a one-line description of exactly which pairs they are."""
    if data is None or not data.get("root") and not data.get("file"):
        raise DiffprobeError("this mode needs pairs: data=spair data.root=DIR, data=cub data.root=DIR, "
                             "or data=pairs data.file=PAIRS.json")
    name = data.get("name")
    if name == "spair":
        from diffprobe.data.spair import find_spair_root, read_spair

        if data.get("file"):
            from diffprobe.data.pairs_json import read_pairs_json

            pairs = read_pairs_json(data.file, image_root=find_spair_root(data.root) / "JPEGImages")
            return pairs, f"SPair-71k pairs listed in {data.file} ({len(pairs)} pairs)"
        per_cat = data.get("per_category")
        pairs = read_spair(data.root, split=split, categories=data.get("categories"), per_category=per_cat, seed=seed)
        which = f"a seeded subset of {per_cat} pairs per category (seed {seed})" if per_cat else "all pairs"
        return pairs, f"SPair-71k {split}: {which}, {len(pairs)} pairs"
    if name == "cub":
        from diffprobe.data.cub_pairs import cub_pairs

        if split == "val":
            raise DiffprobeError("CUB-200-2011 has no validation split")
        ppc = int(data.get("pairs_per_class", 5))
        pairs = cub_pairs(data.root, split="train" if split in ("train", "trn") else "test", pairs_per_class=ppc,
                          seed=seed, classes=data.get("classes"))
        return pairs, f"CUB-200-2011 {split}: {ppc} same-class pairs per class (seed {seed}), {len(pairs)} pairs"
    if name == "pairs":
        from diffprobe.data.pairs_json import read_pairs_json

        key = "val_file" if split == "val" else "file"
        if not data.get(key):
            raise DiffprobeError(f"data=pairs needs data.{key}=PAIRS.json for the {split} pairs")
        pairs = read_pairs_json(data[key], image_root=data.get("image_root"))
        return pairs, f"pairs from {data[key]} ({len(pairs)} pairs)"
    raise DiffprobeError(f"task=hyperfeatures reads data=spair, data=cub or data=pairs, not data={name}")


def _extraction(p: HyperfeaturesSettings, bb) -> ExtractionSettings:
    layers = p.layers[0] if len(p.layers) == 1 else list(p.layers)
    return ExtractionSettings(**{**p.part(EXTRACTION_KEYS), "layers": layers,
                                 "image_size": bb.check_image_size(p.image_size)})


def _train(p: HyperfeaturesSettings, cfg: DictConfig, bb, out_dir: Path) -> dict:
    rank, _ = check_batch_split(p.batch)
    seed = run_config(cfg).seed
    extraction = _extraction(p, bb)
    output_size = p.output_size or extraction.image_size // bb.vae_factor
    from diffprobe.drives import inversion_timesteps

    calls = inversion_timesteps(bb, extraction.num_steps)
    model = HyperfeatureModel.build(bb.probe.sites, extraction, output_size, p.projection_dim, seed=seed,
                                    step_labels=[float(calls[c]) for c in extraction.saved_calls()])
    model.net.to(bb.device)
    train_pairs, train_desc = load_pairs(cfg.get("data"), "train", seed)
    try:
        val_pairs, val_desc = load_pairs(cfg.get("data"), "val", seed)
    except DiffprobeError as exc:
        log.warning("no validation pairs (%s): validating on training pairs", exc)
        val_pairs, val_desc = train_pairs, f"training pairs ({train_desc})"
    if len(val_pairs) > p.val_pairs:
        keep = sorted(np.random.default_rng(seed).permutation(len(val_pairs))[: p.val_pairs])
        val_pairs = [val_pairs[i] for i in keep]
        val_desc += f", {p.val_pairs} of them drawn with seed {seed}"
    source = FeatureSource(bb, extraction, model.net.config.layers, capacity=p.feature_store, seed=seed)
    tcfg = AggregatorTrainSettings(**p.part(TRAINING_KEYS), alpha=p.alpha, seed=seed)
    model.save_extraction(out_dir / "checkpoint")  # so a checkpoint directory also loads as a model
    smaller = " image_size=256" if bb.sample_size > 256 else ""  # a smaller image helps SD-sized models only
    history = train(model.net, source, train_pairs, val_pairs, tcfg, out_dir / "checkpoint",
                    resume=Path(p.resume) if p.resume else None,
                    hint=f"For a CPU: hyperfeatures.process=one_step{smaller} (README, 'On a CPU').", method=p.method)
    if rank != 0:  # the first process writes the model, curves and metrics
        return {"mode": "train", "process": rank}
    model.save(out_dir / "model")
    save_json(out_dir / "history.json", history)
    plot_training_curves(history, out_dir / "curves.png", p.alpha)
    _mixing_figure(model, out_dir)
    last = history.get("last_val") or {}   # this run's own validation after the last step, when it ran one
    final = (last["summary"] if last.get("step") == tcfg.train_steps else
             evaluate_pairs(descriptor_fn(model.net, source), val_pairs, extraction.image_size, p.alpha,
                            p.method).summary())
    metrics = {"mode": "train", "train_pairs": train_desc, "val_pairs": val_desc, "val": final,
               "parameters": model.net.num_parameters(), "layers": len(model.net.config.layers),
               "saved_steps": extraction.num_saved, "unet_extractions": source.extractions}
    save_json(out_dir / "metrics.json", metrics)
    return metrics


def _mixing_figure(model: HyperfeatureModel, out_dir: Path) -> None:
    w = model.net.mixing_weights().detach().cpu().numpy()
    plot_mixing_weights(w, model.net.config.layers, model.net.config.step_labels, out_dir / "mixing_weights.png")
    layer, step, weight = model.top_layer_step()
    save_json(out_dir / "mixing_weights.json", {
        "weights": w, "layers": model.net.config.layers, "saved_calls": model.extraction.saved_calls(),
        "top": {"layer": model.net.config.layers[layer], "saved_step": step, "weight": weight},
    })


def _evaluate(p: HyperfeaturesSettings, cfg: DictConfig, describers: dict[str, Describe], size: int,
              out_dir: Path) -> dict:
    """PCK of every describer over the pairs through the item loop (checkpointed, resumable, shardable);
    match figures of the first plot_pairs pairs."""
    seed = run_config(cfg).seed
    pairs, desc = load_pairs(cfg.get("data"), p.split, seed)
    results = {}
    for name, describe in describers.items():
        metric = PairPCK(len(pairs), p.alpha, p.method)

        def process(i: int, describe=describe, metric=metric):
            pred, info = match_pair(describe, pairs[i], size, p.method)
            return lambda: metric.update(i, pairs[i], pred, info["target_hw"], info["mutual"])

        fingerprint = {"descriptor": name, "weights": p.weights, "pairs": desc, "alpha": p.alpha, "method": p.method,
                       "model": cfg.model.name, "image_size": size, "seed": seed}
        state = run_items(len(pairs), process, {"pck": metric}, out_dir, fingerprint, name=f"eval_{name}",
                          desc=f"evaluate {name}", checkpoint_minutes=p.checkpoint_minutes)
        rows = [state.records[i] for i in sorted(state.records)]
        results[name] = (metric.result(), rows)
        log.info("%s: %s", name, metric.result())
        for pair, row in list(zip(pairs, rows))[: p.plot_pairs]:
            plot_matches(load_image(pair.source), load_image(pair.target), pair.source_points,
                         np.asarray(row["predicted"]), out_dir / "pairs" / f"{name}_{safe_name(pair.name)}.png",
                         correct=np.asarray(row["correct_img"]),
                         title=f"{name}: {pair.name}, PCK@{p.alpha:g}_img {row[f'pck@{p.alpha:g}_img']:.2f}")
    return {"pairs": desc, "pooling": "per point over all pairs (per_image: mean of per-pair PCK)",
            "results": results}


def job(cfg: DictConfig, bb) -> Job:
    """Descriptors of each image with given weights (mode=extract, and task=analyze): the descriptor head; its
    files are descriptors.safetensors ((D, H, W), the image's size in the metadata) and pca.png."""
    p = settings_of(cfg)
    if not p.weights:
        raise DiffprobeError("hyperfeature descriptors need hyperfeatures.weights=DIR (a model folder written by "
                             "mode=train)")
    model = HyperfeatureModel.load(p.weights)
    model.check_backbone(bb.probe.sites)
    model.net.to(bb.device)
    head = DescriptorHead(model.net, model.extraction, seed=run_config(cfg).seed)

    def write(results: list, path: Path, image, target: Path) -> dict:
        desc = results[0][0]
        save_tensors(target / "descriptors.safetensors", {"descriptors": desc},
                     metadata={"image": str(path), "height": str(image.height), "width": str(image.width)})
        save_png(target / "pca.png", pca_rgb(desc))
        return {"descriptors": list(desc.shape)}

    return Job([head], write)


def pca_rgb(desc: torch.Tensor) -> np.ndarray:
    """(D, h, w) descriptors -> (h, w, 3) uint8: the first three principal components (exact SVD, each signed so its
    largest loading is positive: the same descriptors give the same picture), min-max scaled."""
    d, h, w = desc.shape
    x = desc.detach().reshape(d, -1).T.double().cpu()
    x = x - x.mean(0)
    v = torch.linalg.svd(x, full_matrices=False).Vh[: min(3, d)].T
    v = v * torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    y = (x @ v).float()
    y = (y - y.min(0).values) / (y.max(0).values - y.min(0).values + 1e-8)
    y = torch.cat([y, torch.zeros(y.shape[0], 3 - y.shape[1])], 1) if y.shape[1] < 3 else y
    return (y.reshape(h, w, 3).numpy() * 255).astype(np.uint8)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    p = settings_of(cfg)
    if p.mode == "extract":
        return run_job(cfg, out_dir, "hyperfeatures")
    bb = load_configured_backbone(cfg)
    if p.mode == "train":
        return _train(p, cfg, bb, out_dir)
    seed = run_config(cfg).seed
    if p.mode == "baseline":
        size = bb.check_image_size(p.image_size)
        layer = resolve_raw_layer(bb.probe.sites, p.raw_layer)
        describers = {"raw_layer": raw_layer_describer(bb, layer, size, seed=seed)}
        res = _evaluate(p, cfg, describers, size, out_dir)
        out = {"mode": "baseline", "layer": layer, "step": "t=-1 (clean)", "pairs": res["pairs"],
               "pooling": res["pooling"], "raw_layer": res["results"]["raw_layer"][0]}
        save_json(out_dir / "pairs.json", {"raw_layer": res["results"]["raw_layer"][1]})
        save_json(out_dir / "metrics.json", out)
        return out
    model = HyperfeatureModel.load(p.weights)
    model.check_backbone(bb.probe.sites)
    model.net.to(bb.device)
    describers = {"hyperfeatures": hyperfeature_describer(model, bb, seed=seed)}
    if p.mode == "ablate":
        describers.update(pruned_describers(model, bb, seed=seed))
        _mixing_figure(model, out_dir)
    res = _evaluate(p, cfg, describers, model.extraction.image_size, out_dir)
    out = {"mode": p.mode, "weights": p.weights, "pairs": res["pairs"], "pooling": res["pooling"],
           "alpha": p.alpha, "method": p.method, **{k: v[0] for k, v in res["results"].items()}}
    if p.mode == "ablate":
        layer, step, weight = model.top_layer_step()
        out["pruned"] = {"layer": model.net.config.layers[layer], "saved_step": step,
                         "call": model.extraction.saved_calls()[step], "weight": weight}
    save_json(out_dir / "pairs.json", {k: v[1] for k, v in res["results"].items()})
    save_json(out_dir / ("ablation.json" if p.mode == "ablate" else "metrics.json"), out)
    return out
