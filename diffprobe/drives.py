"""How the denoiser is driven: one call at timestep t, DDIM inversion, or generation; the latents and
conditioning they take. Run them inside a capture (diffprobe.hooks) or through the runner (diffprobe.runner).

- `unet_step`: one call on an image latent at timestep t, clean or noised to t;
- `ddim_inversion`: deterministic DDIM inversion (eta 0) whose first call is at t=-1 on the clean latent;
- `generate`: sampling with the family's sampler and guidance (DDIM with classifier-free guidance for SD, batch
  [uncond; cond], see BatchLayout; flow matching for SD3; FLUX's guidance embedding);
- `Drive`: one of the three as a value (equal drives can share their calls), run by `run_drive`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from diffprobe.families import Conditioning
from diffprobe.errors import DiffprobeError

PROCESSES = ("one_step", "inversion", "generation")
log = logging.getLogger(__name__)
_warned: set[tuple[int, str]] = set()


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """Words of `prompt` the tokenizer can only spell letter by letter (not in the model's vocabulary:
    diffprobe-mini knows only the world's words)."""
    out = []
    for word in re.findall(r"[A-Za-z]{2,}", prompt):
        if len(tokenizer(word, add_special_tokens=False).input_ids) >= len(word):
            out.append(word)
    return out


def _warn_unknown_words(tokenizer, prompts: list[str]) -> None:
    for prompt in prompts:
        words = unknown_words(tokenizer, prompt)
        key = (id(tokenizer), " ".join(words))
        if words and key not in _warned:
            _warned.add(key)
            log.warning("prompt words %s are not in this model's vocabulary: they are split into letters",
                        ", ".join(repr(w) for w in words))


def _warn_truncated(bb, prompts: list[str]) -> None:
    """Warn (once per prompt and stream) when a prompt has more tokens than a text stream reads: the rest is cut."""
    for stream in bb.text_streams:
        tokenizer = getattr(bb, stream.tokenizer)
        for prompt in prompts:
            key = (id(tokenizer), f"long:{prompt}")
            if key in _warned:  # each prompt is counted once: encode_prompt runs once per pass
                continue
            _warned.add(key)
            n, length = len(tokenizer(prompt, truncation=False).input_ids), stream.padded_length(bb)
            if n > length:
                kept = tokenizer.decode(tokenizer(prompt, truncation=True, max_length=length).input_ids,
                                        skip_special_tokens=True)
                log.warning("a prompt has %d %s tokens but %s reads %d: everything after %r is cut", n, stream.name,
                            bb.name, length, kept[-40:])


@torch.no_grad()
def encode_prompt(bb, prompts: list[str] | str, size: tuple[int, int] | None = None) -> Conditioning:
    """Text conditioning for `prompts` ("" is the unconditional prompt) as the model family builds it
    (SD 1.x/2.x: the text encoder's last hidden states (B, max_tokens, D); SDXL: both encoders' penultimate
    states plus pooled embeddings and time ids for images of `size` (H, W), default the model's size)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    for stream in bb.text_streams:
        _warn_unknown_words(getattr(bb, stream.tokenizer), prompts)
    _warn_truncated(bb, prompts)
    return bb.family.encode_prompt(bb, prompts, size or (bb.sample_size, bb.sample_size))


@torch.no_grad()
def encode_images(bb, images: torch.Tensor, sample: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, C, H/f, W/f) latents, minus the VAE's shift factor (SD3), times
    its scaling factor.

    sample=False takes the posterior mean; sample=True draws from it with `generator`.
    """
    dist = bb.vae.encode(images.to(bb.device, bb.dtype)).latent_dist
    latents = dist.sample(generator=generator) if sample else dist.mean
    return (latents - bb.latent_shift) * bb.latent_scale


@torch.no_grad()
def decode_latents(bb, latents: torch.Tensor) -> torch.Tensor:
    """Latents (times the scaling factor) -> (B, 3, H, W) images in [0, 1]."""
    images = bb.vae.decode(latents / bb.latent_scale + bb.latent_shift).sample
    return ((images.float() + 1) / 2).clamp(0, 1)


def unet_call(bb, latents: torch.Tensor, t: float | int | torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """One denoiser forward: predicted noise (B, C, h, w). Gradients flow if enabled by the caller."""
    cond = cond.expand(latents.shape[0])
    return bb.family.denoise(bb.unet, latents, torch.as_tensor(t, device=latents.device), cond)


def check_timestep(bb, t: int) -> int:
    """t if it is a training timestep of the model's schedule (0 .. num_train_timesteps - 1)."""
    last = bb.scheduler.config.num_train_timesteps - 1
    if not 0 <= int(t) <= last:
        raise DiffprobeError(f"timestep must be in 0..{last} (the model's training schedule), not {t}")
    return int(t)


def unet_step(bb, latents: torch.Tensor, t: float | int, cond: Conditioning,
              noise: torch.Tensor | str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One denoiser call at timestep `t` on an image latent.

    noise=None: the clean latent goes in and only the timestep embedding says t (DiffSeg's reference);
    noise="random" (drawn with `generator`) or a tensor: the latent is first noised to t, q(x_t | x_0).
    """
    if noise is not None:
        if isinstance(noise, str):
            if noise != "random":
                raise ValueError(f"noise must be None, 'random' or a tensor, not {noise!r}")
            noise = torch.randn(latents.shape, generator=generator, device="cpu").to(latents.device, latents.dtype)
        latents = bb.family.noisy_latents(bb, latents, noise, check_timestep(bb, t))
    return unet_call(bb, latents, t, cond)


def inversion_timesteps(bb, num_steps: int) -> list[int]:
    """Timesteps of the calls of `ddim_inversion`: -1, then 0, r, 2r, ... (r = train steps / num_steps); for a
    flow-matching model's one-call inversion, [0] (sigma 0: the clean latent, as t=-1 is for DDPM)."""
    if bb.family.flow_matching and num_steps == 1:
        return [0]
    ratio = bb.scheduler.config.num_train_timesteps // num_steps
    return [-1] + [i * ratio for i in range(num_steps - 1)]


@torch.no_grad()
def ddim_inversion(bb, latents: torch.Tensor, cond: Conditioning, num_steps: int = 50,
                   progress: bool = False) -> torch.Tensor:
    """Deterministic DDIM inversion (eta 0) of clean latents; returns the latent at the last timestep.

    Call i is at inversion_timesteps()[i] (the first at t=-1, alpha-bar 1, on the clean latent) and moves the
    latent to timestep i * r. Run it inside a capture: the capture's step i is call i. A flow-matching model
    has one-call inversion only (the call at sigma 0 on the clean latent, which leaves it where it is).
    """
    if bb.family.flow_matching:
        if num_steps != 1:
            raise DiffprobeError(f"DDIM inversion follows SD's noise schedule; {bb.name} is a flow-matching model: "
                                 "use hyperfeatures process=one_step (one call on the clean latent) or generation")
        unet_call(bb, latents, 0, cond)
        return latents
    ratio = bb.scheduler.config.num_train_timesteps // num_steps
    x = latents
    calls = inversion_timesteps(bb, num_steps)
    for i, t in enumerate(tqdm(calls, desc="DDIM inversion", disable=not progress, leave=False)):
        a_t = bb.family.alpha_bar(bb, t).to(x.device, torch.float32)
        a_next = bb.family.alpha_bar(bb, i * ratio).to(x.device, torch.float32)
        eps = unet_call(bb, x, t, cond).float()
        x0 = (x.float() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = (a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps).to(latents.dtype)
    return x


@torch.no_grad()
def generate(bb, prompts: list[str] | str, guidance: float | None = None, num_steps: int = 50,
             generator: torch.Generator | None = None, size: tuple[int, int] | None = None,
             latents: torch.Tensor | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling with the family's sampler and guidance (`guidance` None: its default, SD 7.5, FLUX 3.5); returns
    (images (B, 3, H, W) in [0, 1], final latents).

    With classifier-free guidance every call sees the batch [uncond; cond] (BatchLayout(cfg=True,
    uncond_first=True)); a guidance-distilled family (FLUX) sees the prompts' rows only.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    h, w = size or (bb.sample_size, bb.sample_size)
    cond = encode_prompt(bb, prompts, (h, w))
    if bb.family.classifier_free:
        cond = Conditioning.cat([encode_prompt(bb, [""] * len(prompts), (h, w)), cond])
    return generate_from(bb, cond, guidance, num_steps, generator, (h, w), latents, progress)


@torch.no_grad()
def generate_from(bb, cond: Conditioning, guidance: float | None = None, num_steps: int = 50,
                  generator: torch.Generator | None = None, size: tuple[int, int] | None = None,
                  latents: torch.Tensor | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate` from a conditioning of 2B rows [uncond; cond] (B rows for a guidance-distilled family, which gets
    the guidance scale as conditioning instead): (images (B, 3, H, W), final latents). `guidance` None: the
    family's default (SD 7.5, FLUX 3.5)."""
    guidance = bb.family.default_guidance if guidance is None else guidance
    if guidance is None:
        raise DiffprobeError(f"the {bb.family.name} family states no default guidance scale; give one")
    cfg = bb.family.classifier_free
    n = cond.context.shape[0] // 2 if cfg else cond.context.shape[0]
    h, w = size or (bb.sample_size, bb.sample_size)
    scheduler = bb.family.sampler(bb, num_steps, (h, w))
    if not cfg:
        cond = Conditioning(cond.context, {**(cond.added or {}), "guidance": torch.full((n,), float(guidance))})
    if latents is None:
        shape = (n, bb.vae.config.latent_channels, h // bb.vae_factor, w // bb.vae_factor)
        latents = torch.randn(shape, generator=generator, device="cpu").to(bb.device, bb.dtype)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts from unit noise
    for t in tqdm(scheduler.timesteps, desc="generate", disable=not progress, leave=False):
        if cfg:
            eps_uncond, eps_cond = unet_call(bb, torch.cat([latents, latents]), t, cond).chunk(2)  # or velocities
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        else:
            eps = unet_call(bb, latents, t, cond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return decode_latents(bb, latents), latents


@dataclass(frozen=True)
class Drive:
    """How the denoiser is driven, as a value: heads whose drives are equal can share one pass.

    process: "one_step" (one call at `timestep`; `noise` noises the latent to t first, seeded),
      "inversion" (DDIM inversion with `num_steps` calls, the first at t=-1) or "generation" (the family's
      sampler with `num_steps` steps and `guidance`, None for the family's default; no input images).
    sample_latent: image latents drawn from the VAE posterior (seeded) instead of its mean.
    """

    process: str = "one_step"
    timestep: int = 0
    noise: bool = False
    num_steps: int = 50
    guidance: float | None = None
    sample_latent: bool = False

    def __post_init__(self):
        if self.process not in PROCESSES:
            raise DiffprobeError(f"process must be one of {', '.join(PROCESSES)}, not {self.process!r}")
        if self.num_steps < 1:
            raise DiffprobeError(f"num_steps must be at least 1, got {self.num_steps}")

    @property
    def calls(self) -> int:
        """Denoiser calls one run makes."""
        return 1 if self.process == "one_step" else self.num_steps


def run_drive(bb, drive: Drive, latents: torch.Tensor | None, cond: Conditioning,
              generator: torch.Generator | None = None, size: tuple[int, int] | None = None,
              progress: bool = False, noise: torch.Tensor | None = None) -> torch.Tensor | None:
    """Make the drive's denoiser calls on `latents` (B, C, h, w) with `cond` (B rows). A noisy one_step uses
    `noise` (B, C, h, w) if given, else draws it from `generator`. Generation: latents the starting ones or None
    (drawn from `generator`), cond the 2B rows [uncond; cond] of B prompts, images of `size`; returns the generated
    images (B, 3, H, W) in [0, 1].
    Gradients flow only for one_step, and only if enabled by the caller."""
    if drive.process == "one_step":
        check_timestep(bb, drive.timestep)
        noise = (noise if noise is not None else "random") if drive.noise else None
        unet_step(bb, latents, drive.timestep, cond, noise=noise, generator=generator)
        return None
    if drive.process == "inversion":
        ddim_inversion(bb, latents, cond, num_steps=drive.num_steps, progress=progress)
        return None
    images, _ = generate_from(bb, cond, drive.guidance, drive.num_steps, generator, size, latents, progress=progress)
    return images
