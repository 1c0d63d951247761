"""Cross-attention maps of learned embeddings, read through the runner (never by patching the UNet).

The embeddings (N, D) go straight in as the cross-attention context (the text encoder is bypassed);
the maps of the configured sites are captured with queries upsampled bicubically to `res` and
averaged over heads and sites: (B, N, res, res), each pixel a softmax over the N tokens. On a joint attention
(SD3) the embeddings are the whole text stream and the maps are its image-to-text blocks renormalised over the
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from einops import rearrange
import torch

from diffprobe.drives import Drive
from diffprobe.errors import DiffprobeError
from diffprobe.hooks import Need, Reduce, Site
from diffprobe.hooks.sites import select_sites
from diffprobe.runner import Head, Plan, View

# The reference layers: the first four cross-attention calls of the up path at 1/4 and 1/2 of the
# latent side (SD 1.5: up_blocks[1].attentions[0..2] at 16x16 and up_blocks[2].attentions[0] at 32x32).
DEFAULT_DIVISORS = (2, 4)
DEFAULT_NUM_SITES = 4


@dataclass(frozen=True)
class MapSettings:
    """How maps are made. sites: registry names; res: query grid side (reference 128); timestep: UNet t;
    noise: noise the latent to t with fresh Gaussian noise (reference) or feed the clean latent."""

    sites: tuple[str, ...]
    res: int = 128
    timestep: int = 0
    noise: bool = True

    @staticmethod
    def from_dict(d: dict) -> "MapSettings":
        """Inverse of dataclasses.asdict (as saved in a keypoints model's config)."""
        try:
            return MapSettings(tuple(d["sites"]), int(d["res"]), int(d["timestep"]), bool(d["noise"]))
        except (KeyError, TypeError) as exc:
            raise DiffprobeError(f"keypoints model config has no valid map settings ({exc})") from None


def default_sites(sites: Mapping[str, Site]) -> list[str]:
    """The first four up-path cross-attention sites at divisors 2 or 4, in execution order.

    Falls back to the first four up-path cross-attention sites when fewer qualify. A transformer (no up path,
    one patch grid) gets the four cross-attention sites in the middle of its stack.
    """
    up = [n for n, s in sites.items() if s.kind == "cross_attn" and s.direction == "up"]
    preferred = [n for n in up if sites[n].divisor in DEFAULT_DIVISORS]
    chosen = (preferred if len(preferred) >= DEFAULT_NUM_SITES else up)[:DEFAULT_NUM_SITES]
    if not up:
        cross = [n for n, s in sites.items() if s.kind == "cross_attn" and s.direction in ("dit", "single")]
        start = max(0, (len(cross) - DEFAULT_NUM_SITES) // 2)
        chosen = cross[start : start + DEFAULT_NUM_SITES]
    if not chosen:
        raise DiffprobeError("this model has no cross-attention sites in its up path; set keypoints sites explicitly")
    return chosen


def resolve_sites(sites: Mapping[str, Site], selection) -> list[str]:
    """Registry names for a config value: None / "auto" (per-backbone default) or names/globs."""
    if selection is None or selection == "auto":
        return default_sites(sites)
    names = select_sites(sites, list(selection) if not isinstance(selection, str) else selection)
    wrong = [n for n in names if sites[n].kind != "cross_attn"]
    if wrong:
        raise DiffprobeError(f"keypoints sites must be cross-attention probabilities, not {wrong[0]}")
    return names


def token_maps(view: View, names: tuple[str, ...], tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, res, res) maps of the context tokens averaged over the sites `names` of `view` (captured head-averaged,
    queries at res x res); only `tokens` (T,) -> (B, T, res, res)."""
    total = None
    for name in names:
        probs = view[name]                                  # (B, res*res, N)
        if view.sites[name].part is not None:   # a joint attention's image-to-text block: a softmax over the
            probs = probs / probs.sum(-1, keepdim=True)     # tokens, as cross-attention's (image keys dropped)
        probs = probs if tokens is None else probs[..., tokens]   # (B, res*res, T)
        total = probs if total is None else total + probs
    h, w = view.grid(names[0])
    return rearrange(total / len(names), "b (h w) t -> b t h w", h=h, w=w).float()


def maps_plan(spec: MapSettings, embeddings: torch.Tensor, image_size: int, grad: bool = False,
              batch: int | None = None) -> Plan:
    """One call at spec.timestep with `embeddings` (N, D) as the context, the spec's sites head-averaged with
    queries upsampled to spec.res; `grad`: the maps keep the graph to the embeddings; `batch`: images per call."""
    need = Need(spec.sites, Reduce(heads="mean"), upsample_queries=spec.res, grad=grad)
    drive = Drive("one_step", timestep=spec.timestep, noise=spec.noise)
    return Plan(drive, (need,), context=embeddings, size=(image_size, image_size), batch=batch)


class KeypointMapsHead(Head):
    """StableKeypoints' maps of given images (the item is the (B, 3, S, S) tensor): finish gives (B, N, res, res)
    averaged over heads and sites (only `tokens` (T,) -> (B, T, res, res))."""

    name = "keypoint_maps"

    def __init__(self, spec: MapSettings, embeddings: torch.Tensor, image_size: int, tokens: torch.Tensor | None = None,
                 grad: bool = False):
        self.spec, self.embeddings, self.size, self.tokens, self.grad = spec, embeddings, image_size, tokens, grad

    def plan(self, sites: Mapping[str, Site]) -> Plan:
        return maps_plan(self.spec, self.embeddings, self.size, self.grad)

    def inputs(self, item: torch.Tensor) -> torch.Tensor:
        return item

    def finish(self, view: View, item=None) -> torch.Tensor:
        return token_maps(view, self.spec.sites, self.tokens)


def check_width(bb, embeddings: torch.Tensor) -> None:
    """Refuse embeddings learned on a model of another context width."""
    if embeddings.shape[-1] != bb.context_dim:
        raise DiffprobeError(f"embeddings have width {embeddings.shape[-1]} but the model's cross-attention "
                             f"expects {bb.context_dim}; they were learned on another model")


def site_summary(sites: Mapping[str, Site], names: list[str]) -> list[dict]:
    """JSON-friendly description of the chosen sites (name, divisor, heads)."""
    return [{"name": n, "divisor": sites[n].divisor, "heads": sites[n].heads} for n in names]
