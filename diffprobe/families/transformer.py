"""What the diffusers diffusion transformers share (pixart.py, sd3.py, flux.py, auraflow.py).

Sites come from the module tree in execution order: per transformer block its attention module(s), then the
block's output (`hook_out`, the image tokens as a (C, h, w) map on the patch grid). PixArt's attention is
recomputed from the module's inputs like the UNet's; SD3's and FLUX's attention is captured at the module's
scaled_dot_product_attention call (diffprobe.hooks.kernel), where q and k are exactly what the model uses.
Per-block AdaLN modulation is a site of its own (`hook_modulation`, kind `modulation`): the (B, k * C) output
of the block's AdaLN projection, diffusers' shift, scale and gate vectors in its chunk order, so a head can
see (and undo) what the timestep does to `hook_out`, whose massive activations it explains.
"""

from __future__ import annotations

from typing import Any

from einops import rearrange
import torch
from torch import nn

from diffprobe.families.base import Family
from diffprobe.hooks.sites import JOINT_PARTS, OUT, PROBS, Site

MODULATION = "hook_modulation"


def attention_sites(path: str, attn: nn.Module, block: int, direction: str, divisor: int, joint: bool,
                     text_first: bool | None, kind: str = "self_attn") -> list[Site]:
    """The sites of one attention module: one map, or a joint map and its four blocks."""
    common = dict(direction=direction, block=block, divisor=divisor, heads=int(attn.heads),
                  channels=int(attn.to_q.in_features), order=0, module=path)
    if not joint:
        context = attn.to_k.in_features
        return [Site(name=f"{path}.{PROBS}", kind=kind, context_dim=int(context), **common)]
    context = attn.add_k_proj.in_features if getattr(attn, "add_k_proj", None) is not None else attn.to_k.in_features
    sites = [Site(name=f"{path}.{PROBS}", kind="joint_attn", context_dim=int(context), text_first=text_first,
                  **common)]
    sites += [Site(name=f"{path}.hook_{part}", kind=kind_, context_dim=int(context), part=part,
                   text_first=text_first, **common) for part, kind_ in JOINT_PARTS.items()]
    return sites


def modulation_site(path: str, block: nn.Module, index: int, direction: str, divisor: int, norm: str) -> list[Site]:
    """The block's AdaLN modulation (the output of its norm module's projection), when it has one: it runs
    first in the block."""
    module = getattr(block, norm, None)
    if module is None or not hasattr(module, "linear"):
        return []
    return [Site(name=f"{path}.{MODULATION}", kind="modulation", direction=direction, block=index, divisor=divisor,
                 heads=None, channels=int(module.linear.out_features), order=0, module=f"{path}.{norm}.linear")]


def out_site(path: str, index: int, direction: str, divisor: int, channels: int) -> Site:
    """The block's image-token output, the last of its sites to fire."""
    return Site(name=f"{path}.{OUT}", kind="block", direction=direction, block=index, divisor=divisor, heads=None,
                channels=channels, order=0, module=path)


def numbered(sites: list[Site]) -> dict[str, Site]:
    return {s.name: Site(**{**s.__dict__, "order": i}) for i, s in enumerate(sites)}


class TransformerFamily(Family):
    """What the diffusers transformers share: patch-grid sites and image-token block outputs."""

    def feature_module(self, model: nn.Module, site) -> nn.Module:
        return model.get_submodule(site.module)

    def feature_tensor(self, site, output: Any, grid: tuple[int, int], call: tuple) -> torch.Tensor:
        """hook_out: the block's image tokens (B, h*w, C) as (B, C, h, w); hook_modulation: (B, D) as is."""
        if site.kind == "modulation":
            return output
        tokens = output[1] if isinstance(output, tuple) else output
        return rearrange(tokens, "b (h w) c -> b c h w", h=grid[0], w=grid[1])


    def put_feature(self, site, output: Any, value: torch.Tensor, grid: tuple[int, int]) -> Any:
        """hook_out: (B, C, h, w) back to the block's image tokens in its output; hook_modulation: as is."""
        if site.kind == "modulation":
            return value
        tokens = rearrange(value, "b c h w -> b (h w) c")
        return (output[0], tokens, *output[2:]) if isinstance(output, tuple) else tokens


class JointAttentionFamily(TransformerFamily):
    """Rectified-flow transformers with joint attention, captured at the SDPA call."""

    captures_at_kernel = True
    flow_matching = True

    def check_attention(self, module: nn.Module, name: str) -> None:
        """Nothing to refuse up front: a processor that does not call SDPA once is refused when it runs."""

    def noisy_latents(self, bb, latents: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Rectified flow: x_t = (1 - s) x_0 + s e with s = t / num_train_timesteps (SD3's and FLUX's training)."""
        s = t / bb.scheduler.config.num_train_timesteps
        return (1 - s) * latents + s * noise

    concept_path = "joint"

    def attention_context(self, model: nn.Module, states: torch.Tensor) -> torch.Tensor:
        """The joint blocks' text stream starts from the context embedder's projection of the states."""
        return model.context_embedder(states)

    def concept_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """[(path, block)] of the joint (two-stream) blocks a concept stream runs through, in order."""
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(model.transformer_blocks)]

    def concept_stream_update(self, block: nn.Module, c: torch.Tensor, mods: tuple, attended: torch.Tensor
                              ) -> torch.Tensor:
        """An MM-DiT block's text-stream residual update (SD3's and FLUX's joint blocks) applied to concept tokens
        c (B, C, D), given their AdaLN-Zero modulation `mods` (norm, gate_msa, shift_mlp, scale_mlp, gate_mlp) and
        their attention output before the projection (B, C, D): c + gate * proj(o), then the gated MLP on the
        modulated second norm. A block whose text stream ends in it (SD3's last, context_pre_only) returns c."""
        if len(mods) == 1:
            return c
        _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        c = c + gate_msa[:, None] * block.attn.to_add_out(attended)
        hidden = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return c + gate_mlp[:, None] * block.ff_context(hidden)

