"""Runners: the UNet calls a head needs, each run inside a `ProbeRegistry.capture` by the caller.

- `unet_step`: one UNet call on an image latent at timestep t, clean or noised to t;
- `ddim_inversion`: deterministic DDIM inversion (eta 0) whose first call is at t=-1 on the clean latent;
- `generate`: DDIM sampling with classifier-free guidance (batch [uncond; cond], see BatchLayout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from diffprobe.backbones import Backbone


@dataclass
class Conditioning:
    """What the UNet is conditioned on.

    context: (B, T, D) cross-attention input (text encoder states, or learned embeddings fed straight in).
    added: SDXL's added conditioning {"text_embeds": (B, P), "time_ids": (B, 6)}, else None.
    """

    context: torch.Tensor
    added: dict | None = field(default=None)

    def expand(self, batch: int) -> "Conditioning":
        """Broadcast a batch-1 conditioning to `batch` rows (other sizes must match)."""
        if self.context.shape[0] == batch:
            return self
        if self.context.shape[0] != 1:
            raise ValueError(f"conditioning batch {self.context.shape[0]} does not match latent batch {batch}")
        added = None if self.added is None else {k: v.expand(batch, *v.shape[1:]) for k, v in self.added.items()}
        return Conditioning(self.context.expand(batch, *self.context.shape[1:]), added)

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        added = None
        if parts[0].added is not None:
            added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
        return Conditioning(torch.cat([p.context for p in parts]), added)


def _tokens(tokenizer, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


@torch.no_grad()
def encode_prompt(bb: Backbone, prompts: list[str] | str, size: tuple[int, int] | None = None) -> Conditioning:
    """Text conditioning for `prompts` ("" is the unconditional prompt).

    SD 1.x/2.x: the text encoder's last hidden states (B, max_tokens, D). SDXL: both encoders' penultimate
    hidden states side by side, plus pooled text embeddings and time ids for an image of `size` (H, W) pixels
    (default: the model's sample size).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = bb.device
    if bb.kind != "sdxl":
        context = bb.text_encoder(_tokens(bb.tokenizer, prompts, device))[0]
        return Conditioning(context.to(bb.dtype))
    out1 = bb.text_encoder(_tokens(bb.tokenizer, prompts, device), output_hidden_states=True)
    out2 = bb.text_encoder_2(_tokens(bb.tokenizer_2, prompts, device), output_hidden_states=True)
    context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    h, w = size or (bb.sample_size, bb.sample_size)
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=bb.dtype, device=device).expand(len(prompts), 6)
    added = {"text_embeds": out2.text_embeds.to(bb.dtype), "time_ids": time_ids}
    return Conditioning(context.to(bb.dtype), added)


@torch.no_grad()
def encode_images(bb: Backbone, images: torch.Tensor, sample: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, C, H/f, W/f) latents times the VAE's scaling factor.

    sample=False takes the posterior mean; sample=True draws from it with `generator`.
    """
    dist = bb.vae.encode(images.to(bb.device, bb.dtype)).latent_dist
    latents = dist.sample(generator=generator) if sample else dist.mean
    return latents * bb.latent_scale


@torch.no_grad()
def decode_latents(bb: Backbone, latents: torch.Tensor) -> torch.Tensor:
    """Latents (times the scaling factor) -> (B, 3, H, W) images in [0, 1]."""
    images = bb.vae.decode(latents / bb.latent_scale).sample
    return ((images.float() + 1) / 2).clamp(0, 1)


def unet_call(bb: Backbone, latents: torch.Tensor, t: float | int | torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """One UNet forward: predicted noise (B, C, h, w). Gradients flow if enabled by the caller."""
    cond = cond.expand(latents.shape[0])
    t = torch.as_tensor(t, device=latents.device)
    kwargs = {} if cond.added is None else {"added_cond_kwargs": cond.added}
    return bb.unet(latents, t, encoder_hidden_states=cond.context, **kwargs).sample


def unet_step(bb: Backbone, latents: torch.Tensor, t: float | int, cond: Conditioning,
              noise: torch.Tensor | str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One UNet call at timestep `t` on an image latent.

    noise=None: the clean latent goes in and only the timestep embedding says t (DiffSeg's reference);
    noise="random" (drawn with `generator`) or a tensor: the latent is first noised to t, q(x_t | x_0).
    """
    if noise is not None:
        if isinstance(noise, str):
            if noise != "random":
                raise ValueError(f"noise must be None, 'random' or a tensor, not {noise!r}")
            noise = torch.randn(latents.shape, generator=generator, device="cpu").to(latents.device, latents.dtype)
        a = _alpha_bar(bb, int(t)).to(latents.device, latents.dtype)
        latents = a.sqrt() * latents + (1 - a).sqrt() * noise
    return unet_call(bb, latents, t, cond)


def _alpha_bar(bb: Backbone, t: int) -> torch.Tensor:
    """Cumulative alpha of the model's training schedule at integer timestep t; 1 for t < 0 (clean)."""
    if t < 0:
        return torch.tensor(1.0)
    return bb.scheduler.alphas_cumprod[t].float()


def inversion_timesteps(bb: Backbone, num_steps: int) -> list[int]:
    """Timesteps of the UNet calls of `ddim_inversion`: -1, then 0, r, 2r, ... (r = train steps / num_steps)."""
    ratio = bb.scheduler.config.num_train_timesteps // num_steps
    return [-1] + [i * ratio for i in range(num_steps - 1)]


@torch.no_grad()
def ddim_inversion(bb: Backbone, latents: torch.Tensor, cond: Conditioning, num_steps: int = 50,
                   progress: bool = False) -> torch.Tensor:
    """Deterministic DDIM inversion (eta 0) of clean latents; returns the latent at the last timestep.

    Call i is at inversion_timesteps()[i] (the first at t=-1, alpha-bar 1, on the clean latent) and moves the
    latent to timestep i * r. Run it inside a capture: the capture's step i is call i.
    """
    ratio = bb.scheduler.config.num_train_timesteps // num_steps
    x = latents
    calls = inversion_timesteps(bb, num_steps)
    for i, t in enumerate(tqdm(calls, desc="DDIM inversion", disable=not progress, leave=False)):
        a_t = _alpha_bar(bb, t).to(x.device, torch.float32)
        a_next = _alpha_bar(bb, i * ratio).to(x.device, torch.float32)
        eps = unet_call(bb, x, t, cond).float()
        x0 = (x.float() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = (a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps).to(latents.dtype)
    return x


@torch.no_grad()
def generate(bb: Backbone, prompts: list[str] | str, guidance: float = 7.5, num_steps: int = 50,
             generator: torch.Generator | None = None, size: tuple[int, int] | None = None,
             latents: torch.Tensor | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM sampling with classifier-free guidance; returns (images (B, 3, H, W) in [0, 1], final latents).

    Every UNet call sees the batch [uncond; cond] (BatchLayout(cfg=True, uncond_first=True)).
    """
    from diffusers import DDIMScheduler

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    h, w = size or (bb.sample_size, bb.sample_size)
    f = bb.vae_factor
    cond = Conditioning.cat([encode_prompt(bb, [""] * len(prompts), (h, w)), encode_prompt(bb, prompts, (h, w))])
    scheduler = DDIMScheduler.from_config(bb.scheduler.config)
    scheduler.set_timesteps(num_steps, device=bb.device)
    if latents is None:
        shape = (len(prompts), bb.unet.config.in_channels, h // f, w // f)
        latents = torch.randn(shape, generator=generator, device="cpu").to(bb.device, bb.dtype)
    latents = latents * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc="generate", disable=not progress, leave=False):
        eps_uncond, eps_cond = unet_call(bb, torch.cat([latents, latents]), t, cond).chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return decode_latents(bb, latents), latents
