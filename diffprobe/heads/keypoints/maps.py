"""Cross-attention maps of learned embeddings, read through diffprobe.hooks (never by patching the UNet).

The embeddings (N, D) go straight in as the cross-attention context (the text encoder is bypassed);
the maps of the configured sites are captured with queries upsampled bicubically to `res` and
averaged over heads and sites: (B, N, res, res), each pixel a softmax over the N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffprobe.backbones import Backbone
from diffprobe.errors import DiffprobeError
from diffprobe.hooks import ProbeRegistry, Reduce, Site
from diffprobe.runners import Conditioning, encode_images, unet_step

# The reference layers: the first four cross-attention calls of the up path at 1/4 and 1/2 of the
# latent side (SD 1.5: up_blocks[1].attentions[0..2] at 16x16 and up_blocks[2].attentions[0] at 32x32).
DEFAULT_DIVISORS = (2, 4)
DEFAULT_NUM_SITES = 4


@dataclass(frozen=True)
class MapSpec:
    """How maps are made. sites: registry names; res: query grid side (reference 128); timestep: UNet t;
    noise: noise the latent to t with fresh Gaussian noise (reference) or feed the clean latent."""

    sites: tuple[str, ...]
    res: int = 128
    timestep: int = 0
    noise: bool = True

    @staticmethod
    def from_dict(d: dict) -> "MapSpec":
        """Inverse of dataclasses.asdict (as saved in a keypoints model's config)."""
        try:
            return MapSpec(tuple(d["sites"]), int(d["res"]), int(d["timestep"]), bool(d["noise"]))
        except (KeyError, TypeError) as exc:
            raise DiffprobeError(f"keypoints model config has no valid map settings ({exc})") from None


def default_sites(probe: ProbeRegistry) -> list[str]:
    """The first four up-path cross-attention sites at divisors 2 or 4, in execution order.

    Falls back to the first four up-path cross-attention sites when fewer qualify.
    """
    up = [n for n, s in probe.sites.items() if s.kind == "cross_attn" and s.direction == "up"]
    preferred = [n for n in up if probe.sites[n].divisor in DEFAULT_DIVISORS]
    chosen = (preferred if len(preferred) >= DEFAULT_NUM_SITES else up)[:DEFAULT_NUM_SITES]
    if not chosen:
        raise DiffprobeError("this UNet has no cross-attention sites in its up path; set keypoints sites explicitly")
    return chosen


def resolve_sites(probe: ProbeRegistry, sites) -> list[str]:
    """Registry names for a config value: None / "auto" (per-backbone default) or names/globs."""
    if sites is None or sites == "auto":
        return default_sites(probe)
    try:
        names = probe.select(list(sites) if not isinstance(sites, str) else sites)
    except KeyError as exc:
        raise DiffprobeError(f"keypoints sites: {exc.args[0]}") from None
    wrong = [n for n in names if probe.sites[n].kind != "cross_attn"]
    if wrong:
        raise DiffprobeError(f"keypoints sites must be cross-attention probabilities, not {wrong[0]}")
    return names


def context_for(bb: Backbone, embeddings: torch.Tensor, batch: int, image_size: int) -> Conditioning:
    """Embeddings (N, D) as the context of a batch; SDXL also gets zero pooled text and size time ids."""
    if embeddings.shape[-1] != bb.context_dim:
        raise DiffprobeError(f"embeddings have width {embeddings.shape[-1]} but the model's cross-attention "
                             f"expects {bb.context_dim}; they were learned on another model")
    context = embeddings.to(bb.device, bb.dtype).unsqueeze(0).expand(batch, -1, -1)
    added = None
    if bb.kind == "sdxl":
        pooled = bb.unet.config.projection_class_embeddings_input_dim - 6 * bb.unet.config.addition_time_embed_dim
        s = float(image_size)
        added = {"text_embeds": torch.zeros(batch, pooled, device=bb.device, dtype=bb.dtype),
                 "time_ids": torch.tensor([[s, s, 0.0, 0.0, s, s]], device=bb.device, dtype=bb.dtype).expand(batch, 6)}
    return Conditioning(context, added)


def attention_maps(bb: Backbone, probe: ProbeRegistry, spec: MapSpec, images: torch.Tensor,
                   embeddings: torch.Tensor, generator: torch.Generator | None = None,
                   tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Maps (B, N, res, res) for images (B, 3, S, S) in [-1, 1]; only `tokens` (T,) -> (B, T, res, res).

    The softmax is always over all N tokens; selecting tokens early saves memory when predicting.
    Gradients reach `embeddings` when grad mode is on (the capture keeps the graph then).
    """
    latents = encode_images(bb, images)
    cond = context_for(bb, embeddings, images.shape[0], images.shape[-1])
    grad = torch.is_grad_enabled()
    with probe.capture(list(spec.sites), reduce=Reduce(heads="mean"), detach=not grad,
                       upsample_queries=spec.res, early_exit=True) as cache:
        unet_step(bb, latents, spec.timestep, cond, noise="random" if spec.noise else None, generator=generator)
    total = None
    for name in spec.sites:
        probs = cache[name] if tokens is None else cache[name][..., tokens]          # (B, res*res, T)
        total = probs if total is None else total + probs
    maps = (total / len(spec.sites)).transpose(1, 2)
    return maps.reshape(*maps.shape[:2], *cache.grid(spec.sites[0])).float()


def site_summary(probe: ProbeRegistry, names: list[str]) -> list[dict]:
    """JSON-friendly description of the chosen sites (name, divisor, heads)."""
    out = []
    for n in names:
        s: Site = probe.sites[n]
        out.append({"name": n, "divisor": s.divisor, "heads": s.heads})
    return out
