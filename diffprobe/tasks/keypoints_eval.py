"""mode=eval of task=keypoints: found points on the train and test splits, regressor, dataset metric.

The found points of each split are kept as item rows (diffprobe.items) and checkpointed to
out_dir/eval_<split>_state.* every 25 images and every few minutes; rerunning in the same folder or
resume=<earlier run dir> continues with the same settings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.eval.landmarks import apply_regressor, fit_regressor, inter_ocular_error, visible_error
from diffprobe.heads.keypoints.image_sets import ImageSet
from diffprobe.io import save_json, save_tensors
from diffprobe.items import IndexedRows, run_items

log = logging.getLogger(__name__)


def collect(predict: Callable, images: ImageSet, split: str, out_dir: Path, resume: str | None,
            fingerprint: dict | None = None):
    """(found (N, K, 2), ground truth (N, L, 2), visible (N, L)) in [0, 1] of the processed image."""
    if len(images) == 0:
        raise DiffprobeError(f"the {split} split is empty")
    rows = IndexedRows(len(images))

    def process(i: int):
        points, _, frame, _ = predict(images, i)
        gt, vis = images.landmarks(i, frame)
        return lambda: rows.update(i, found=points / images.size, gt=gt, visible=vis)

    run_items(len(images), process, {"rows": rows}, out_dir, {**(fingerprint or {}), "split": split,
                                                               "images": len(images)},
              name=f"eval_{split}", resume=resume, desc=f"keypoints eval ({split})")
    r = rows.result()
    return r["found"], r["gt"], r["visible"] > 0


def evaluate(predict: Callable, train: ImageSet, test: ImageSet, dataset: str, out_dir: Path,
             fingerprint: dict | None = None, resume: str | None = None) -> dict:
    """Fit the regressor on train, report the dataset's metric on test; writes metrics.json."""
    found_tr, gt_tr, vis_tr = collect(predict, train, "train", out_dir, resume, fingerprint)
    found_te, gt_te, vis_te = collect(predict, test, "test", out_dir, resume, fingerprint)
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
