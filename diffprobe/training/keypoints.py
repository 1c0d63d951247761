"""Fit keypoint embeddings (StableKeypoints) and choose the final K tokens by frequency.

One iteration: an image x and a random affine T (out-of-view pixels black); maps of x and T(x) in one
batched UNet call; candidates = the `candidates` tokens whose maps of x are closest (KL) to a Gaussian;
the K tokens spread out by farthest point sampling over their argmax locations in T(x)'s maps; loss =
localisation_weight * localisation(maps of x) + equivariance_weight * equivariance(x, T(x)), both on
the K tokens (the reference: `sharpening_loss(attn_map[top_embedding_indices])` on x's maps).
Gradients accumulate over `batch_size` iterations per Adam step; `iterations_per_call` of them share one
denoiser call (each with its own rows, transform and noise: the same gradients as the reference's loop, in
fewer and larger calls, for more memory).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from diffprobe.errors import DiffprobeError
from diffprobe.heads.keypoints.affine import AffineRange, sample_affine, warp_image
from diffprobe.heads.keypoints.image_sets import ImageSet
from diffprobe.heads.keypoints.losses import equivariance_loss, localisation_loss
from diffprobe.heads.keypoints.maps import KeypointMapsHead, MapSettings, check_width
from diffprobe.heads.keypoints.selection import most_frequent, rank_candidates, spread_tokens
from diffprobe.heads.keypoints.state import KeypointModel
from diffprobe.runner import run_plans
from diffprobe.training.checkpoint import load_checkpoint, save_checkpoint
from diffprobe.training.loop import run_steps

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True)
class FitSettings:
    """Optimisation settings; defaults are the reference code's."""

    num_tokens: int = 500
    top_k: int = 10
    candidates: int = 25
    steps: int = 500
    batch_size: int = 4
    iterations_per_call: int = 1
    lr: float = 5e-3
    sigma: float = 2.0
    localisation_weight: float = 100.0
    equivariance_weight: float = 1000.0
    masked_equivariance: bool = False
    affine: AffineRange = field(default_factory=AffineRange)
    num_indices: int = 100
    select_batch: int = 4
    checkpoint_every: int = 50
    checkpoint_minutes: float = 5.0
    seed: int = 0

    def __post_init__(self):
        for name in ("num_tokens", "top_k", "candidates", "steps", "batch_size", "iterations_per_call", "num_indices",
                     "select_batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise DiffprobeError(f"keypoints {name} must be at least 1, got {getattr(self, name)}")
        if not self.top_k <= self.candidates <= self.num_tokens:
            raise DiffprobeError(f"keypoints needs top_k <= candidates <= num_tokens, got "
                                 f"{self.top_k}, {self.candidates}, {self.num_tokens}")
        if self.lr <= 0 or self.sigma <= 0 or self.checkpoint_minutes <= 0:
            raise DiffprobeError("keypoints lr, sigma and checkpoint_minutes must be positive")


@dataclass
class FitResult:
    model: KeypointModel
    history: list[dict]          # one row per Adam step: step, loss, localisation, equivariance


def _generator(seed: int, *salt: int) -> torch.Generator:
    """A generator for one iteration, so a resumed fit draws the same transforms and noise."""
    return torch.Generator().manual_seed(hash((seed,) + salt) % (2**63))


def initial_embeddings(cfg: FitSettings, dim: int) -> torch.Tensor:
    """Standard-normal start (num_tokens, dim), seeded by cfg.seed."""
    return torch.randn(cfg.num_tokens, dim, generator=_generator(cfg.seed, 0))


def image_order(n: int, iteration: int, seed: int) -> int:
    """Image of iteration i: epochs are seeded permutations of the n images."""
    epoch, pos = divmod(iteration, n)
    return int(torch.randperm(n, generator=_generator(seed, 1, epoch))[pos])


def cpu_hint(bb) -> str:
    """Settings that make a fit on this model CPU-sized: a smaller image only helps an SD-sized model."""
    if bb.sample_size > 256:
        return "For a CPU: keypoints.fit.num_tokens=100 upsample_queries=64 image_size=256 (README, 'On a CPU')."
    return ("For a CPU: keypoints.fit.num_tokens=100 and a smaller upsample_queries (32 on mini); a larger "
            "image_size does not help a small model (docs/keypoints.md).")


def attention_maps(bb, spec: MapSettings, images: torch.Tensor, embeddings: torch.Tensor,
                   generator: torch.Generator | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Maps (B, N, res, res) for images (B, 3, S, S) in [-1, 1], through the runner; only `tokens` (T,) ->
    (B, T, res, res). The softmax is always over all N tokens. Gradients reach `embeddings` when grad mode is on."""
    return maps_in_one_call(bb, spec, [images], embeddings, [generator], tokens)[0]


def maps_in_one_call(bb, spec: MapSettings, batches: list[torch.Tensor], embeddings: torch.Tensor,
                     generators: list[torch.Generator | None], tokens: torch.Tensor | None = None) -> list[torch.Tensor]:
    """attention_maps of several image batches (B_i, 3, S, S) in one denoiser call, batch i's latents noised
    from generators[i] as they would be in a call of its own: a list of (B_i, N or T, res, res)."""
    check_width(bb, embeddings)
    heads = [KeypointMapsHead(spec, embeddings, x.shape[-1], tokens, grad=torch.is_grad_enabled()) for x in batches]
    views = run_plans(bb, [h.plan(bb.probe.sites) for h in heads], batches, draws=generators)
    return [h.finish(v) for h, v in zip(heads, views)]


def iteration_losses(bb, spec: MapSettings, cfg: FitSettings, images: list[torch.Tensor], embeddings: torch.Tensor,
                     generators: list[torch.Generator]) -> tuple[torch.Tensor, list[dict]]:
    """Summed weighted loss of iterations sharing one denoiser call: image i (1, 3, S, S) with a random transform
    and noise drawn from generators[i], as alone; also each iteration's parts as floats."""
    thetas = [sample_affine(1, cfg.affine, generator=g) for g in generators]
    pairs = [torch.cat([x, warp_image(x, theta)]) for x, theta in zip(images, thetas)]
    total, parts = 0.0, []
    for maps, theta in zip(maps_in_one_call(bb, spec, pairs, embeddings, generators), thetas):   # (2, N, R, R)
        candidates = rank_candidates(maps[0], cfg.candidates, cfg.sigma)
        chosen = spread_tokens(maps[1], candidates, cfg.top_k)
        loc = localisation_loss(maps[0, chosen], cfg.sigma)
        eq = equivariance_loss(maps[0, chosen], maps[1, chosen], theta, masked=cfg.masked_equivariance)
        loss = cfg.localisation_weight * loc + cfg.equivariance_weight * eq
        total = total + loss
        parts.append({"loss": loss.item(), "localisation": loc.item(), "equivariance": eq.item()})
    return total, parts


def fit_embeddings(bb, spec: MapSettings, cfg: FitSettings, images: ImageSet, out_dir: Path | None = None,
                   resume: str | Path | None = None, progress: bool = True,
                   on_checkpoint: Callable[[list[dict]], None] | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Optimise embeddings (num_tokens, D); returns them and the per-step history.

    Checkpoints go to out_dir/checkpoint.safetensors (diffprobe.training.checkpoint) every `checkpoint_every` steps, every
    `checkpoint_minutes`, at the end and on Ctrl-C (after the last whole step). `resume` (a checkpoint
    file or the folder holding it) continues an interrupted fit; without it, a checkpoint already in
    out_dir (a rerun in the same folder) is continued.
    """
    if len(images) == 0:
        raise DiffprobeError("keypoints fit needs at least one image")
    embeddings = initial_embeddings(cfg, bb.context_dim).requires_grad_(True)
    opt = torch.optim.Adam([embeddings], lr=cfg.lr)
    history: list[dict] = []
    start = 0
    if resume is None and out_dir is not None and (Path(out_dir) / CHECKPOINT).is_file():
        resume = out_dir
    if resume is not None:
        path = Path(resume) / CHECKPOINT if Path(resume).is_dir() else Path(resume)
        saved = load_checkpoint(path, opt, config_dict(cfg, spec))
        if saved.tensors.get("embeddings") is None or saved.tensors["embeddings"].shape != embeddings.shape:
            raise DiffprobeError(f"{path} holds no embeddings of shape {tuple(embeddings.shape)} (num_tokens or "
                                 "model differ)")
        with torch.no_grad():
            embeddings.copy_(saved.tensors["embeddings"])
        start, history = saved.step, list(saved.history.get("steps", []))
        log.info("resuming keypoints fit at step %d of %d", start, cfg.steps)

    def save(step: int, scheduled: bool) -> None:
        save_checkpoint(Path(out_dir) / CHECKPOINT, {"embeddings": embeddings.float()}, opt, step,
                        {"steps": history}, config_dict(cfg, spec))
        if on_checkpoint is not None:
            on_checkpoint(history)

    def step(i: int):
        opt.zero_grad(set_to_none=True)
        parts = []
        iterations = range(i * cfg.batch_size, (i + 1) * cfg.batch_size)
        for first in range(0, cfg.batch_size, cfg.iterations_per_call):
            its = iterations[first : first + cfg.iterations_per_call]
            loss, info = iteration_losses(bb, spec, cfg, [images.tensor(image_order(len(images), it, cfg.seed))
                                                          for it in its], embeddings,
                                          [_generator(cfg.seed, 2, it) for it in its])
            (loss / cfg.batch_size).backward()
            parts += info
        if not all(math.isfinite(p["loss"]) for p in parts):
            raise DiffprobeError(f"keypoints loss became non-finite at step {i}; lower lr (now {cfg.lr})")
        row = {"step": i + 1, **{k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}}

        def apply() -> None:
            opt.step()
            history.append(row)

        return apply, {"loss": row["loss"]}

    run_steps("keypoints fit", start, cfg.steps, step, save if out_dir is not None else None, cfg.checkpoint_every,
              cfg.checkpoint_minutes, hint=cpu_hint(bb), progress=progress)
    return embeddings.detach(), history


@torch.no_grad()
def choose_keypoints(bb, spec: MapSettings, cfg: FitSettings, images: ImageSet, embeddings: torch.Tensor,
                     progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """The top_k tokens chosen most often over `num_indices` images (candidates then FPS on each image's
    own maps); returns (indices (K,), their counts)."""
    n = min(cfg.num_indices, len(images))
    order = torch.randperm(len(images), generator=_generator(cfg.seed, 3))[:n].tolist()
    chosen = []
    for start in tqdm(range(0, n, cfg.select_batch), desc="choose keypoints", disable=not progress):
        batch = order[start : start + cfg.select_batch]
        maps = attention_maps(bb, spec, images.batch(batch), embeddings, generator=_generator(cfg.seed, 4, start))
        for m in maps:
            chosen.append(spread_tokens(m, rank_candidates(m, cfg.candidates, cfg.sigma), cfg.top_k))
    indices = most_frequent(chosen, cfg.top_k)
    flat = torch.cat(chosen)
    counts = [int((flat == i).sum()) for i in indices]
    return indices, counts


def config_dict(cfg: FitSettings, spec: MapSettings) -> dict:
    """JSON-friendly record of the fit and map settings (checkpoint timing and iterations per call left out: they
    do not change results, beyond float rounding for the latter)."""
    fit = {k: v for k, v in asdict(cfg).items()
           if k not in ("checkpoint_every", "checkpoint_minutes", "iterations_per_call")}
    return json.loads(json.dumps({"fit": fit, "maps": asdict(spec)}))


def fit(bb, spec: MapSettings, cfg: FitSettings, images: ImageSet, out_dir: Path | None = None,
        resume: str | Path | None = None, progress: bool = True, extra_config: dict | None = None,
        on_checkpoint=None) -> FitResult:
    """Fit embeddings, then choose the keypoint tokens; the returned model holds both and the config."""
    embeddings, history = fit_embeddings(bb, spec, cfg, images, out_dir, resume, progress, on_checkpoint)
    indices, counts = choose_keypoints(bb, spec, cfg, images, embeddings, progress)
    config = {**config_dict(cfg, spec), "image_size": images.size, "crop": images.crop, "resize": images.resize,
              **(extra_config or {})}
    return FitResult(KeypointModel(embeddings, indices, config, counts), history)
