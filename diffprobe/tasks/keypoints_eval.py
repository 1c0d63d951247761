"""mode=eval of task=keypoints: found points on the train and test splits, regressor, dataset metric.

The found points of each split are kept as item rows (diffprobe.items) and checkpointed to
out_dir/eval_<split>_state.* every 25 images and every few minutes; rerunning in the same folder or
resume=<earlier run dir> continues with the same settings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from diffprobe.errors import DiffprobeError
from diffprobe.eval.landmarks import apply_regressor, fit_regressor, inter_ocular_error, visible_error
from diffprobe.heads.keypoints.image_sets import ImageSet
from diffprobe.io import load_tensors, save_json, save_tensors
from diffprobe.items import IndexedRows, run_items
from diffprobe.tasks.keypoints_outputs import write_test_predictions

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


def landmark_metric(dataset: str, pred: np.ndarray, gt: np.ndarray, visible: np.ndarray) -> dict:
    """The dataset's metric of predicted landmarks (N, L, 2) in [0, 1]: celeba inter-ocular error, cub the
    mean L2 over visible parts; `per_image` (N,) included."""
    if dataset == "celeba":
        return inter_ocular_error(pred, gt)
    if dataset == "cub":
        return visible_error(pred, gt, visible)
    raise DiffprobeError(f"no landmark metric for data={dataset}")


def mean_landmarks(gt: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(L, 2): per landmark the mean of the training images' ground truth where visible (the no-image
    baseline: every test image gets these)."""
    w = visible[..., None].astype(float)
    return (gt * w).sum(0) / np.maximum(w.sum(0), 1.0)


def load_regressor(path: str | Path, keypoints: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(W (2K, 2L), mean landmarks (L, 2), its training images) of a regressor.safetensors an eval wrote for the
    keypoints whose fingerprint is `keypoints`; refused for other keypoints."""
    tensors, meta = load_tensors(path)
    if "W" not in tensors or "mean_landmarks" not in tensors or "keypoints" not in meta:
        raise DiffprobeError(f"{path} is not a regressor written by a keypoints eval")
    if meta["keypoints"] != keypoints:
        raise DiffprobeError(f"{path} was fitted on other keypoints (other embeddings or tokens); evaluate those, or "
                             "leave keypoints.eval.regressor unset to fit one on the train split")
    return tensors["W"].double().numpy(), tensors["mean_landmarks"].double().numpy(), int(meta.get("num_train", 0))


def evaluate(predict: Callable, train: ImageSet | None, test: ImageSet, dataset: str, out_dir: Path,
             fingerprint: dict | None = None, resume: str | None = None, keypoints: str = "",
             regressor: str | Path | None = None) -> dict:
    """Fit the regressor on train (or load `regressor`, fitted earlier on the keypoints whose fingerprint is
    `keypoints`, and leave train unread), report the dataset's metric on test beside the mean-landmarks baseline;
    writes metrics.json, regressor.safetensors, test_predictions.json and test_predictions.png."""
    if regressor is None:
        found_tr, gt_tr, vis_tr = collect(predict, train, "train", out_dir, resume, fingerprint)
        W, mean, num_train = fit_regressor(found_tr, gt_tr, vis_tr), mean_landmarks(gt_tr, vis_tr), len(train)
    else:
        W, mean, num_train = load_regressor(regressor, keypoints)
        landmarks = test.items[0].keypoints if len(test) else None
        if landmarks is not None and len(landmarks) != len(mean):
            raise DiffprobeError(f"{regressor} predicts {len(mean)} landmarks and this dataset has {len(landmarks)}: it "
                                 "was fitted on another dataset")
    found_te, gt_te, vis_te = collect(predict, test, "test", out_dir, resume, fingerprint)
    pred = apply_regressor(W, found_te)
    res = landmark_metric(dataset, pred, gt_te, vis_te)
    base = landmark_metric(dataset, np.broadcast_to(mean, gt_te.shape), gt_te, vis_te)
    metrics = {k: v for k, v in res.items() if k != "per_image"}
    metrics.update({f"baseline_mean_landmarks_{k}": v for k, v in base.items() if k != "per_image"})
    metrics.update(dataset=dataset, num_train=num_train, num_test=len(test), num_keypoints=int(found_te.shape[1]),
                   regressor=str(Path(regressor).resolve()) if regressor is not None else None)
    save_tensors(out_dir / "regressor.safetensors", {"W": torch.tensor(W), "mean_landmarks": torch.tensor(mean)},
                 metadata={"keypoints": keypoints, "num_train": str(num_train)})
    write_test_predictions(out_dir, test, found_te, pred, gt_te, vis_te, res["per_image"])
    save_json(out_dir / "metrics.json", metrics)
    return metrics
