"""task=keypoints: unsupervised keypoints (StableKeypoints). See docs/keypoints.md.

mode=fit data=PATH      learn embeddings on a folder (or data=celeba / data=cub); writes keypoints.safetensors
                        + keypoints.json, checkpoint.*, loss_curve.png (+ .json), preview/<image>/overlay.png
mode=predict embeddings=RUN/keypoints.safetensors image=PATH
                        per image <stem>/keypoints.json (pixels of the original image) and <stem>/overlay.png
mode=eval embeddings=... data=celeba|cub data.root=PATH
                        linear regression to the landmarks on the train split, error on the test split: metrics.json
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from diffprobe.config import load_configured_backbone, run_config, typed
from diffprobe.data.images import check_resize, list_images
from diffprobe.errors import DiffprobeError
from diffprobe.heads.keypoints.affine import AffineRange
from diffprobe.heads.keypoints.fit import FitConfig, fit
from diffprobe.heads.keypoints.image_sets import ImageSet, LandmarkItem
from diffprobe.heads.keypoints.maps import MapSpec, resolve_sites, site_summary
from diffprobe.heads.keypoints.predict import PredictConfig, predict_image
from diffprobe.heads.keypoints.state import KeypointModel, load_model, save_model
from diffprobe.hooks import ProbeRegistry
from diffprobe.io import save_json
from diffprobe.tasks.keypoints_data import split_items
from diffprobe.tasks.keypoints_eval import evaluate
from diffprobe.tasks.keypoints_outputs import save_loss_curve, write_prediction

log = logging.getLogger(__name__)
MODES = ("fit", "predict", "eval")


@dataclass
class KeypointsTaskConfig:
    """The flat user keys of conf/task/keypoints.yaml; the head's settings default to the head's own."""

    mode: str = "fit"
    embeddings: str | None = None
    resume: str | None = None
    num_tokens: int = FitConfig.num_tokens
    top_k: int = FitConfig.top_k
    candidates: int = FitConfig.candidates
    steps: int = FitConfig.steps
    batch_size: int = FitConfig.batch_size
    lr: float = FitConfig.lr
    sigma: float = FitConfig.sigma
    localisation_weight: float = FitConfig.localisation_weight
    equivariance_weight: float = FitConfig.equivariance_weight
    masked_equivariance: bool = FitConfig.masked_equivariance
    degrees: float = AffineRange.degrees
    scale: list[float] = field(default_factory=lambda: list(AffineRange.scale))
    translate: float = AffineRange.translate
    num_indices: int = FitConfig.num_indices
    checkpoint_every: int = FitConfig.checkpoint_every
    sites: list[str] | None = None
    feature_upsample_res: int = 128
    timestep: int = 0
    add_noise: bool = True
    image_size: int | None = None
    crop: str | None = None  # null: the dataset's protocol (data.crop: celeba none, cub/folders center)
    resize: str = "bilinear"
    augmentations: int = PredictConfig.augmentations
    predict_batch: int = PredictConfig.batch_size
    readout: str = PredictConfig.readout
    soft_radius: float = PredictConfig.soft_radius
    preview: int = 4
    eval_train: int | None = None
    eval_test: int | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise DiffprobeError(f"keypoints mode must be one of {MODES}, got {self.mode!r}")
        if self.crop not in (None, "center", "none"):
            raise DiffprobeError(f"crop must be center or none, not {self.crop!r}")
        check_resize(self.resize)
        if len(self.scale) != 2:
            raise DiffprobeError(f"scale is a [low, high] range, got {self.scale}")
        if self.feature_upsample_res < 1 or (self.image_size is not None and self.image_size < 8):
            raise DiffprobeError("feature_upsample_res must be >= 1 and image_size >= 8")
        if self.mode != "fit" and not self.embeddings:
            raise DiffprobeError(f"mode={self.mode} needs embeddings=PATH (keypoints.safetensors written by mode=fit)")

    @property
    def affine(self) -> AffineRange:
        return AffineRange(self.degrees, (float(self.scale[0]), float(self.scale[1])), self.translate)

    def fit_config(self, seed: int) -> FitConfig:
        return FitConfig(self.num_tokens, self.top_k, self.candidates, self.steps, self.batch_size, self.lr,
                         self.sigma, self.localisation_weight, self.equivariance_weight, self.masked_equivariance,
                         self.affine, self.num_indices, self.batch_size, self.checkpoint_every, seed)

    def predict_config(self, seed: int) -> PredictConfig:
        return PredictConfig(self.augmentations, self.affine, self.predict_batch, self.readout, self.soft_radius, seed)


@dataclass
class Context:
    """What every mode needs: the backbone, its registry, the map settings and the image geometry."""

    bb: object
    probe: ProbeRegistry
    spec: MapSpec
    image_size: int
    crop: str
    resize: str

    def images(self, items: list[LandmarkItem]) -> ImageSet:
        return ImageSet(items, self.image_size, self.crop, self.resize)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    params = typed(cfg, KeypointsTaskConfig, "keypoints")
    params.validate()
    seed = run_config(cfg).seed
    predict_cfg = params.predict_config(seed)
    if params.mode == "fit":
        fit_cfg = params.fit_config(seed)
        items = split_items(cfg.get("data"), "fit")
        ctx = _context(cfg, params, None)
        return run_fit(ctx, fit_cfg, predict_cfg, items, out_dir, params.resume, params.preview, cfg)
    model = load_model(params.embeddings)
    ctx = _context(cfg, params, model)
    if params.mode == "predict":
        if not cfg.get("image"):
            raise DiffprobeError("mode=predict needs image=PATH (a file or a folder of images)")
        return run_predict(ctx, model, predict_cfg, list_images(cfg.image), out_dir)
    train = split_items(cfg.get("data"), "train")[: params.eval_train]
    test = split_items(cfg.get("data"), "test")[: params.eval_test]
    metrics = evaluate(lambda item_set, i: _predict_item(ctx, model, predict_cfg, item_set, i),
                       ctx.images(train), ctx.images(test), cfg.data.name, out_dir, resume=params.resume)
    return metrics


def _context(cfg: DictConfig, params: KeypointsTaskConfig, model: KeypointModel | None) -> Context:
    torch.manual_seed(run_config(cfg).seed)
    bb = load_configured_backbone(cfg)
    probe = ProbeRegistry(bb.unet)
    if model is None:
        spec = MapSpec(tuple(resolve_sites(probe, params.sites)), params.feature_upsample_res, params.timestep,
                       params.add_noise)
        data_crop = cfg.data.get("crop") if cfg.get("data") is not None else None
        return Context(bb, probe, spec, params.image_size or bb.sample_size, params.crop or data_crop or "center",
                       params.resize)
    spec = MapSpec.from_dict(model.config.get("maps", {}))
    missing = [s for s in spec.sites if s not in probe.sites]
    if missing:
        raise DiffprobeError(f"these keypoints were fit on another model (site {missing[0]} does not exist here)")
    return Context(bb, probe, spec, int(model.config.get("image_size", bb.sample_size)),
                   str(model.config.get("crop", "center")), str(model.config.get("resize", "bicubic")))


def _predict_item(ctx: Context, model: KeypointModel, cfg: PredictConfig, images: ImageSet, i: int):
    """(points (K, 2) in processed pixels, confidence (K,), Frame, original size) of item i."""
    tensor, frame, size = images.load(i)
    pred = predict_image(ctx.bb, ctx.probe, ctx.spec, model, tensor, cfg)
    return pred.points.numpy(), pred.confidence.numpy(), frame, size


def run_fit(ctx: Context, fit_cfg: FitConfig, predict_cfg: PredictConfig, items: list[LandmarkItem],
            out_dir: Path, resume: str | None, preview: int, cfg: DictConfig) -> dict:
    images = ctx.images(items)
    log.info("fitting %d keypoint embeddings on %d images", fit_cfg.num_tokens, len(images))
    extra = {"model": str(cfg.model.get("name")), "context_dim": ctx.bb.context_dim,
             "sites": site_summary(ctx.probe, list(ctx.spec.sites)), "num_images": len(images)}
    result = fit(ctx.bb, ctx.probe, ctx.spec, fit_cfg, images, out_dir=out_dir, resume=resume, extra_config=extra,
                 on_checkpoint=lambda history: save_loss_curve(out_dir / "loss_curve.png", history))
    path = save_model(out_dir / "keypoints", result.model)
    save_loss_curve(out_dir / "loss_curve.png", result.history)
    shown = ctx.images(items[:preview])
    for i in range(len(shown)):
        _write_item(ctx, result.model, predict_cfg, shown, i, out_dir / "preview")
    summary = {"embeddings": str(path), "indices": result.model.indices.tolist(), "counts": result.model.counts,
               "final_loss": result.history[-1]["loss"] if result.history else None, "steps": fit_cfg.steps}
    save_json(out_dir / "summary.json", summary)
    return summary


def _write_item(ctx: Context, model: KeypointModel, cfg: PredictConfig, images: ImageSet, i: int, root: Path) -> dict:
    from diffprobe.data.images import load_image

    points, conf, frame, _ = _predict_item(ctx, model, cfg, images, i)
    path = images.items[i].path
    extra = {"processed": {"size": ctx.image_size, "crop": ctx.crop, "points": points.tolist()},
             "readout": cfg.readout, "augmentations": cfg.augmentations}
    return write_prediction(root / path.stem, path, load_image(path), frame.to_original(points), conf, extra)


def run_predict(ctx: Context, model: KeypointModel, cfg: PredictConfig, files: list[Path], out_dir: Path) -> dict:
    images = ctx.images([LandmarkItem(p) for p in files])
    summary = {}
    for i in tqdm(range(len(images)), desc="keypoints", disable=len(images) < 2):
        record = _write_item(ctx, model, cfg, images, i, out_dir)
        summary[str(files[i])] = {"dir": str(out_dir / files[i].stem), "points": record["points"]}
    save_json(out_dir / "summary.json", summary)
    return summary
