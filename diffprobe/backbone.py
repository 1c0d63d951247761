"""Backbone: the frozen parts of a text-to-image latent diffusion model, and the facts read from their configs
(VAE scaling and shift, latent and image sizes, context width), never hard-coded. diffprobe.loading makes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffprobe.errors import DiffprobeError


@dataclass
class Backbone:
    """A text-to-image latent diffusion model's parts, frozen (requires_grad False, eval mode)."""

    unet: Any
    vae: Any
    scheduler: Any
    family: Any  # the model family's record (diffprobe.families: sites, attention, conditioning, sampling)
    text_encoder: Any = None
    tokenizer: Any = None
    name: str = "custom"
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    text_encoder_3: Any = None  # SD3's T5
    tokenizer_3: Any = None
    attention_capture: str = "recompute"  # how the runner's captures get attention: "recompute" | "reuse"

    @property
    def probe(self):
        """The model's capture registry (built once; captures remove their hooks, so it is shared)."""
        from diffprobe.hooks import ProbeRegistry

        if getattr(self, "_probe", None) is None or self._probe.model is not self.unet:
            self._probe = ProbeRegistry(self.unet, self.family, self.family.text_tokens(self))
        return self._probe

    def check_image_size(self, size: int | None) -> int:
        """`size` if the model can take size x size images (a multiple of VAE factor x deepest divisor); None: the
        model's sample size."""
        if size is None:
            return self.sample_size
        size = int(size)
        deepest = self.grid_factor * max(s.divisor for s in self.probe.sites.values())
        if size < deepest or size % deepest:
            raise DiffprobeError(f"image_size must be a positive multiple of {deepest} for this model, not {size}")
        return size

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift(self) -> float:
        """The VAE's shift factor (SD3, FLUX: latents are (z - shift) * scale), 0 for SD's VAEs."""
        return float(self.vae.config.get("shift_factor") or 0.0)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def grid_factor(self) -> int:
        """Image pixels per side of one unit of the grid that sites' divisors divide: the VAE factor, times 2 for
        FLUX, whose tokens are 2x2 latent patches."""
        return self.vae_factor * self.family.latent_per_token

    @property
    def sample_size(self) -> int:
        """Image side in pixels the denoiser was trained at (latent sample_size times the VAE factor)."""
        size = self.unet.config.get("sample_size") or self.family.default_sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size) * self.vae_factor

    @property
    def context_dim(self) -> int:
        """Width of the text states the denoiser takes (a transformer may project them: caption_channels)."""
        config = self.unet.config
        return int(config.get("caption_channels") or config.get("joint_attention_dim") or config.cross_attention_dim)

    @property
    def context_tokenizer(self):
        """The tokenizer whose tokens are the positions of the prompt encoding's context (the family says which)."""
        return getattr(self, self.family.context_tokenizer)

    def word_positions(self, prompt: str, words: list[str]) -> list[list[int]]:
        """The context positions of each word's tokens in `prompt` (first occurrence), as the family's context
        tokenizer splits them and after the positions its model puts first (AuraFlow's register tokens)."""
        ids = self._context_ids(prompt)
        tokenizer, offset, groups = self.context_tokenizer, self.family.context_offset, []
        for word in words:
            sub = tokenizer(word, add_special_tokens=False).input_ids
            starts = [i for i in range(len(ids) - len(sub) + 1) if sub and ids[i:i + len(sub)] == sub]
            if not starts:
                raise DiffprobeError(f"word {word!r} is not found in the tokenised prompt {prompt!r} (too many words?)")
            groups.append([offset + i for i in range(starts[0], starts[0] + len(sub))])
        return groups

    def context_tokens(self, prompt: str) -> list[str]:
        """What each position of `prompt`'s context holds: the context tokenizer's tokens, padded to its length,
        after the model's own leading positions ("<register 0>", ...)."""
        tokens = self.context_tokenizer.convert_ids_to_tokens(self._context_ids(prompt))
        return [f"<register {i}>" for i in range(self.family.context_offset)] + tokens

    def _context_ids(self, prompt: str) -> list[int]:
        """The context tokenizer's ids of `prompt` padded to its length as the prompt encoding pads them (on the
        side the tokenizer pads: a left-padding tokenizer moves every word)."""
        tokenizer = self.context_tokenizer
        return tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True).input_ids[0]

    @property
    def max_tokens(self) -> int:
        return int(self.context_tokenizer.model_max_length)

    def parts(self) -> dict[str, Any]:
        """The torch modules, by diffusers component name."""
        named = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                 "text_encoder_2": self.text_encoder_2, "text_encoder_3": self.text_encoder_3}
        return {k: v for k, v in named.items() if v is not None}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Backbone":
        for module in self.parts().values():
            if dtype is not None and dtype != next(module.parameters()).dtype:
                module.to(device=device, dtype=dtype)
            elif device is not None:
                module.to(device=device)
        return self
