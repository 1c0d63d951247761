"""Training the aggregation network on pairs with corresponding points (CLIP-style loss, AdamW),
with validation PCK every N steps, checkpoints that resume exactly, and a loss/PCK history.

The UNet is frozen: each image's raw feature maps are extracted once (no gradients) and kept in a
small LRU store (float16 by default), so repeated images cost no further UNet calls.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from diffprobe.data.pairs_json import CorrespondencePair
from diffprobe.errors import DiffprobeError
from diffprobe.heads.hyperfeatures.evaluate import evaluate_pairs, prepare_image
from diffprobe.heads.hyperfeatures.extract import ExtractionSettings, extract_features, image_generator
from diffprobe.heads.hyperfeatures.loss import correspondence_loss, to_grid
from diffprobe.heads.hyperfeatures.network import AggregationNetwork
from diffprobe.training.checkpoint import load_checkpoint, module_tensors, restore, save_checkpoint
from diffprobe.training.loop import run_steps

log = logging.getLogger(__name__)

Features = list[dict[str, torch.Tensor]]
CHECKPOINT = "checkpoint.safetensors"


class FeatureSource:
    """Raw maps of an image over the saved steps, extracted on first use; the last `capacity` images kept.

    source(path) -> (steps[position][layer] = (1, C, h, w), original (H, W)). The VAE posterior sample
    of each image is seeded from (seed, its pixels), so a resumed run sees the same features.
    """

    def __init__(self, bb, extraction: ExtractionSettings, layers: list[str], capacity: int = 16,
                 store_dtype: torch.dtype | None = torch.float16, seed: int = 0):
        self.bb, self.extraction, self.layers = bb, extraction, layers
        self.capacity, self.store_dtype, self.seed = capacity, store_dtype, seed
        self._store: OrderedDict[str, tuple[Features, tuple[int, int]]] = OrderedDict()
        self.extractions = 0

    def __call__(self, path: Path) -> tuple[Features, tuple[int, int]]:
        key = str(path)
        if key in self._store:
            self._store.move_to_end(key)
            return self._store[key]
        x, hw = prepare_image(Path(path), self.extraction.image_size)
        feats = extract_features(self.bb, x, self.extraction, layers=self.layers,
                                 dtype=self.store_dtype, generator=image_generator(self.seed, x))
        self.extractions += 1
        if self.capacity > 0:
            self._store[key] = (feats, hw)
            while len(self._store) > self.capacity:
                self._store.popitem(last=False)
        return feats, hw


@dataclass
class AggregatorTrainSettings:
    """train_steps: optimiser steps (ref 5000) of `batch` pairs each (ref 1; over several processes the batch is
    split between them and their gradients averaged); val_every: validation + checkpoint period (ref 1000);
    alpha: the validation's PCK threshold."""

    train_steps: int = 5000
    batch: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 0.07
    val_every: int = 1000
    alpha: float = 0.1
    seed: int = 0
    checkpoint_minutes: float = 5.0

    def __post_init__(self) -> None:
        if self.train_steps < 1 or self.val_every < 1 or self.batch < 1 or not self.lr > 0 or not self.temperature > 0:
            raise DiffprobeError("training needs train_steps >= 1, val_every >= 1, batch >= 1, lr > 0 and temperature > 0")
        if not self.checkpoint_minutes > 0:
            raise DiffprobeError("checkpoint_minutes must be positive")


def check_batch_split(batch: int) -> tuple[int, int]:
    """(rank, world) of this process when `batch` pairs per step split evenly between the processes."""
    from diffprobe import distributed

    rank, world = distributed.shard()
    if batch % world:
        raise DiffprobeError(f"hyperfeatures.batch ({batch}) must be a multiple of the {world} processes: each "
                             "takes the same number of pairs per step")
    return rank, world


def pair_order(num_pairs: int, sample: int, seed: int) -> int:
    """Index of the pair of the `sample`-th training sample (step * batch + j): a fresh seeded permutation
    every epoch (resumable)."""
    epoch, k = divmod(sample, num_pairs)
    return int(np.random.default_rng([seed, epoch]).permutation(num_pairs)[k])


def descriptor_fn(net: AggregationNetwork, source: FeatureSource):
    """describe(path) -> ((D, H, H) descriptors, original (H, W)) without gradients."""

    def describe(path: Path):
        feats, hw = source(path)
        with torch.no_grad():
            return net(feats)[0], hw

    return describe


def train(net: AggregationNetwork, source: FeatureSource, train_pairs: list[CorrespondencePair],
          val_pairs: list[CorrespondencePair], cfg: AggregatorTrainSettings, checkpoint_dir: Path,
          resume: Path | None = None, progress: bool = True, hint: str = "", method: str = "nn") -> dict:
    """Train `net` in place; returns the history {"loss": [[step, loss]], "val": [[step, pck_img, pck_bbox]]}, with
    "last_val": {"step": step, "summary": the summary} of this call's latest validation when it ran one (not kept in
    checkpoints: a resumed run's validations may have matched other pairs or by another method).
    `hint`: what to change when the run will take long on this device (said once, after the first step).

    Validation (PCK@alpha, per point pooled over val_pairs, points matched by `method`) and a checkpoint every
    cfg.val_every steps and at the end; a checkpoint (checkpoint_dir/checkpoint.safetensors,
    diffprobe.training.checkpoint) also every cfg.checkpoint_minutes and on Ctrl-C. `resume`: a checkpoint (or its
    folder) to continue from; without it, a checkpoint already in `checkpoint_dir` is continued.
    """
    from diffprobe import distributed

    if not train_pairs:
        raise DiffprobeError("no training pairs")
    rank, world = check_batch_split(cfg.batch)
    size = source.extraction.image_size
    grid = net.config.output_size
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    main = rank == 0
    state = {"step": 0}
    last_val = {}
    history = {"loss": [], "val": []}
    config = {"train": asdict(cfg), "aggregator": asdict(net.config)}
    if resume is None and (Path(checkpoint_dir) / CHECKPOINT).is_file():
        resume = Path(checkpoint_dir)
    if resume is not None:
        path = Path(resume) / CHECKPOINT if Path(resume).is_dir() else Path(resume)
        saved = load_checkpoint(path, opt, config)
        restore(net, saved.tensors, "net", path)
        state["step"], history = saved.step, saved.history
        log.info("resumed from %s at step %d", resume, saved.step)
    distributed.broadcast_parameters(net)  # data-parallel: one start, gradients averaged after every backward

    def step(i: int):
        losses = []
        for j in range(rank, cfg.batch, world):  # this process's pairs of the step's batch
            pair = train_pairs[pair_order(len(train_pairs), i * cfg.batch + j, cfg.seed)]
            (fa, hw_a), (fb, hw_b) = source(pair.source), source(pair.target)
            cells_a = to_grid(pair.source_points, hw_a, grid)  # original pixels straight to cells (reference)
            cells_b = to_grid(pair.target_points, hw_b, grid)
            losses.append(correspondence_loss(net(fa)[0], net(fb)[0], cells_a, cells_b, cfg.temperature))
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        distributed.average_gradients(net)

        def apply() -> None:
            opt.step()
            history["loss"].append([i + 1, loss.item()])
            state["step"] = i + 1

        return apply, {"loss": loss.item()}

    def save(done: int, scheduled: bool) -> None:
        if scheduled and val_pairs:  # validation at val_every steps and at the end
            s = evaluate_pairs(descriptor_fn(net, source), val_pairs, size, cfg.alpha, method).summary()
            history["val"].append([done, s.get(f"pck@{cfg.alpha:g}_img_per_point"),
                                   s.get(f"pck@{cfg.alpha:g}_bbox_per_point")])
            last_val.update(step=done, summary=s)
            log.info("step %d: val %s", done, s)
        save_checkpoint(Path(checkpoint_dir) / CHECKPOINT, module_tensors({"net": net}), opt, done, history, config)
        net.save(Path(checkpoint_dir))  # so the checkpoint folder also loads as the aggregator

    run_steps("train hyperfeatures", state["step"], cfg.train_steps, step, save, cfg.val_every, cfg.checkpoint_minutes,
              hint=hint, progress=progress, main=main)
    return {**history, **({"last_val": last_val} if last_val else {})}
