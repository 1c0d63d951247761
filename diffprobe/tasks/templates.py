"""task=templates: pose templates over keypoint sets (seed 003). See docs/templates.md.

Sets come from the world (with pose labels), a dataset's annotations (data=celeba|cub) or a keypoints
predict run. Writes templates.safetensors + templates.json (the templates in the unit box, their
frequencies), templates.png (one skeleton per template), assignments.json (per set: template, robust fit,
residuals, outliers) and metrics.json (inertia, fit quality, and purity / adjusted Rand index against the
pose labels when the sets have them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from diffprobe.config import run_config, section
from diffprobe.errors import DiffprobeError
from diffprobe.eval.clustering import adjusted_rand_index, purity
from diffprobe.eval.landmarks import mse_height_normalised
from diffprobe.eval.pck import pck, threshold_box_diagonal
from diffprobe.heads.templates import fit_templates, fit_to_templates, normalise
from diffprobe.heads.templates.figures import template_figure
from diffprobe.io import load_tensors, save_figure, save_json, save_tensors

log = logging.getLogger(__name__)
SOURCES = ("world", "data", "predictions")


@dataclass
class TemplateSettings:
    LIMITS: ClassVar[dict] = {"n": "1..1000000", "k": ">= 1", "restarts": "1..1000"}

    source: str = "world"
    category: str = "face"
    n: int = 500
    split: str = "train"
    closeup: bool = True
    predictions: str | None = None
    k: int = 14
    restarts: int = 4
    fit_to: str | None = None


@dataclass
class KeypointSets:
    """points (N, K, 2) pixels, visible (N, K), ids (N,), image heights (N,), boxes (N, 4) of the visible
    points, names of the K keypoints, edges to draw, and pose labels (N,) when known."""

    points: np.ndarray
    visible: np.ndarray
    ids: list[str]
    heights: np.ndarray
    names: list[str]
    edges: tuple
    labels: list[str] | None = None


def pose_label(pose: dict) -> str:
    """A world figure's pose class: mirrored or not, and its rotation in three bins (left, upright, right)."""
    angle = pose["angle"]
    turn = "left" if angle < -0.1 else ("right" if angle > 0.1 else "upright")
    return f"{'mirrored' if pose['flipped'] else 'facing'}-{turn}"


def world_sets(s: TemplateSettings, seed: int) -> KeypointSets:
    from diffprobe.data.world import render_scene, scene_seed
    from diffprobe.data.world.vocab import KEYPOINTS, SKELETONS

    if s.category not in KEYPOINTS:
        raise DiffprobeError(f"templates.category must be one of {', '.join(KEYPOINTS)}, not {s.category!r}")
    scenes = [render_scene(scene_seed(s.split, i, seed), 64, first=s.category, closeup=s.closeup) for i in range(s.n)]
    kps = np.stack([sc.objects[0].keypoints for sc in scenes])
    return KeypointSets(kps[..., :2], kps[..., 2] > 0, [f"{s.split}_{i:05d}" for i in range(s.n)],
                        np.full(s.n, 64.0), list(KEYPOINTS[s.category]), SKELETONS[s.category],
                        [pose_label(sc.objects[0].pose) for sc in scenes])


def data_sets(cfg: DictConfig) -> KeypointSets:
    from diffprobe.data.world.vocab import SKELETONS
    from diffprobe.tasks.keypoints_data import split_items

    items = split_items(cfg.get("data"), "train")
    if not items or items[0].keypoints is None:
        raise DiffprobeError("source=data needs a dataset with keypoints: data=celeba or data=cub with data.root=")
    name = cfg.data.name
    from PIL import Image

    heights = []
    for item in items:
        with Image.open(item.path) as img:
            heights.append(img.height)
    pts = np.stack([it.keypoints for it in items])
    vis = np.stack([np.ones(len(it.keypoints), bool) if it.visible is None else np.asarray(it.visible, bool)
                    for it in items])
    from diffprobe.data.cub import DEFAULT_PART_NAMES
    from diffprobe.data.celeba import LANDMARK_NAMES

    names = list(LANDMARK_NAMES if name == "celeba" else DEFAULT_PART_NAMES)
    return KeypointSets(pts, vis, [str(it.path) for it in items], np.asarray(heights, float), names,
                        SKELETONS["face" if name == "celeba" else "bird"])


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DiffprobeError(f"{path} is not readable JSON ({exc}): {what}") from None


def _points(rec: dict, path: Path) -> tuple[list[list[float]], float]:
    """(K x [x, y], image height) of one keypoints.json: points as {"x", "y"} records or [x, y] pairs, all finite."""
    pts = rec.get("points") if isinstance(rec, dict) else None
    size = rec.get("size") if isinstance(rec, dict) else None
    try:
        xy = [[float(p["x"]), float(p["y"])] if isinstance(p, dict) else [float(p[0]), float(p[1])] for p in pts]
        height = float(size["height"] if isinstance(size, dict) else size[0])
    except (TypeError, KeyError, IndexError, ValueError):
        raise DiffprobeError(f"{path} does not hold keypoints as task=keypoints writes them (points: a list of "
                             "{x, y} or [x, y]; size: {width, height})") from None
    if not xy or not np.isfinite(xy).all() or not np.isfinite(height) or height <= 0:
        raise DiffprobeError(f"{path} holds no points, or points or a size that are not finite numbers")
    return xy, height


def prediction_sets(folder: str) -> KeypointSets:
    """The keypoint sets of a task=keypoints mode=predict run folder (each image's keypoints.json, found through
    summary.json; folders are relative to the run, so a moved run still reads). Everything is checked before any
    output is written."""
    root = Path(folder)
    path = root / "summary.json"
    if not path.is_file():
        raise DiffprobeError(f"source=predictions needs the folder of a task=keypoints mode=predict run (no {path})")
    summary = _read_json(path, "templates.predictions must be a task=keypoints mode=predict run folder")
    records = summary.get("images") if isinstance(summary, dict) else None
    if not isinstance(records, dict) or summary.get("task", "keypoints") != "keypoints":
        raise DiffprobeError(f"{path} is not the summary of a task=keypoints mode=predict run")
    pts, ids, heights = [], [], []
    for image, record in records.items():
        folder_name = Path(str(record.get("dir", ""))) if isinstance(record, dict) else Path()
        where = root / folder_name if not folder_name.is_absolute() else folder_name
        if not (where / "keypoints.json").is_file():  # runs of earlier releases stored absolute folders
            where = root / folder_name.name
        kp_path = where / "keypoints.json"
        if not kp_path.is_file():
            raise DiffprobeError(f"{root} is not a task=keypoints mode=predict run: no keypoints.json for {image} "
                                 f"(looked in {where})")
        xy, height = _points(_read_json(kp_path, "a keypoints file"), kp_path)
        pts.append(xy)
        ids.append(image)
        heights.append(height)
    if not pts:
        raise DiffprobeError(f"{path} lists no images with keypoints: nothing to build templates from")
    if len({len(p) for p in pts}) > 1:
        raise DiffprobeError(f"the predictions in {folder} have different numbers of keypoints per image")
    pts = np.asarray(pts, float)
    return KeypointSets(pts, np.ones(pts.shape[:2], bool), ids, np.asarray(heights, float),
                        [f"keypoint {i}" for i in range(pts.shape[1])], ())


def load_sets(cfg: DictConfig, s: TemplateSettings, seed: int) -> KeypointSets:
    if s.source == "world":
        return world_sets(s, seed)
    if s.source == "data":
        return data_sets(cfg)
    if s.source == "predictions":
        if not s.predictions:
            raise DiffprobeError("source=predictions needs templates.predictions=RUN_FOLDER")
        return prediction_sets(s.predictions)
    raise AssertionError(s.source)  # settings_of checked it


def settings_of(cfg: DictConfig) -> TemplateSettings:
    """The templates.* keys, validated."""
    s = section(cfg, "templates", TemplateSettings)
    if s.source not in SOURCES:
        raise DiffprobeError(f"templates.source must be one of {', '.join(SOURCES)}, not {s.source!r}")
    return s


def run(cfg: DictConfig, out_dir: Path) -> dict:
    s = settings_of(cfg)
    seed = run_config(cfg).seed
    sets = load_sets(cfg, s, seed)
    norm = normalise(sets.points, sets.visible)
    if s.fit_to:
        tensors, _ = load_tensors(s.fit_to)
        if "templates" not in tensors or "frequency" not in tensors:
            raise DiffprobeError(f"templates.fit_to={s.fit_to} is not a templates.safetensors of task=templates")
        templates, frequency = tensors["templates"].double().numpy(), tensors["frequency"].double().numpy()
        assignment = None
    else:
        result = fit_templates(norm, k=s.k, seed=seed, restarts=s.restarts)
        templates, frequency, assignment = result.points, result.frequency, result.assignment
        save_tensors(out_dir / "templates.safetensors", {"templates": torch.from_numpy(templates).float(),
                                                         "frequency": torch.from_numpy(frequency).float()},
                     metadata={"format": "diffprobe.templates/1", "keypoints": json.dumps(sets.names)})
        save_json(out_dir / "templates.json", {"templates": templates.round(4), "frequency": frequency.round(4),
                                               "keypoints": sets.names, "k": s.k, "sets": len(sets.ids),
                                               "usable_sets": int(norm.usable.sum()), "inertia": result.inertia})
        save_figure(out_dir / "templates.png", template_figure(templates, frequency, sets.edges))
    usable = np.flatnonzero(norm.usable)
    fit = fit_to_templates(templates, sets.points[usable], sets.visible[usable])
    rows = [{"id": sets.ids[i], "template": int(fit.template[j]), "scale": fit.scale[j].round(4),
             "offset": fit.offset[j].round(3), "rms": round(float(fit.rms[j]), 4),
             "residual": [None if np.isnan(r) else round(float(r), 3) for r in fit.residual[j]],
             "outlier": fit.outlier[j], "label": None if sets.labels is None else sets.labels[i]}
            for j, i in enumerate(usable)]
    save_json(out_dir / "assignments.json", rows)
    good = sets.visible[usable] & ~fit.outlier
    boxes = np.stack([np.r_[p[v].min(0), p[v].max(0)] for p, v in zip(sets.points[usable], sets.visible[usable])])
    metrics = {"sets": len(sets.ids), "usable_sets": int(len(usable)), "templates": int(len(templates)),
               "outlier_rate": float(fit.outlier.sum() / max(sets.visible[usable].sum(), 1)),
               **{k: v for k, v in pck(fit.fitted, sets.points[usable], threshold_box_diagonal(boxes, 0.2),
                                       visible=good).summary().items() if k.startswith("pck@")},
               **mse_height_normalised(fit.fitted, sets.points[usable], sets.heights[usable], visible=good)}
    if sets.labels is not None:
        labels = [sets.labels[i] for i in usable]
        clusters = fit.template if assignment is None else assignment[usable]
        metrics.update(purity=purity(labels, clusters), adjusted_rand_index=adjusted_rand_index(labels, clusters),
                       pose_classes=len(set(labels)))
    save_json(out_dir / "metrics.json", metrics)
    log.info("templates: %s", metrics)
    return metrics
