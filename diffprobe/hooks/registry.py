"""ProbeRegistry: the named capture sites of a model and the scoped, exception-safe capture context."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Iterator, Sequence

from torch import nn

from diffprobe.hooks.cache import ActivationCache
from diffprobe.hooks.families import family_for
from diffprobe.hooks.capture import Capture, StepCallback, StopForward
from diffprobe.hooks.edits import Intervention, check_no_edits
from diffprobe.hooks.needs import Need
from diffprobe.hooks.sites import TEXT_KINDS, Selection, Site, select_sites


class ProbeRegistry:
    """Named capture sites of a denoiser (its model family says how sites are enumerated and attention read, see
    diffprobe.families; `family`: the record, else the table's family_for(model)).

    >>> from diffprobe.loading import tiny_backbone
    >>> unet = tiny_backbone("sd15").unet
    >>> probe = ProbeRegistry(unet)
    >>> len(probe.select("*.attn2.hook_probs")), probe.sites["mid_block.hook_out"].divisor
    (16, 8)
    """

    def __init__(self, model: nn.Module, family=None, text_tokens: int | None = None):
        """`text_tokens`: the length of the model's prompt encoding, recorded on the sites with text on one side
        (`Site.text_tokens`; a Backbone's registry has it)."""
        self.model = model
        self.family = family or family_for(model)
        self.sites: dict[str, Site] = self.family.sites(model)
        if text_tokens is not None:
            self.sites = {n: replace(s, text_tokens=int(text_tokens)) if s.kind in TEXT_KINDS else s
                          for n, s in self.sites.items()}

    def select(self, selection: Selection) -> list[str]:
        """Site names matching `selection`, in execution order.

        Args:
            selection: a glob, a list of names/globs, or a predicate on Site.
        Raises:
            SiteNotFound: a glob or name matches nothing.

        >>> from diffprobe.loading import tiny_backbone
        >>> probe = ProbeRegistry(tiny_backbone("sd15").unet)
        >>> probe.select("up_blocks.3.*.attn1.hook_probs")[0]
        'up_blocks.3.attentions.0.transformer_blocks.0.attn1.hook_probs'
        >>> probe.select(lambda s: s.kind == "resnet" and s.direction == "mid")
        ['mid_block.resnets.0.hook_residual', 'mid_block.resnets.1.hook_residual']
        """
        return select_sites(self.sites, selection)

    def bytes_per_call(self, need: Need, latent_hw: tuple[int, int], batch: int = 1, tokens: int | None = None) -> int:
        """Bytes one model call adds to a capture of `need` (before its step reduction), from metadata alone:
        attention (B, [heads,] Q, K) fp32 per site (Q, K: the site's image positions and/or `tokens` text
        tokens: cross-attention keys, the text side of joint attention; by default each site's `text_tokens`,
        else 77), features (B, C, h, w) in fp32."""
        total = 0
        for name in self.select(need.sites):
            s = self.sites[name]
            h, w = s.resolution(latent_hw)
            if s.is_attention:
                tokens_ = tokens if tokens is not None else (s.text_tokens or 77)
                n = h * w
                if need.upsample_queries and s.kind == "cross_attn":
                    n = need.upsample_queries[0] * need.upsample_queries[1]
                q, k = {"self_attn": (n, n), "cross_attn": (n, tokens_), "joint_attn": (n + tokens_, n + tokens_),
                        "txt2img": (tokens_, n), "txt2txt": (tokens_, tokens_)}[s.kind]
                heads = s.heads if need.reduce.heads == "none" else 1
                total += batch * heads * q * k * 4
            else:
                total += batch * s.channels * (1 if s.kind == "modulation" else h * w) * 4
        return total

    @contextlib.contextmanager
    def capture(
        self,
        selection: Selection | Need | Sequence[Need],
        *,
        early_exit: bool = False,
        on_step: StepCallback | None = None,
        attention: str = "recompute",
        **need: Any,
    ) -> Iterator[ActivationCache | tuple[ActivationCache, ...]]:
        """Capture sites during the model calls made inside the block.

        Args:
            selection: a Need, a list of Needs (one cache each, computed together: a site two needs share
                is recomputed once), or a selection of sites with the Need's other fields as keywords (reduce,
                upsample_queries, grad, layout, rows, device, dtype): one Need built from them.
            early_exit: stop the forward once every site has fired in the current call (StopForward,
                swallowed here): code after that call inside the block does not run. Inside another capture
                of the same model that still records, the forward runs on (the outer capture keeps its sites).
            on_step: fn(step, timestep, tensors) after every call: tensors is {site: tensor} of that call
                (a list of such dicts, one per Need, when a list of Needs was given).
            attention: "recompute" (default: the model keeps its attention kernel, the probabilities are
                recomputed in fp32 and the model's outputs are bit-identical to an uncaptured call) or "reuse"
                (the scaled_dot_product_attention call of each captured layer without gradients or query
                upsampling is answered by an explicit, query-chunked attention whose probabilities are
                kept: cheaper; outputs equal to float rounding; scores in the model's dtype).
        Yields:
            the ActivationCache (a tuple of them for a list of Needs).

        Only the hooks installed here are removed on exit, also when the block raises; captures nest.

        >>> import torch
        >>> from diffprobe.loading import tiny_backbone
        >>> from diffprobe.drives import encode_prompt, unet_call
        >>> from diffprobe.hooks import Reduce
        >>> bb = tiny_backbone("sd15")
        >>> probe = ProbeRegistry(bb.unet)
        >>> with probe.capture("up_blocks.1.*.attn2.hook_probs", reduce=Reduce(heads="mean")) as cache:
        ...     _ = unet_call(bb, torch.zeros(1, 4, 8, 8), 10, encode_prompt(bb, ["a cat"]))
        >>> cache["up_blocks.1.attentions.0.transformer_blocks.0.attn2.hook_probs"].shape  # (B, h*w, tokens)
        torch.Size([1, 4, 77])
        """
        single = not isinstance(selection, (list, tuple)) or not selection or not isinstance(selection[0], Need)
        if isinstance(selection, Need) or not single:
            if need:
                raise TypeError(f"capture got Needs and Need fields ({', '.join(need)}): set them in the Needs")
            needs = [selection] if isinstance(selection, Need) else list(selection)
        else:
            needs = [Need(selection, **need)]
        names = [self.select(n.sites) for n in needs]
        if attention == "reuse":
            check_no_edits(self.model)
        for name in {s for sel in names for s in sel}:
            if self.sites[name].is_attention:
                self.family.check_attention(self.model.get_submodule(self.sites[name].module), name)
        cap = Capture(self, needs, names, early_exit, on_step, single, attention)
        try:
            cap.install()
            yield cap.caches[0] if single else tuple(cap.caches)
        except StopForward as stop:
            if stop.args[0] is not cap:
                raise
        finally:
            cap.remove()

    @contextlib.contextmanager
    def intervene(self, edits: dict) -> Iterator[None]:
        """Change what the model computes at sites, for the calls made inside the block (diffprobe.hooks.edits).

        Args:
            edits: {site name or glob: an Edit or a list of Edits applied in order}: attention edits (Scale, Heads,
                Set of probabilities) at attention sites, feature edits (Add, Clamp, Set) at feature sites.
        Usable alone or with captures (in one pass; a capture inside or around it); only the hooks installed here
        are removed on exit, also when the block raises.

        >>> import torch
        >>> from diffprobe.loading import tiny_backbone
        >>> from diffprobe.drives import encode_prompt, unet_call
        >>> from diffprobe.hooks.edits import Scale
        >>> bb = tiny_backbone("sd15")
        >>> probe, cond = ProbeRegistry(bb.unet), encode_prompt(bb, ["a cat"])
        >>> bare = unet_call(bb, torch.zeros(1, 4, 8, 8), 10, cond)
        >>> with probe.intervene({"*.attn2.hook_probs": Scale(columns=(2,), factor=1.0)}):   # the identity
        ...     same = unet_call(bb, torch.zeros(1, 4, 8, 8), 10, cond)
        >>> torch.equal(same, bare)
        True
        """
        intervention = Intervention(self, edits)
        try:
            intervention.install()
            yield None
        finally:
            intervention.remove()

