"""Backbone: the frozen parts of a text-to-image latent diffusion model, and the facts read from their configs
(VAE scaling and shift, latent and image sizes, context width), never hard-coded. diffprobe.loading makes them."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    word_stream: str = "all"  # whose columns a word's map reads: "all" streams or one's name (SD3: "clip", "t5")
    activation_peaks: dict = field(default_factory=dict, repr=False, compare=False)  # the runner's dry runs, by shape

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
        reach = self.family.max_latent_side(self.unet)
        if reach is not None and size > reach * self.vae_factor:
            raise DiffprobeError(f"image_size {size} is beyond what {self.name} takes: its position embedding reaches "
                                 f"{reach * self.vae_factor} px a side")
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
    def text_streams(self) -> tuple:
        """The text streams of the prompt encoding in column order (diffprobe.families.TextStream: name, tokenizer
        attribute, first column): SD's and SDXL's CLIP, PixArt's and FLUX's T5, SD3's CLIP then T5."""
        return self.family.text_streams(self)

    def stream_ids(self, stream, prompt: str) -> list[int]:
        """`stream`'s token ids of `prompt` padded and cut as the prompt encoding does it (on the side the tokenizer
        pads: a left-padding tokenizer moves every word)."""
        return stream.ids(self, [prompt])[0].tolist()

    def word_positions(self, prompt: str, words: list[str], stream: str | None = None) -> list[list[int]]:
        """The context columns of each word's tokens in `prompt` (first occurrence in each stream), as each
        stream's tokenizer splits it. `stream` (default: the backbone's `word_stream`) names the stream to read, or
        "all": a word in two streams (SD3's CLIP and T5 parts) gets its columns in both, so its map is the
        attention the image pays that word in either (docs/transformers.md)."""
        streams = self.streams_named(stream or self.word_stream)
        ids = {s: self.stream_ids(s, prompt) for s in streams}   # the prompt tokenised once per stream
        return self.word_columns(ids, words, prompt)

    def word_columns(self, ids: dict, words: list[str], prompt: str = "the prompt") -> list[list[int]]:
        """The context columns of each word's tokens, found (first occurrence) in each stream's ids {TextStream:
        [token id, ...]} as the pipeline padded them: the rule of word_positions, on ids already made (a traced
        pipeline's own). "<start>" and "<end>" name a stream's start token (CLIP's; T5 has none) and its first end
        token."""
        groups = []
        for word in words:
            columns = []
            for s, row in ids.items():
                tokenizer = getattr(self, s.tokenizer)
                special = {"<start>": tokenizer.bos_token_id, "<end>": tokenizer.eos_token_id}
                if word in special:
                    first = next((i for i, t in enumerate(row) if t == special[word]), None)
                    columns += [] if first is None else [s.offset + first]
                    continue
                sub = tokenizer(word, add_special_tokens=False).input_ids
                start = next((i for i in range(len(row) - len(sub) + 1) if sub and row[i:i + len(sub)] == sub), None)
                if start is not None:
                    columns += [s.offset + i for i in range(start, start + len(sub))]
            if not columns and word in ("<start>", "<end>"):
                names = ", ".join(s.name for s in ids)
                raise DiffprobeError(f"{word} is not a token of this model's text stream(s) {names} (T5 adds no start "
                                     "token)")
            if not columns:
                raise DiffprobeError(f"word {word!r} is not found in the tokenised prompt {prompt!r} (too many words?)")
            groups.append(columns)
        return groups

    def streams_named(self, name: str) -> tuple:
        """The text streams `name` selects ("all" or one stream's name); an unknown name is a DiffprobeError."""
        streams = tuple(s for s in self.text_streams if name in ("all", s.name))
        if not streams:
            known = ", ".join(["all"] + [s.name for s in self.text_streams])
            raise DiffprobeError(f"word_stream {name!r} is not a text stream of {self.name}; known: {known}")
        return streams

    def context_tokens(self, prompt: str) -> list[str]:
        """What each column of `prompt`'s context holds: each stream's tokens, padded to its length, at its
        columns; the model's own positions ("<register 0>", ...) and columns no stream fills ("<zero>": SD3
        without T5) named as such."""
        tokens = [f"<register {i}>" for i in range(self.text_streams[0].offset)]
        for s in self.text_streams:
            tokens += getattr(self, s.tokenizer).convert_ids_to_tokens(self.stream_ids(s, prompt))
        return tokens + ["<zero>"] * (self.family.text_tokens(self) - len(tokens))

    @property
    def max_tokens(self) -> int:
        """Columns of the denoiser's text stream (every stream's padded tokens and the model's own positions)."""
        return int(self.family.text_tokens(self))

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
