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

from diffprobe.config import section
from diffprobe.data.images import size_of
from diffprobe.heads.diffseg.head import DiffSegHead, DiffSegSettings, WordMapsHead, default_tau
from diffprobe.heads.diffseg.semantics import vote_words
from diffprobe.tasks.diffseg_outputs import label_dtype, write_outputs
from diffprobe.tasks.image_runs import Job, run_job


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
        heads.append(WordMapsHead(words, bb.word_positions(", ".join(words), words), settings, size))
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


def job(cfg: DictConfig, bb) -> Job:
    """The DiffSeg head (and the word-maps head with labels) and the writer of an image's files."""
    settings = settings_of(cfg)
    heads = heads_for(bb, settings)
    return Job(heads, lambda res, path, image, target: write_segmentation(res, heads, settings, path, image, target))


def run(cfg: DictConfig, out_dir: Path) -> dict:
    return run_job(cfg, out_dir, "diffseg")
