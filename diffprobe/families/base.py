"""What a model family must say about itself (`Family`), and the Conditioning the denoiser is called with.

A family is one record: how its denoiser's sites are enumerated and its attention read (diffprobe.hooks asks it),
how prompts become conditioning and the denoiser is called, how it samples and guides, which tokenizer indexes the
context, which classes load its parts, and its published and tiny configurations. Adding a family is one module in
this package (it registers itself on import) and its golden site list under tests/golden/.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn



@dataclass
class Conditioning:
    """What the denoiser is conditioned on.

    context: (B, T, D) cross-attention input (text encoder states, or learned embeddings fed straight in).
    added: extra conditioning the family needs (SDXL: {"text_embeds": (B, P), "time_ids": (B, 6)}), else None.
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

    def repeat(self, n: int) -> "Conditioning":
        """Each row repeated n times in place (row r -> rows r*n .. r*n + n - 1)."""
        added = None if self.added is None else {k: v.repeat_interleave(n, 0) for k, v in self.added.items()}
        return Conditioning(self.context.repeat_interleave(n, 0), added)

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        added = None
        if parts[0].added is not None:
            added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
        return Conditioning(torch.cat([p.context for p in parts]), added)


@dataclass(frozen=True)
class TextPart:
    """One text encoder of a family with the tokenizer beside it, under the pipeline's names (slot "" ->
    text_encoder and tokenizer, "_2" -> text_encoder_2 and tokenizer_2, ...), and the transformers classes that may
    load them (the first: when model_index.json names none). optional: loaded only when model_index.json names it."""

    slot: str
    encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    optional: bool = False


@dataclass(frozen=True)
class TextStream:
    """One run of the denoiser's text columns that one tokenizer's padded tokens fill: its name ("clip", "t5"), the
    backbone attribute of that tokenizer, the column of its first token (after AuraFlow's registers, after SD3's
    CLIP part), and the length the family's pipeline pads to (None: the tokenizer's model_max_length; a tokenizer
    that reads fewer tokens caps it)."""

    name: str
    tokenizer: str
    offset: int = 0
    length: int | None = None

    def padded_length(self, bb: Any) -> int:
        limit = int(getattr(bb, self.tokenizer).model_max_length)
        return limit if self.length is None else min(limit, self.length)

    def ids(self, bb: Any, prompts: list[str]) -> torch.Tensor:
        """(B, padded_length) token ids of `prompts` on the backbone's device, as the pipeline pads and cuts them."""
        return token_ids(getattr(bb, self.tokenizer), prompts, bb.device, self.padded_length(bb))


CLIP = ("CLIPTokenizer", "CLIPTokenizerFast")
T5 = ("T5TokenizerFast", "T5Tokenizer")


class Family:
    """Per-family facts. Subclasses override what differs; `name` identifies the family ("sd1", "sdxl", ...)."""

    name = "base"
    denoiser_class = ""
    """The diffusers class of the denoiser (loaded from its folder, `denoiser_folder`)."""
    denoiser_folder = "transformer"
    text_parts: tuple[TextPart, ...] = ()
    streams: tuple[TextStream, ...] = (TextStream("clip", "tokenizer"),)
    """The text streams of `encode_prompt`'s context in column order, for families whose streams do not depend on
    which encoders are loaded (`text_streams` says for a backbone). SDXL's two CLIPs are one stream: their states
    are concatenated along the width, token by token."""
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    """The diffusers scheduler the family samples with (its saved schedule read into it)."""
    default_guidance: float | None = None
    """The guidance scale generation uses when none is given: each family states its pipeline's (none: a
    generation must be given one)."""
    configs: dict[str, dict] = {}
    """Published denoiser configs by structure name (real-sized models built on the meta device: golden lists)."""
    tiny_configs: dict[str, dict] = {}
    """Tiny denoiser configs with the same structure, by structure name (tests; `tiny_parts`)."""
    latent_per_token = 1
    """Latent pixels per side of one unit of the spatial size `model_call` reports (FLUX packs 2x2 per token)."""
    default_sample_size: int | None = None
    """Latent side the model was trained at when its config does not say (FLUX's pipeline default)."""
    captures_at_kernel = False
    """True when attention sites are always captured at the module's SDPA call (diffprobe.hooks.kernel), in
    both attention modes: transformers whose q and k carry qk norms and rotary embeddings."""
    upsamples_queries = False
    """For attention captured at its kernel: True when `upsampled_queries` can recompute the queries of the module's
    image input at a finer grid (no rotary embeddings tie them to the token positions)."""
    no_upsampled_queries = "its queries at upsampled positions would not be the model's"
    """Why a family that captures at the kernel cannot recompute upsampled queries (said when they are asked for)."""

    def matches(self, model: nn.Module) -> bool:
        """True when this family describes the denoiser `model`."""
        raise NotImplementedError

    def sites(self, model: nn.Module) -> dict:
        """All capture sites of `model` in execution order, name -> diffprobe.hooks.Site (no forward run)."""
        raise NotImplementedError

    def check_attention(self, module: nn.Module, name: str) -> None:
        """Raise diffprobe.hooks.errors.UnsupportedAttention when `module`'s probabilities cannot be recomputed."""
        raise NotImplementedError

    def attention_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(hidden (B, N, C), context (B, T, Cc) or None, mask or None) from an attention module's call."""
        raise NotImplementedError

    def attention_qk(self, module: nn.Module, hidden: torch.Tensor, context: torch.Tensor | None,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q (B, h, N, d) scaled, k (B, h, K, d), additive bias broadcastable to (B, h, N, K) or None)."""
        raise NotImplementedError

    def upsampled_queries(self, attn: nn.Module, hidden: torch.Tensor, grid: tuple[int, int],
                          size: tuple[int, int]) -> torch.Tensor:
        """Queries (B, h, H*W, d), unscaled, of the image tokens `hidden` (B, h*w, C) a kernel-captured attention
        module was called with, upsampled bicubically from `grid` to `size` (see `upsamples_queries`)."""
        raise NotImplementedError

    def attention_context(self, model: nn.Module, states: torch.Tensor) -> torch.Tensor:
        """The context (B, T, Dc) the denoiser's attention reads, made from text-encoder states (B, T, D) as its
        forward makes it: here as is (a UNet's cross-attention reads the encoder's states)."""
        return states

    concept_path: str | None = "cross"
    """How concepts outside the prompt are mapped (diffprobe.concepts): "joint" (ConceptAttention: concept tokens
    run through the joint blocks as a text stream of their own, `concept_blocks`, `concept_stream_update`),
    "cross" (read-only: concept keys against the cross-attention's image queries), None (not supported)."""

    def feature_module(self, model: nn.Module, site) -> nn.Module:
        """The module whose forward output is the feature site's tensor."""
        raise NotImplementedError

    def feature_tensor(self, site, output: Any, grid: tuple[int, int], call: tuple) -> torch.Tensor:
        """The feature site's (B, C, h, w) tensor from its module's output (a UNet block's first output); call is
        the hooked call's (module, args, kwargs)."""
        return output[0] if isinstance(output, tuple) else output

    def put_feature(self, site, output: Any, value: torch.Tensor, grid: tuple[int, int]) -> Any:
        """The feature module's output with the site's tensor replaced by `value` (feature_tensor's inverse): a UNet
        block's first output (its skip connections unchanged), a ResNet's conv2 output."""
        return (value, *output[1:]) if isinstance(output, tuple) else value

    def model_call(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple[int, int], Any]:
        """(spatial size of the input latent, in the units of Site.divisor; the timestep) of a denoiser call."""
        bound = call_arguments(model, args, kwargs)
        sample = bound["sample"] if "sample" in bound else bound["hidden_states"]
        return tuple(sample.shape[-2:]), bound["timestep"]

    flow_matching = False
    """True for rectified-flow models (SD3, FLUX): x_t = (1 - s) x_0 + s e with s = t / 1000, a velocity output,
    no DDIM inversion."""

    def max_latent_side(self, model: nn.Module) -> int | None:
        """The largest latent side the denoiser takes (a learned position table's reach), or None: no limit."""
        return None

    def alpha_bar(self, bb: Any, t: int) -> torch.Tensor:
        """Cumulative alpha of SD's training schedule at integer timestep t; 1 for t < 0 (clean)."""
        if t < 0:
            return torch.tensor(1.0)
        return bb.scheduler.alphas_cumprod[t].float()

    def noisy_latents(self, bb: Any, latents: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """q(x_t | x_0) at training timestep t: SD's sqrt(a) x_0 + sqrt(1 - a) e with a = alpha-bar(t)."""
        a = self.alpha_bar(bb, t).to(latents.device, latents.dtype)
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    classifier_free = True
    """True when generation combines unconditional and conditional predictions (rows [uncond; cond]); False for
    guidance-distilled models (FLUX.1-dev), which take the guidance scale as conditioning ("guidance", (B,))."""

    def sampler(self, bb: Any, num_steps: int, size: tuple[int, int]) -> Any:
        """A fresh `scheduler_class` on the backbone's schedule for generating (H, W) = `size` images in
        `num_steps` steps, timesteps set."""
        import diffusers

        scheduler = getattr(diffusers, self.scheduler_class).from_config(bb.scheduler.config)
        scheduler.set_timesteps(num_steps, device=bb.device)
        return scheduler

    def text_streams(self, bb: Any) -> tuple[TextStream, ...]:
        """The text streams a backbone's prompt encoding feeds its denoiser, each with its tokenizer loaded."""
        return tuple(s for s in self.streams if getattr(bb, s.tokenizer, None) is not None)

    def text_tokens(self, bb: Any) -> int | None:
        """Length of `encode_prompt`'s context (B, T, D): where its last stream's padded tokens end."""
        streams = self.text_streams(bb)
        if not streams:
            return None
        return streams[-1].offset + streams[-1].padded_length(bb)

    def encode_prompt(self, bb: Any, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        """Text conditioning of `prompts` ("" = unconditional) for images of `size` (H, W) pixels."""
        raise NotImplementedError

    def context_conditioning(self, bb: Any, context: torch.Tensor, batch: int, size: tuple[int, int]) -> Conditioning:
        """A learned context (T, D) fed straight to cross-attention, as `batch` rows (keypoints)."""
        raise NotImplementedError

    def denoise(self, model: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One denoiser call: the predicted noise for `latents` at timestep `t`."""
        raise NotImplementedError

    def pipeline(self, bb: Any) -> Any:
        """A diffusers pipeline holding bb's parts (for saving in diffusers layout)."""
        raise NotImplementedError

    def build(self, structure: str, tiny: bool = False, device: str = "cpu") -> nn.Module:
        """A denoiser of `structure` with random weights from its published (or tiny) config; device="meta"
        allocates nothing."""
        import diffusers

        table = self.tiny_configs if tiny else self.configs
        if structure not in table:
            raise KeyError(f"{self.name} has no {'tiny ' if tiny else ''}structure {structure!r}; known: {', '.join(table)}")
        with torch.device(device):
            return getattr(diffusers, self.denoiser_class)(**copy.deepcopy(table[structure]))

    def tiny_parts(self, structure: str, words: list[str]) -> dict[str, Any]:
        """The parts of a tiny random model of `structure` (Backbone fields: unet, vae, scheduler, text encoders
        and tokenizers), 64 px images, its tokenizers knowing `words` as whole tokens."""
        raise NotImplementedError


@functools.lru_cache(maxsize=None)
def _signature_of(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def call_arguments(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A call of `model`'s forward as {parameter name: value} (the signature is read once per class)."""
    return _signature_of(type(model)).bind_partial(None, *args, **kwargs).arguments


def token_ids(tokenizer, prompts: list[str], device, length: int | None = None) -> torch.Tensor:
    """(B, length) input ids of `prompts` padded and cut to `length` (default the tokenizer's), on `device`."""
    ids = tokenizer(prompts, padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def register(family: Family) -> Family:
    """Add a family to the table the hooks read (diffprobe.hooks.families)."""
    from diffprobe.hooks.families import register as add

    return add(family)
