"""Maps of concepts outside the prompt (ConceptAttention, Helbling et al., ICML 2025), read-only.

    with ConceptAttention(bb, ["bird", "sky", "tree"]) as ca:
        ...                                    # any pass of bb.unet: a generation, an inversion, one step
    maps = ca.maps()                           # (B, C, h, w): per patch, a distribution over the concepts

Joint-attention transformers (SD3/3.5, FLUX; `Family.concept_path == "joint"`), ConceptAttention's own method:
each concept, encoded alone by the family's text encoders (its first token's state, as ConceptAttention keeps T5's
position 0), goes through the context embedder and then every joint block as a text stream of its own, with the
prompt stream's weights and the AdaLN-Zero modulation of the timestep and guidance with a zero pooled vector. In
each block the concepts attend to [concepts, image]; nothing attends to them, so the image and prompt streams are
untouched (the model's outputs are bit-identical: its attention call is answered by the model's own SDPA call,
diffprobe.hooks.kernel, and the concept rows are computed beside it). A block's map: the dot product of the image's
and the concepts' attention outputs before the output projection (heads concatenated), softmax over the concepts;
the maps of the chosen blocks (default: the last four joint blocks, ConceptAttention's 15..18 of FLUX's 19) are
averaged over blocks and calls (a running mean: memory flat in the steps).

Cross-attention models (UNets, PixArt, diffprobe-mini and -mini-dit; `concept_path == "cross"`), the read-only
analogue: there is no text stream to run concepts through, so each concept's state, made into the attention's
context as the model makes it (PixArt's caption projection), gives keys and values by the layer's own projections;
`space="output"` (default, chosen on WorldBench's validation scenes) is the softmax over concepts of the dot product
of the image's attention output (before to_out) with each concept's value, the closest analogue of
ConceptAttention's output space; `space="keys"` the softmax over the concepts of the image queries' scaled dot
products with the concept keys, heads averaged (the cross-attention the image would pay them as a whole prompt).
Concepts never enter the model's attention. Limits: docs/heatmaps.md.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from diffprobe.errors import DiffprobeError
from diffprobe.families.base import call_arguments
from diffprobe.hooks.attention import query_grid, split_heads
from diffprobe.hooks.kernel import answer_attention
from diffprobe.hooks.sites import select_sites

SPACES = ("output", "keys")


def encode_concepts(bb, concepts: Sequence[str]) -> torch.Tensor:
    """(C, D) text-encoder states of the concepts, each encoded alone by the family's prompt encoding; a concept's
    state is its first token's (its first word's first column, as the backbone's word rule finds it)."""
    if not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
        raise DiffprobeError("concepts must be a non-empty list of words, e.g. concepts=[bird,sky,tree]")
    size = (bb.sample_size * bb.grid_factor,) * 2
    states = []
    with torch.no_grad():
        for concept in concepts:
            first = concept.split()[0]
            column = bb.word_positions(concept, [first])[0][0]
            states.append(bb.family.encode_prompt(bb, [concept], size).context[0, column])
    return torch.stack(states)


def concept_attention(q_c: torch.Tensor, k_c: torch.Tensor, v_c: torch.Tensor, k_x: torch.Tensor,
                      v_x: torch.Tensor, scale: float) -> torch.Tensor:
    """The concepts' attention over [concepts, image]: queries (B, h, C, d), keys and values of the concepts and
    of the image (B, h, N, d) -> (B, h, C, d), in fp32."""
    keys, values = torch.cat([k_c, k_x], 2).float(), torch.cat([v_c, v_x], 2).float()
    return torch.softmax(q_c.float() @ keys.transpose(-1, -2) * scale, -1) @ values


def concept_scores(attended: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """ConceptAttention's map of one block: the concepts' and the image's attention outputs, (B, h, C, d) and
    (B, h, N, d), dotted with heads concatenated, softmax over the concepts -> (B, C, N)."""
    return torch.einsum("bhcd,bhnd->bcn", attended.float(), image.float()).softmax(1)


class MapMean:
    """The running mean of (B, C, N) maps over layers and calls, each kept on its own grid until read."""

    def __init__(self):
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.count = 0

    def add(self, probs: torch.Tensor, latent_hw: tuple[int, int] | None) -> None:
        grid = query_grid(probs.shape[-1], latent_hw)
        maps = rearrange(probs.float(), "b c (h w) -> b c h w", h=grid[0], w=grid[1])
        self.sums[grid] = self.sums[grid] + maps if grid in self.sums else maps.clone()
        self.count += 1

    def mean(self) -> torch.Tensor:
        """(B, C, h, w) on the finest grid, coarser grids resized bilinearly (a linear map: resizing the sums is
        resizing every map)."""
        if not self.count:
            raise DiffprobeError("concept maps: no denoiser call ran inside the `with` block")
        top = max(self.sums, key=lambda g: g[0] * g[1])
        total = sum(F.interpolate(s, size=top, mode="bilinear", align_corners=False) if g != top else s
                    for g, s in self.sums.items())
        return total / self.count


def concept_blocks_default(count: int) -> list[int]:
    """ConceptAttention's layers: the last four joint blocks (15..18 of FLUX's 19)."""
    return list(range(max(0, count - 4), count))


class ConceptAttention:
    """Concept maps over every denoiser call made inside the `with` block; see the module docstring.
    blocks: joint-block indices whose maps are averaged (joint path; None: the last four); sites: cross-attention
    site names or globs (cross path; None: every cross-attention site); space: "output" or "keys" (cross path)."""

    def __init__(self, bb, concepts: Sequence[str], blocks: Sequence[int] | None = None,
                 sites: str | Sequence[str] | None = None, space: str = "output"):
        family, model = bb.family, bb.unet
        if family.concept_path is None:
            raise DiffprobeError(f"{bb.name}: concept maps are not supported for the {family.name} family")
        if space not in SPACES:
            raise DiffprobeError(f"concept space must be one of {SPACES}, not {space!r}")
        self.bb, self.model, self.family, self.space = bb, model, family, space
        self.concepts = list(concepts)
        self.states = encode_concepts(bb, self.concepts)
        self.joint = family.concept_path == "joint"
        if self.joint:
            self.blocks = family.concept_blocks(model)
            chosen = concept_blocks_default(len(self.blocks)) if blocks is None else [int(b) for b in blocks]
            if not chosen or any(not 0 <= b < len(self.blocks) for b in chosen):
                raise DiffprobeError(f"concept blocks {chosen} are not among the {len(self.blocks)} joint blocks")
            self.chosen = sorted(set(chosen))
        else:
            known = bb.probe.sites
            names = select_sites(known, sites) if sites is not None else list(known)
            self.sites = [n for n in names if known[n].kind == "cross_attn" and known[n].part is None]
            if not self.sites:
                raise DiffprobeError(f"{bb.name}: no cross-attention site to read concepts from")
        self._handles: list = []
        self.mean = MapMean()
        self.calls, self.latent_hw = 0, None

    # -- hooks ----------------------------------------------------------------------------------------------------

    def __enter__(self) -> "ConceptAttention":
        self._handles.append(self.model.register_forward_pre_hook(self._on_call, with_kwargs=True))
        try:
            if self.joint:
                self._hook_joint()
            else:
                self._hook_cross()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _on_call(self, model, args, kwargs):
        size, _ = self.family.model_call(model, args, kwargs)
        self.latent_hw, self._stream = tuple(int(s) for s in size), None
        self.calls += 1

    def _hook_joint(self) -> None:
        model = self.model
        self._handles.append(model.time_text_embed.register_forward_hook(self._concept_embedding, with_kwargs=True))
        last = self.chosen[-1]
        for i, (path, block) in enumerate(self.blocks[:last + 1]):
            text_first = bool(self.bb.probe.sites[f"{path}.attn.hook_probs"].text_first)
            self._handles.append(block.register_forward_pre_hook(self._block_start(block), with_kwargs=True))
            self._handles += answer_attention(block.attn, f"{path}.attn",
                                              self._joint_kernel(block, text_first, i in self.chosen))
            self._handles.append(block.register_forward_hook(self._block_end(block)))

    def _concept_embedding(self, module, args, kwargs, output):
        """The concepts' conditioning vector: the model's timestep (and guidance) embedding with a zero pooled text
        vector; and the concept stream's start, the context embedder's projection of the concepts' states."""
        bound = {k: v for k, v in call_arguments(module, args, kwargs).items() if k != "self"}
        pooled = next(reversed(bound))   # the pooled text projection is the last argument
        bound[pooled] = torch.zeros_like(bound[pooled])
        with torch.no_grad():
            self._temb = module.forward(**bound)
            start = self.family.attention_context(self.model, self.states[None].to(output.dtype))
        self._stream = start.expand(output.shape[0], -1, -1)

    def _block_start(self, block):
        def hook(mod, args, kwargs):
            if self._stream is None:
                raise DiffprobeError("concept maps: the model's joint blocks ran before its timestep embedding")
            self._n_image = call_arguments(mod, args, kwargs)["hidden_states"].shape[1]
            with torch.no_grad():
                norm = block.norm1_context   # AdaLN-Zero (emb=), or a text stream's last block's continuous AdaLN
                mods = norm(self._stream, self._temb) if norm.__class__.__name__ == "AdaLayerNormContinuous" \
                    else norm(self._stream, emb=self._temb)
                mods = mods if isinstance(mods, tuple) else (mods,)
                attn = block.attn
                q, k, v = (split_heads(proj(mods[0]), attn.heads) for proj in
                           (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
                if attn.norm_added_q is not None:
                    q, k = attn.norm_added_q(q), attn.norm_added_k(k)
            self._mods, self._qkv = mods, (q, k, v)
        return hook

    def _joint_kernel(self, block, text_first: bool, keep: bool):
        def kernel(q, k, v, bias, scale, original):
            out = original()                                           # the model's own attention, unchanged
            n, total = self._n_image, q.shape[2]
            image = slice(total - n, total) if text_first else slice(0, n)
            q_c, k_c, v_c = self._qkv
            with torch.no_grad():   # concepts attend to [concepts, image] (RoPE at zero positions: the identity)
                attended = concept_attention(q_c, k_c, v_c, k[:, :, image], v[:, :, image], scale)
                self._attended = rearrange(attended, "b h c d -> b c (h d)").to(q.dtype)
                if keep:
                    self.mean.add(concept_scores(attended, out[:, :, image]), self.latent_hw)
            return out
        return kernel

    def _block_end(self, block):
        def hook(mod, args, output):
            with torch.no_grad():
                self._stream = self.family.concept_stream_update(block, self._stream, self._mods, self._attended)
        return hook

    def _hook_cross(self) -> None:
        with torch.no_grad():
            self._context = self.family.attention_context(self.model, self.states[None].to(self.bb.dtype))
        for name in self.sites:
            attn = self.model.get_submodule(self.bb.probe.sites[name].module)
            self._handles.append(attn.register_forward_pre_hook(self._cross_queries(attn), with_kwargs=True))
            self._handles.append(attn.to_out[0].register_forward_pre_hook(self._cross_map(attn)))

    def _cross_queries(self, attn):
        def hook(mod, args, kwargs):
            hidden, _, _ = self.family.attention_call(args, kwargs)
            self._hidden = hidden
        return hook

    def _cross_map(self, attn):
        def hook(mod, args):
            with torch.no_grad():
                if self.space == "keys":   # (B, h, N, d) scaled queries against (1, h, C, d) concept keys
                    q, k, _ = self.family.attention_qk(attn, self._hidden, self._context, None)
                    probs = (q @ k.transpose(-1, -2)).softmax(-1).mean(1).transpose(1, 2)
                else:                      # the image's attention output (B, N, h*d) against the concepts' values
                    values = attn.to_v(self._context).float()
                    probs = torch.einsum("bnd,cd->bcn", args[0].float(), values[0]).softmax(1)
                self.mean.add(probs, self.latent_hw)
        return hook

    # -- results --------------------------------------------------------------------------------------------------

    def maps(self) -> torch.Tensor:
        """(B, C, h, w): the mean of every kept (layer, call) concept distribution, on the finest grid (coarser
        layers bilinearly resized); each patch's values sum to 1 over the concepts."""
        return self.mean.mean()

    def image_size(self, grid_factor: int) -> tuple[int, int]:
        """(H, W) pixels of the last call's image: its latent size (in the units of a site's divisor) times the
        backbone's grid_factor."""
        return self.latent_hw[0] * grid_factor, self.latent_hw[1] * grid_factor

    def image_maps(self, size: tuple[int, int]) -> torch.Tensor:
        """(B, C, H, W): maps() resized bilinearly to an image's size."""
        return F.interpolate(self.maps(), size=size, mode="bilinear", align_corners=False)
