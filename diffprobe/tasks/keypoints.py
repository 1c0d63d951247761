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
from dataclasses import asdict, dataclass, field
from typing import ClassVar
from pathlib import Path

import torch
from omegaconf import DictConfig

from diffprobe.config import keys_of, load_configured_backbone, run_config, section
from diffprobe.data.images import load_image
from diffprobe.errors import DiffprobeError
from diffprobe.heads.call import CROPS
from diffprobe.heads.keypoints.affine import AffineRange
from diffprobe.training.keypoints import FitSettings, fit
from diffprobe.heads.keypoints.image_sets import ImageSet, LandmarkItem
from diffprobe.heads.keypoints.maps import MapSettings, check_width, resolve_sites, site_summary
from diffprobe.heads.keypoints.predict import KeypointPredictHead, PredictSettings, Prediction
from diffprobe.heads.keypoints.state import KeypointModel, load_model, save_model
from diffprobe.data.images import check_resize
from diffprobe.io import save_json
from diffprobe.runfolder import image_folders
from diffprobe.tasks.keypoints_data import split_items
from diffprobe.tasks.keypoints_eval import evaluate
from diffprobe.tasks.keypoints_outputs import save_loss_curve, write_prediction
from diffprobe.tasks.image_runs import Job, run_job
from diffprobe.runner import Item, run_heads

log = logging.getLogger(__name__)
MODES = ("fit", "predict", "eval")


# keypoints.affine, keypoints.fit and keypoints.predict: the head's settings classes as written there (the task sets
# the seed, and the affine range once for both); LIMITS add the bounds those classes do not check themselves
AFFINE_KEYS = keys_of(AffineRange, limits={"degrees": "0..180", "translate": "0..1", "scale": "<= 10"})
FIT_KEYS = keys_of(FitSettings, exclude=("affine", "seed"),
                  limits={"num_tokens": "<= 100000", "candidates": "<= 100000", "batch_size": "<= 4096",
                          "iterations_per_call": "<= 4096", "select_batch": "<= 4096", "localisation_weight": ">= 0",
                          "equivariance_weight": ">= 0"})
PREDICT_KEYS = keys_of(PredictSettings, exclude=("affine", "seed"),
                      limits={"augmentations": "<= 1000", "batch_size": "<= 4096", "soft_radius": "> 0"})


@dataclass
class KeypointsEvalSettings:
    LIMITS: ClassVar[dict] = {"train": ">= 1", "test": ">= 1"}

    train: int | None = None
    test: int | None = None
    regressor: str | None = None


@dataclass
class KeypointsSettings:
    """The keypoints.* keys (conf/head/keypoints.yaml, conf/task/keypoints.yaml)."""

    LIMITS: ClassVar[dict] = {"preview": "0..1000", "upsample_queries": "1..4096",
                              "image_size": "8..16384"}

    mode: str = "fit"
    embeddings: str | None = None
    resume: str | None = None
    preview: int = 4
    sites: list[str] | None = None
    upsample_queries: int = 128
    timestep: int = 0
    noise: bool = True
    image_size: int | None = None
    crop: str | None = None  # null: the dataset's protocol (data.crop: celeba none, cub/folders center)
    resize: str = "bilinear"
    fit: FIT_KEYS = field(default_factory=FIT_KEYS)
    affine: AFFINE_KEYS = field(default_factory=AFFINE_KEYS)
    predict: PREDICT_KEYS = field(default_factory=PREDICT_KEYS)
    eval: KeypointsEvalSettings = field(default_factory=KeypointsEvalSettings)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise DiffprobeError(f"keypoints mode must be one of {MODES}, got {self.mode!r}")
        if self.crop not in (None, *CROPS):
            raise DiffprobeError(f"crop must be center or none, not {self.crop!r}")
        check_resize(self.resize)
        if len(self.affine.scale) != 2:
            raise DiffprobeError(f"keypoints.affine.scale is a [low, high] range, got {self.affine.scale}")
        if self.upsample_queries < 1 or (self.image_size is not None and self.image_size < 8):
            raise DiffprobeError("upsample_queries must be >= 1 and image_size >= 8")
        if self.mode != "fit" and not self.embeddings:
            raise DiffprobeError(f"mode={self.mode} needs embeddings=PATH (keypoints.safetensors written by mode=fit)")

    @property
    def affine_range(self) -> AffineRange:
        a = self.affine
        return AffineRange(a.degrees, (float(a.scale[0]), float(a.scale[1])), a.translate)

    def fit_config(self, seed: int) -> FitSettings:
        return FitSettings(**asdict(self.fit), affine=self.affine_range, seed=seed)

    def predict_config(self, seed: int) -> PredictSettings:
        return PredictSettings(affine=self.affine_range, seed=seed, **asdict(self.predict))


@dataclass
class Context:
    """What every mode needs: the backbone, the map settings and the image geometry."""

    bb: object
    spec: MapSettings
    image_size: int
    crop: str
    resize: str

    def images(self, items: list[LandmarkItem]) -> ImageSet:
        return ImageSet(items, self.image_size, self.crop, self.resize)


def settings_of(cfg: DictConfig) -> KeypointsSettings:
    """The keypoints.* keys, sites resolved (the model's model.keypoints_sites when null), validated."""
    params = section(cfg, "keypoints", KeypointsSettings, model_defaults={"sites": "keypoints_sites"})
    params.validate()
    params.fit_config(0), params.predict_config(0)  # the head's own checks (top_k <= candidates <= num_tokens, ...)
    return params


def run(cfg: DictConfig, out_dir: Path) -> dict:
    params = settings_of(cfg)
    if params.mode == "predict":
        return run_job(cfg, out_dir, "keypoints")
    seed = run_config(cfg).seed
    torch.manual_seed(seed)
    bb = load_configured_backbone(cfg)
    if params.mode == "fit":
        items = split_items(cfg.get("data"), "fit")
        ctx = _context(cfg, params, bb, None)
        return run_fit(ctx, params.fit_config(seed), params.predict_config(seed), items, out_dir, params.resume,
                       params.preview, cfg)
    model = load_model(params.embeddings)
    ctx = _context(cfg, params, bb, model)
    head = _head(ctx, model, params, seed)
    regressor = params.eval.regressor
    train = None if regressor else ctx.images(split_items(cfg.get("data"), "train")[: params.eval.train])
    test = split_items(cfg.get("data"), "test")[: params.eval.test]
    fingerprint = {"embeddings": str(Path(params.embeddings).resolve()), "data": dict(cfg.data),
                   "predict": asdict(params.predict), "affine": asdict(params.affine), "seed": seed,
                   **({"regressor": str(Path(regressor).resolve())} if regressor else {})}
    return evaluate(lambda item_set, i: _predict_item(ctx, head, item_set, i), train, ctx.images(test),
                    cfg.data.name, out_dir, fingerprint, resume=params.resume, keypoints=model.fingerprint(),
                    regressor=regressor)


def job(cfg: DictConfig, bb) -> Job:
    """Keypoints of each image with given embeddings (mode=predict, and task=analyze): the prediction head; its
    files are keypoints.json and overlay.png."""
    params = settings_of(cfg)
    if not params.embeddings:
        raise DiffprobeError("keypoints prediction needs keypoints.embeddings=PATH (keypoints.safetensors written "
                             "by mode=fit)")
    model = load_model(params.embeddings)
    ctx = _context(cfg, params, bb, model)
    head = _head(ctx, model, params, run_config(cfg).seed)

    def write(results: list, path: Path, image, target: Path) -> dict:
        return {"points": _write_prediction(ctx, head, results[0], path, image, target)["points"]}

    return Job([head], write)


def _head(ctx: Context, model: KeypointModel, params: KeypointsSettings, seed: int) -> KeypointPredictHead:
    return KeypointPredictHead(ctx.spec, model, params.predict_config(seed), ctx.image_size, ctx.crop, ctx.resize)


def _context(cfg: DictConfig, params: KeypointsSettings, bb, model: KeypointModel | None) -> Context:
    sites = bb.probe.sites
    if model is None:
        spec = MapSettings(tuple(resolve_sites(sites, params.sites)), params.upsample_queries, params.timestep, params.noise)
        data_crop = cfg.data.get("crop") if cfg.get("data") is not None else None
        size = bb.check_image_size(params.image_size)
        return Context(bb, spec, size, params.crop or data_crop or "center", params.resize)
    spec = MapSettings.from_dict(model.config.get("maps", {}))
    missing = [s for s in spec.sites if s not in sites]
    if missing:
        raise DiffprobeError(f"these keypoints were fit on another model (site {missing[0]} does not exist here)")
    check_width(bb, model.embeddings)
    return Context(bb, spec, int(model.config.get("image_size", bb.sample_size)),
                   str(model.config.get("crop", "center")), str(model.config.get("resize", "bicubic")))


def _predict(ctx: Context, head: KeypointPredictHead, item: LandmarkItem) -> tuple[Prediction, object]:
    """(the prediction, the PIL image) of a dataset item (its crop box applied)."""
    image = load_image(item.path)
    (pred,) = run_heads(ctx.bb, [head], Item(str(item.path), image, {"box": item.box}))
    return pred, image


def _predict_item(ctx: Context, head: KeypointPredictHead, images: ImageSet, i: int):
    """(points (K, 2) in processed pixels, confidence (K,), Frame, original size) of item i."""
    pred, image = _predict(ctx, head, images.items[i])
    return pred.points.numpy(), pred.confidence.numpy(), pred.frame, image.size


def _write_prediction(ctx: Context, head: KeypointPredictHead, pred: Prediction, path: Path, image,
                      target: Path) -> dict:
    """An image's keypoints.json and overlay.png in the folder `target`."""
    extra = {"processed": {"size": ctx.image_size, "crop": ctx.crop, "points": pred.points.numpy().tolist()},
             "readout": head.cfg.readout, "augmentations": head.cfg.augmentations}
    return write_prediction(target, path, image, pred.original_points(), pred.confidence.numpy(), extra)


def run_fit(ctx: Context, fit_cfg: FitSettings, predict: PredictSettings, items: list[LandmarkItem],
            out_dir: Path, resume: str | None, preview: int, cfg: DictConfig) -> dict:
    images = ctx.images(items)
    log.info("fitting %d keypoint embeddings on %d images", fit_cfg.num_tokens, len(images))
    extra = {"model": str(cfg.model.get("name")), "context_dim": ctx.bb.context_dim,
             "sites": site_summary(ctx.bb.probe.sites, list(ctx.spec.sites)), "num_images": len(images)}
    result = fit(ctx.bb, ctx.spec, fit_cfg, images, out_dir=out_dir, resume=resume, extra_config=extra,
                 on_checkpoint=lambda history: save_loss_curve(out_dir / "loss_curve.png", history))
    path = save_model(out_dir / "keypoints", result.model)
    save_loss_curve(out_dir / "loss_curve.png", result.history)
    fitted = KeypointPredictHead(ctx.spec, result.model, predict, ctx.image_size, ctx.crop, ctx.resize)
    for item, name in zip(items[:preview], image_folders([it.path for it in items[:preview]])):
        pred, image = _predict(ctx, fitted, item)
        _write_prediction(ctx, fitted, pred, item.path, image, out_dir / "preview" / name)
    summary = {"embeddings": path.name, "indices": result.model.indices.tolist(), "counts": result.model.counts,
               "final_loss": result.history[-1]["loss"] if result.history else None, "steps": fit_cfg.steps}
    save_json(out_dir / "summary.json", summary)
    return summary
