"""mode=eval of task=keypoints: found points on the train and test splits, regressor, dataset metric.

Found points of each split are checkpointed to out_dir/eval_<split>.safetensors every CHECKPOINT_EVERY
images; resume=<earlier run dir> continues from there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from diffprobe.errors import DiffprobeError
from diffprobe.eval.landmarks import apply_regressor, fit_regressor, inter_ocular_error, visible_error
from diffprobe.heads.keypoints.image_sets import ImageSet
from diffprobe.io import load_tensors, save_json, save_tensors

log = logging.getLogger(__name__)
CHECKPOINT_EVERY = 25


def collect(predict: Callable, images: ImageSet, split: str, out_dir: Path, resume: str | None):
    """(found (N, K, 2), ground truth (N, L, 2), visible (N, L)) in [0, 1] of the processed image."""
    if len(images) == 0:
        raise DiffprobeError(f"the {split} split is empty")
    found, gt, vis = [], [], []
    name = f"eval_{split}.safetensors"
    if resume and (Path(resume) / name).is_file():
        saved, _ = load_tensors(Path(resume) / name)
        found, gt, vis = ([t.numpy() for t in saved[k]] for k in ("found", "gt", "visible"))
        log.info("resuming %s split at image %d", split, len(found))
    for i in tqdm(range(len(found), len(images)), desc=f"keypoints eval ({split})", initial=len(found),
                  total=len(images)):
        points, _, frame, _ = predict(images, i)
        g, v = images.landmarks(i, frame)
        found.append(points / images.size)
        gt.append(g)
        vis.append(v)
        if (i + 1) % CHECKPOINT_EVERY == 0 or i + 1 == len(images):
            save_tensors(out_dir / name, {"found": torch.tensor(np.stack(found)), "gt": torch.tensor(np.stack(gt)),
                                          "visible": torch.tensor(np.stack(vis))})
    return np.stack(found), np.stack(gt), np.stack(vis)


def evaluate(predict: Callable, train: ImageSet, test: ImageSet, dataset: str, out_dir: Path,
             resume: str | None = None) -> dict:
    """Fit the regressor on train, report the dataset's metric on test; writes metrics.json."""
    found_tr, gt_tr, vis_tr = collect(predict, train, "train", out_dir, resume)
    found_te, gt_te, vis_te = collect(predict, test, "test", out_dir, resume)
    W = fit_regressor(found_tr, gt_tr, vis_tr)
    pred = apply_regressor(W, found_te)
    if dataset == "celeba":
        res = inter_ocular_error(pred, gt_te)
    elif dataset == "cub":
        res = visible_error(pred, gt_te, vis_te)
    else:
        raise DiffprobeError(f"no landmark metric for data={dataset}")
    metrics = {k: v for k, v in res.items() if k != "per_image"}
    metrics.update(dataset=dataset, num_train=len(train), num_test=len(test), num_keypoints=int(found_tr.shape[1]))
    save_tensors(out_dir / "regressor.safetensors", {"W": torch.tensor(W)})
    save_json(out_dir / "metrics.json", metrics)
    return metrics
