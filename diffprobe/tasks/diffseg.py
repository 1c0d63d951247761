"""task=diffseg: zero-shot segmentation of an image (or a folder of images) from self-attention.

Writes per image, in out_dir/<image stem>/: labels.png (integer label per pixel, original size;
pixels outside the analysed centre square hold 255, or 65535 with more than 255 labels),
overlay.png, segments.json (per-segment area, bbox, centroid, word) and figure.png.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from diffprobe.config import load_configured_backbone, run_config, run_fingerprint, section
from diffprobe.data.images import size_of
from diffprobe.data.inputs import input_images
from diffprobe.heads.diffseg.head import DiffSegHead, DiffSegSettings, WordMapsHead, default_tau, token_groups
from diffprobe.heads.diffseg.semantics import vote_words
from diffprobe.tasks.diffseg_outputs import label_dtype, write_outputs
from diffprobe.tasks.image_runs import process_with_heads


@dataclass
class DiffSegTaskSettings(DiffSegSettings):
    labels: list[str] | None = None  # words to name the segments with (cross-attention vote)


def settings_of(cfg: DictConfig, dataset_tau: float | None = None) -> DiffSegTaskSettings:
    """The diffseg.* keys, tau resolved (the model's, else the dataset's, else 0.9) and the attention levels
    (the model's model.attention_divisors, else all), validated."""
    settings = section(cfg, "diffseg", DiffSegTaskSettings, model_defaults={"divisors": "attention_divisors"})
    if settings.tau is None:
        settings.tau = default_tau(cfg.model, dataset_tau)
    settings.params()  # fail on bad head keys before loading a model
    return settings


def heads_for(bb, settings: DiffSegTaskSettings) -> list:
    """The DiffSeg head, and the word-maps head when labels are given (their pass is shared)."""
    size = bb.check_image_size(settings.image_size)
    heads = [DiffSegHead(settings, size)]
    if settings.labels:
        words = list(settings.labels)
        heads.append(WordMapsHead(words, token_groups(bb.tokenizer, ", ".join(words), words), settings, size))
    return heads


def write_segmentation(results: list, heads: list, settings: DiffSegTaskSettings, path: Path, image,
                       target: Path) -> dict:
    """The files of one image, in its folder `target`, from the heads' results (segmentation, and word maps when
    labels are given)."""
    result = results[0]
    left, top, bw, bh = heads[0].box(image)
    k = result.num_segments
    dtype, outside = label_dtype(k)
    labels = np.full((image.height, image.width), outside, dtype=dtype)
    labels[top:top + bh, left:left + bw] = result.labels.numpy()
    words = None
    if settings.labels:
        words = [settings.labels[v] for v in vote_words(result.labels, results[1])]
    info = {"image": str(path), "size": size_of(image), "analysed_box": [left, top, bw, bh],
            "proposal_counts": result.counts, "settings": asdict(settings)}
    record = write_outputs(target, path.name, image, labels, k, info, words)
    return {"num_segments": record["num_segments"]}


def run(cfg: DictConfig, out_dir: Path) -> dict:
    settings = settings_of(cfg)
    seed = run_config(cfg).seed
    files = input_images(cfg.get("image"), out_dir)
    bb = load_configured_backbone(cfg)
    heads = heads_for(bb, settings)
    return process_with_heads(bb, heads, lambda res, path, image, target: write_segmentation(res, heads, settings,
                                                                                            path, image, target),
                              files, out_dir, "diffseg", seed, run_fingerprint(cfg))
