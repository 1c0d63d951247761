"""Train diffprobe-mini on the world: VAE first, then UNet and text encoder jointly on cached latents,
with the epsilon loss and, weighted by `token_grounding`, the token loss of diffprobe.mini.grounding on
cross-attention captured through diffprobe.hooks.

Every phase checkpoints to `work_dir` every `checkpoint_every` steps and resumes from there when run
again with the same `work_dir`. Batches, noise and timesteps are drawn from generators seeded by
(seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffprobe.backbone import Backbone
from diffprobe.families import Conditioning, family_for, family_named
from diffprobe.data.world import vocabulary
from diffprobe.errors import DiffprobeError
from diffprobe.io import load_tensors, save_tensors
from diffprobe.hooks import ProbeRegistry, Reduce
from diffprobe.mini import grounding, models
from diffprobe.training.checkpoint import load_checkpoint, module_tensors, restore, save_checkpoint
from diffprobe.mini.dataset import TrainingSet, to_unit, tokenize, training_set
from diffprobe.mini.export import export_pipeline, export_transformer
from diffprobe.mini.preserve import KEEP_AT, AttentionTeacher, attention_kl, diffseg_call
from diffprobe.mini.tokenizer import load_tokenizer, write_tokenizer
from diffprobe.training.loop import run_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MiniTrainSettings:
    LIMITS: ClassVar[dict] = {"images": "1..10000000", "vae_batch": "1..4096", "vae_crop": "8..4096", "batch": "1..4096",
                              "warmup": ">= 0", "samples": "0..64", "threads": "1..1024"}

    images: int = 32000
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 5500
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1
    token_grounding: float = 0.1  # weight of the cross-attention token loss (0: denoising only)
    ema_decay: float = 0.999
    checkpoint_every: int = 200
    checkpoint_minutes: float = 5.0
    max_minutes: float | None = None  # stop the UNet phase after this long (this invocation) and export
    threads: int | None = None  # torch intra-op threads; None: torch's default (all cores)
    seed: int = 0
    samples: int = 8
    init_from: str | None = None  # a pipeline directory (or "packaged": the shipped mini) to continue training
    closeup_fraction: float = 0.0  # share of training scenes that are close-ups of one face, bird or house
    denoiser: str = "unet"  # "pixart": diffprobe-mini-dit, a transformer on init_from's VAE and text encoder
    train_text_encoder: bool = True  # False: the text encoder stays as loaded (mini-dit shares mini's)
    new_word_lr_scale: float = 30.0  # lr multiplier of the embedding rows of words new to a loaded text encoder
    top_attention: bool = False  # add self- and cross-attention at the UNet's top up level (32 latent px)
    freeze_loaded: bool = False  # with top_attention: train only the grown level's attention (and new words' rows)
    keep_self_attention: float = 0.0  # weight of the KL keeping the loaded model's self-attention maps (init_from)
    keep_self_attention_at: str = "training"  # the maps kept: on the training inputs, or at DiffSeg's call only

    @classmethod
    def from_dict(cls, values: dict) -> "MiniTrainSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise DiffprobeError(f"unknown train_mini key(s) {sorted(unknown)}; known: {sorted(known)}")
        from diffprobe.config import typed

        cfg = typed(values, cls, "train_mini")  # types checked, NaN and infinities refused
        for name in ("images", "vae_steps", "vae_batch", "unet_steps", "batch", "checkpoint_every", "threads"):
            if name == "threads" and cfg.threads is None:
                continue
            if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
                raise DiffprobeError(f"train_mini.{name} must be a positive integer, got {getattr(cfg, name)!r}")
        if not 0 <= cfg.caption_dropout < 1 or not 0 <= cfg.ema_decay < 1:
            raise DiffprobeError("train_mini.caption_dropout and train_mini.ema_decay must lie in [0, 1)")
        if cfg.token_grounding < 0:
            raise DiffprobeError("train_mini.token_grounding must be >= 0")
        if cfg.lr <= 0 or cfg.vae_lr <= 0 or cfg.new_word_lr_scale <= 0 or (
                cfg.max_minutes is not None and cfg.max_minutes <= 0):
            raise DiffprobeError("train_mini.lr, vae_lr, new_word_lr_scale and max_minutes must be positive")
        if not 0 <= cfg.closeup_fraction <= 1:
            raise DiffprobeError("train_mini.closeup_fraction must lie in [0, 1]")
        if cfg.denoiser not in ("unet", "pixart"):
            raise DiffprobeError(f"train_mini.denoiser must be unet or pixart, not {cfg.denoiser!r}")
        if cfg.top_attention and cfg.denoiser != "unet":
            raise DiffprobeError("train_mini.top_attention grows a UNet level; it does not apply to denoiser=pixart")
        if cfg.keep_self_attention < 0 or (cfg.keep_self_attention > 0 and not cfg.init_from):
            raise DiffprobeError("train_mini.keep_self_attention must be >= 0, and > 0 only with init_from (it keeps "
                                 "the loaded model's self-attention)")
        if cfg.keep_self_attention_at not in KEEP_AT:
            raise DiffprobeError(f"train_mini.keep_self_attention_at must be one of {', '.join(KEEP_AT)}, "
                                 f"not {cfg.keep_self_attention_at!r}")
        if cfg.freeze_loaded and not (cfg.top_attention and cfg.init_from):
            raise DiffprobeError("train_mini.freeze_loaded trains only a grown level: it needs top_attention=true "
                                 "and init_from")
        if cfg.denoiser == "pixart" and not cfg.init_from:
            raise DiffprobeError("train_mini.denoiser=pixart trains on a trained mini's VAE and text encoder: "
                                 "set train_mini.init_from (e.g. packaged)")
        return cfg


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction loss, training loss) of images x (B, 3, H, W) in [-1, 1]: MSE + 0.1 L1, plus a
    tiny KL term that keeps the posterior near-deterministic."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample(generator=generator)).sample
    rec_loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x)
    return rec_loss, rec_loss + 1e-6 * post.kl().mean()


def noised_inputs(text_encoder, scheduler, latents: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor,
                  t: torch.Tensor) -> tuple[torch.Tensor, Conditioning]:
    """(latents (B, C, h, w) noised to timesteps t (B,), the conditioning of captions ids (B, T))."""
    return scheduler.add_noise(latents, noise, t), Conditioning(text_encoder(ids).last_hidden_state)


def epsilon_loss(unet, noisy: torch.Tensor, cond: Conditioning, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Epsilon-prediction MSE on noisy latents (B, C, h, w) at t (B,); the denoiser (UNet or transformer) is
    called as its diffprobe.families family says."""
    return F.mse_loss(family_for(unet).denoise(unet, noisy, t, cond), noise)


def denoising_loss(unet, text_encoder, scheduler, latents: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """Epsilon-prediction MSE of latents (B, C, h, w) noised to timesteps t (B,), captioned by ids (B, T)."""
    return epsilon_loss(unet, *noised_inputs(text_encoder, scheduler, latents, ids, noise, t), noise, t)


def grounded_losses(unet, text_encoder, scheduler, probe: ProbeRegistry, latents: torch.Tensor, ids: torch.Tensor,
                    noise: torch.Tensor, t: torch.Tensor, regions: torch.Tensor, parts: torch.Tensor,
                    token_regions: torch.Tensor, teacher: AttentionTeacher | None = None,
                    keep_on: tuple[torch.Tensor, torch.Tensor, Conditioning] | None = None) -> dict[str, torch.Tensor]:
    """{"loss": epsilon MSE, "tokens": token loss averaged over every cross-attention site}, and with a teacher
    "self_attention": the KL from its self-attention to the student's, averaged over its sites, on the inputs
    keep_on (noisy, t, cond), or on the training inputs when None.

    regions and parts (B, H, W) and token_regions (B, T) as in diffprobe.mini.grounding; each sample's token loss
    is weighted by alpha_bar(t), the signal fraction of its noisy input.
    """
    sites = [n for n, s in probe.sites.items() if s.kind == "cross_attn"]
    kept = teacher.sites if teacher is not None else []
    noisy, cond = noised_inputs(text_encoder, scheduler, latents, ids, noise, t)
    with probe.capture(sites + (kept if keep_on is None else []), reduce=Reduce(heads="mean"), grad=True) as cache:
        loss = epsilon_loss(unet, noisy, cond, noise, t)
    weights = scheduler.alphas_cumprod.to(latents.device)[t].float()
    tokens = torch.stack([grounding.token_loss(cache[n], grounding.region_fractions(regions, parts, cache.grid(n)),
                                               token_regions, weights) for n in sites]).mean()
    out = {"loss": loss, "tokens": tokens}
    if teacher is not None:
        if keep_on is not None:
            with probe.capture(kept, reduce=Reduce(heads="mean"), grad=True) as cache:
                family_for(unet).denoise(unet, *keep_on)
        target = teacher.maps(*(keep_on or (noisy, t, cond)))
        out["self_attention"] = torch.stack([attention_kl(cache[n], target[n]) for n in kept]).mean()
    return out


def _run_phase(name: str, work_dir: Path, modules: dict, optimizer: torch.optim.Optimizer, steps: int,
               step_fn: Callable[[int], dict[str, float]], cfg: "MiniTrainSettings", ema: dict | None = None,
               deadline: float | None = None) -> tuple[dict[str, list[float]], int]:
    """Run step_fn(step) -> {loss name: value} (forward and backward; the optimiser step, the EMA and the history
    are applied here, with Ctrl-C deferred) from the phase's checkpoint in work_dir to `steps`, through the one
    training loop (diffprobe.training); returns ({loss name: value per step}, steps done)."""
    ckpt = work_dir / f"{name}.ckpt.safetensors"
    config = asdict(cfg)
    step, losses = 0, {}
    if ckpt.is_file():
        saved = load_checkpoint(ckpt, optimizer, config)
        for m, module in modules.items():
            restore(module, saved.tensors, m, ckpt)
        for k, v in (ema or {}).items():
            v.copy_(saved.tensors[f"ema.{k}"])
        step, losses = saved.step, saved.history
    params = {f"{m}.{k}": p for m, mod in modules.items() for k, p in mod.named_parameters()}

    def step_of(i: int):
        values = step_fn(i)

        def apply() -> None:
            optimizer.step()
            for key, value in values.items():
                losses.setdefault(key, []).append(value)
            if ema is not None:
                with torch.no_grad():
                    for k, v in ema.items():
                        v.lerp_(params[k].detach(), 1.0 - min(cfg.ema_decay, (2 + i) / (11 + i)))

        return apply, values

    done = run_steps(f"train {name}", step, steps, step_of,
                     lambda n, scheduled: save_checkpoint(ckpt, {**module_tensors(modules), **{
                         f"ema.{k}": v for k, v in (ema or {}).items()}}, optimizer, n, losses, config),
                     cfg.checkpoint_every, cfg.checkpoint_minutes, deadline=deadline)
    return losses, done


def _train_vae(cfg: MiniTrainSettings, vae, images: torch.Tensor, work_dir: Path) -> tuple[dict[str, list[float]], int]:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    size = images.shape[-1]

    def step_fn(step: int) -> float:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g)
        y0, x0 = torch.randint(0, size - cfg.vae_crop + 1, (2,), generator=g).tolist()
        x = to_unit(images[idx, :, y0:y0 + cfg.vae_crop, x0:x0 + cfg.vae_crop])
        rec_loss, loss = vae_loss(vae, x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return {"loss": rec_loss.item()}

    return _run_phase("vae", work_dir, {"vae": vae}, opt, cfg.vae_steps, step_fn, cfg)


def _latent_source(vae, images: torch.Tensor) -> str:
    """sha256 of images (N, 3, H, W) uint8 and the VAE's weights: what cached latents were encoded from."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def _encode_latents(vae, images: torch.Tensor, path: Path, scale: float | None = None) -> torch.Tensor:
    """Posterior means of all images, (N, C, h, w) times `scale` (None: the scale giving unit variance, set
    as vae's scaling_factor; a continued model keeps its own). Cached at `path`; a cache of other images or
    another VAE is encoded again."""
    source = _latent_source(vae, images)
    if path.is_file():
        tensors, meta = load_tensors(path)
        if meta.get("source") == source:
            vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
            return tensors["latents"]
        log.info("cached latents at %s come from other images or another VAE; encoding again", path)
    vae.eval()
    lat = torch.cat([vae.encode(to_unit(images[i:i + 256])).latent_dist.mean
                     for i in tqdm(range(0, len(images), 256), desc="encode latents", leave=False)])
    scale = 1.0 / float(lat.std()) if scale is None else scale
    vae.register_to_config(scaling_factor=scale)
    lat = lat * scale
    save_tensors(path, {"latents": lat}, metadata={"scaling_factor": repr(scale), "source": source})
    return lat


def _train_unet(cfg: MiniTrainSettings, unet, text_encoder, scheduler, latents: torch.Tensor, data: TrainingSet,
                empty_ids: torch.Tensor, work_dir: Path, deadline: float | None,
                new_tokens: torch.Tensor | None = None,
                teacher: AttentionTeacher | None = None) -> tuple[dict[str, list[float]], int, dict]:
    """new_tokens (V,) bool: tokens the loaded text encoder did not know; with train_text_encoder false only
    their embedding rows train (no weight decay), so every caption it knew still encodes exactly as before.
    teacher: the loaded UNet's frozen copy whose self-attention the student keeps (keep_self_attention)."""
    learn_words = new_tokens is not None and bool(new_tokens.any())
    train_text = cfg.train_text_encoder and not cfg.freeze_loaded
    modules = {"unet": unet, "text_encoder": text_encoder} if train_text or learn_words else {"unet": unet}
    if cfg.freeze_loaded:  # gradients reach only the grown level: nothing before it is differentiated
        unet.requires_grad_(False)
        trainable = [p.requires_grad_(True) for p in models.top_attention_parameters(unet)]
    else:
        trainable = list(unet.parameters())
    groups = [{"params": trainable, "weight_decay": 0.01}]
    if train_text:
        groups[0]["params"] += list(text_encoder.parameters())
    else:
        text_encoder.eval().requires_grad_(False)
        if learn_words:
            rows = text_encoder.get_input_embeddings().weight.requires_grad_(True)
            rows.register_hook(lambda grad: grad * new_tokens[:, None].to(grad.dtype))
            groups.append({"params": [rows], "weight_decay": 0.0, "scale": cfg.new_word_lr_scale})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    ema = {f"{m}.{k}": p.detach().clone() for m, mod in modules.items() for k, p in mod.named_parameters()
           if p.requires_grad}  # frozen weights are exported as they are
    n_train = scheduler.config.num_train_timesteps
    probe = ProbeRegistry(unet)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.unet_steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    def step_fn(step: int) -> dict[str, float]:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 500_000 + step)
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=g)
        lat, tok, tok_regions = latents[idx], data.ids[idx].clone(), data.token_regions[idx].clone()
        dropped = torch.rand(cfg.batch, generator=g) < cfg.caption_dropout
        tok[dropped], tok_regions[dropped] = empty_ids, 0
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, n_train, (cfg.batch,), generator=g)
        if cfg.token_grounding > 0 or teacher is not None:
            keep_on = None
            if teacher is not None and cfg.keep_self_attention_at == "diffseg":
                keep_on = diffseg_call(lat, text_encoder(empty_ids[None]).last_hidden_state[0])
            parts = grounded_losses(unet, text_encoder, scheduler, probe, lat, tok, noise, t, data.regions[idx],
                                    data.parts[idx], tok_regions, teacher, keep_on)
        else:
            parts = {"loss": denoising_loss(unet, text_encoder, scheduler, lat, tok, noise, t)}
        total = (parts["loss"] + cfg.token_grounding * parts.get("tokens", 0.0)
                 + cfg.keep_self_attention * parts.get("self_attention", 0.0))
        for group in opt.param_groups:
            group["lr"] = lr_at(step) * group.get("scale", 1.0)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        return {k: v.item() for k, v in parts.items()}

    losses, done = _run_phase("unet", work_dir, modules, opt, cfg.unet_steps, step_fn, cfg, ema, deadline)
    return losses, done, ema


def _pipeline_dir(init_from: str, denoiser: str = "unet") -> Path:
    """The pipeline directory to continue from. A transformer run continues a mini-dit directory (one with
    transformer/; its other parts are the packaged mini's) or starts from a mini pipeline's VAE and text encoder."""
    from diffprobe.mini import packaged_path

    path = packaged_path() if init_from == "packaged" else Path(init_from)
    if denoiser == "pixart" and models.has_transformer(path):
        return path
    if not all((path / f).is_file() for f in ("unet/config.json", "tokenizer/vocab.json")):
        raise DiffprobeError(f"train_mini.init_from={init_from}: {path} is not a diffprobe-mini pipeline directory")
    return path


def train_mini(cfg: MiniTrainSettings, work_dir: Path, export_to: Path,
               arch: models.MiniArch = models.MiniArch()) -> dict:
    """Train all parts and export a diffusers pipeline (EMA weights) with config, curves and samples."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    source = _pipeline_dir(cfg.init_from, cfg.denoiser) if cfg.init_from else None  # a UNet run's has unet/
    if cfg.keep_self_attention > 0 and cfg.denoiser == "pixart" and source and not models.has_transformer(source):
        raise DiffprobeError(f"train_mini.keep_self_attention keeps a loaded transformer's self-attention, but "
                             f"{source} has none (this run would build a new one): set it to 0")
    start = time.time()
    deadline = start + 60 * cfg.max_minutes if cfg.max_minutes else None
    work_dir.mkdir(parents=True, exist_ok=True)
    words = vocabulary()
    tokenizer = load_tokenizer(write_tokenizer(work_dir / "tokenizer", words, arch.max_tokens))
    minutes: dict[str, float] = {}
    clock = time.time()

    def lap(phase: str) -> None:
        nonlocal clock
        minutes[phase] = round((time.time() - clock) / 60, 2)
        clock = time.time()

    data = training_set(work_dir / "data.safetensors", cfg.images, arch.image_size, tokenizer, cfg.seed,
                        closeup_fraction=cfg.closeup_fraction)
    lap("render")
    torch.manual_seed(cfg.seed)
    scheduler = models.build_scheduler()
    arch = replace(arch, denoiser=cfg.denoiser)
    if source is not None:  # continue a trained pipeline: its VAE (and latent scale) stay as they are
        parts = source if (source / "vae").is_dir() else _pipeline_dir("packaged")  # mini-dit: mini's parts
        vae, unet, text_encoder = models.load_trained(source, cfg.denoiser, parts_from=parts)
        new_tokens = models.adopt_vocabulary(text_encoder, json.loads((parts / "tokenizer" / "vocab.json").read_text()),
                                             tokenizer.get_vocab())
        unet = unet if unet is not None else models.build_denoiser(arch).train()
        vae_losses, vae_done, scale = {"loss": []}, 0, float(vae.config.scaling_factor)
    else:
        vae, unet = models.build_vae(arch), models.build_unet(arch)
        text_encoder, new_tokens = models.build_text_encoder(arch, words), None
        vae_losses, vae_done = _train_vae(cfg, vae, data.images, work_dir)
        scale = None
    teacher = AttentionTeacher(unet) if cfg.keep_self_attention > 0 else None  # the loaded UNet, before growing
    if cfg.top_attention and cfg.denoiser == "unet":  # zero-initialised: the loaded UNet's output is unchanged
        unet = models.grow_top_attention(unet)
    lap("vae")
    latents = _encode_latents(vae, data.images, work_dir / "latents.safetensors", scale)
    lap("encode")
    unet_losses, unet_done, ema = _train_unet(cfg, unet, text_encoder, scheduler, latents, data,
                                              tokenize(tokenizer, [""])[0], work_dir, deadline, new_tokens, teacher)
    lap("unet")
    with torch.no_grad():
        for m, mod in {"unet": unet, "text_encoder": text_encoder}.items():
            for k, p in mod.named_parameters():
                if f"{m}.{k}" in ema:
                    p.copy_(ema[f"{m}.{k}"])
    record = {"train": asdict(cfg), "arch": arch.to_dict(), "vae_steps_done": vae_done,
              "unet_steps_done": unet_done, "minutes_this_run": round((time.time() - start) / 60, 2),
              "minutes_by_phase_this_run": minutes,
              "torch_threads": torch.get_num_threads(), "scaling_factor": vae.config.scaling_factor,
              "parameters": {cfg.denoiser: models.count_parameters(unet), "vae": models.count_parameters(vae),
                             "text_encoder": models.count_parameters(text_encoder)}}
    if cfg.init_from:  # the record of the run this one continues
        earlier = _pipeline_dir(cfg.init_from) / "training_config.json"
        record["continued_from"] = json.loads(earlier.read_text()) if earlier.is_file() else str(cfg.init_from)
    curves = {"vae": vae_losses["loss"], "unet": unet_losses["loss"]} if vae_losses["loss"] else {
        "unet": unet_losses["loss"]}
    if "tokens" in unet_losses:
        curves["unet token grounding"] = unet_losses["tokens"]
    if "self_attention" in unet_losses:
        curves["unet self-attention KL to the loaded model"] = unet_losses["self_attention"]
    if cfg.denoiser == "pixart":
        record["parts_from"] = str(parts)
        bb = Backbone(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                      scheduler=scheduler, family=family_named("pixart"), name="mini_dit")
        export_transformer(export_to, bb, record, curves, n_samples=cfg.samples, seed=cfg.seed)
    else:
        export_pipeline(export_to, vae, text_encoder, tokenizer, unet, scheduler, record, curves,
                        n_samples=cfg.samples, seed=cfg.seed)
    return {"pipeline": str(export_to), **record,
            **{f"final_{k.replace(' ', '_')}_loss": sum(v[-100:]) / max(1, len(v[-100:])) for k, v in curves.items()}}
