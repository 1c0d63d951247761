"""task=diffseg: zero-shot segmentation of an image (or a folder of images) from self-attention.

Writes per image, in out_dir/<image stem>/: labels.png (integer label per pixel, original size;
pixels outside the analysed centre square hold 255, or 65535 with more than 255 labels),
overlay.png, segments.json (per-segment area, bbox, centroid, word) and figure.png.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from diffprobe.config import load_configured_backbone, run_config, typed
from diffprobe.data.images import center_square, image_to_tensor, load_image
from diffprobe.data.inputs import input_images
from diffprobe.errors import DiffprobeError
from diffprobe.heads.diffseg.semantics import vote_words
from diffprobe.io import save_json
from diffprobe.tasks.diffseg_outputs import label_dtype, write_outputs
from diffprobe.tasks.diffseg_pipeline import DiffSegPipeline, DiffSegSettings, default_tau, head_params


@dataclass
class DiffSegTaskConfig(DiffSegSettings):
    crop: str = "center"  # center: segment the centre square (reference); none: the whole image, squashed
    labels: list[str] | None = field(default=None)  # words to name the segments with (cross-attention vote)


def analysed_box(width: int, height: int, crop: str) -> tuple[int, int, int, int]:
    """(left, top, box width, box height) of the part of the image that is segmented."""
    if crop == "center":
        left, top, side = center_square(width, height)
        return left, top, side, side
    return 0, 0, width, height


def segment_file(pipeline: DiffSegPipeline, path: Path, out_dir: Path, cfg: DiffSegTaskConfig) -> dict:
    image = load_image(path)
    left, top, bw, bh = analysed_box(image.width, image.height, cfg.crop)
    x = image_to_tensor(image.crop((left, top, left + bw, top + bh)), pipeline.size, crop="none", resize=cfg.resize)
    result = pipeline.segment(x, (bh, bw))
    k = result.num_segments
    dtype, outside = label_dtype(k)
    labels = np.full((image.height, image.width), outside, dtype=dtype)
    labels[top:top + bh, left:left + bw] = result.labels.numpy()
    words = None
    if cfg.labels:
        votes = vote_words(result.labels, pipeline.word_maps(x, list(cfg.labels), (bh, bw)))
        words = [cfg.labels[v] for v in votes]
    info = {"image": str(path), "size": [image.height, image.width], "analysed_box": [left, top, bw, bh],
            "proposal_counts": result.counts, "settings": asdict(cfg)}
    return write_outputs(out_dir, path.name, image, labels, k, info, words)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    params = typed(cfg, DiffSegTaskConfig, "diffseg")
    run_cfg = run_config(cfg)
    if params.crop not in ("center", "none"):
        raise DiffprobeError(f"crop must be center or none, not {params.crop!r}")
    if params.tau is None:
        params.tau = default_tau(cfg.model)
    files = input_images(cfg.get("image"), out_dir)
    head_params(params)  # fail on bad head keys before loading a model
    pipeline = DiffSegPipeline(load_configured_backbone(cfg), params, seed=run_cfg.seed)
    summary = {}
    for path in tqdm(files, desc="diffseg", disable=len(files) < 2):
        record = segment_file(pipeline, path, out_dir / path.stem, params)
        summary[str(path)] = {"dir": str(out_dir / path.stem), "num_segments": record["num_segments"]}
    save_json(out_dir / "summary.json", summary)
    return summary
