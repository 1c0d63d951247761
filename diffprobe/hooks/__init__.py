"""diffprobe.hooks: named capture sites of diffusion denoisers and a scoped capture of what they compute.

Depends on torch and diffusers only and never imports the model families: each registers itself in the table of
diffprobe.hooks.families when `diffprobe` is imported (importing diffprobe.hooks does that first) and says how its
sites are enumerated and its attention read. Import it alone in other research code::

    from diffprobe.hooks import ProbeRegistry, Reduce, BatchLayout, Need
    probe = ProbeRegistry(unet)
    with probe.capture("up_blocks.*.attn2.hook_probs", reduce=Reduce(heads="mean")) as cache:
        unet(latents, t, encoder_hidden_states=context)

The same names change what the model computes (diffprobe.hooks.edits)::

    from diffprobe.hooks.edits import Scale
    with probe.intervene({"*.attn2.hook_probs": Scale(columns=(5,), factor=0.0)}):
        unet(latents, t, encoder_hidden_states=context)
"""

from diffprobe.hooks.cache import ActivationCache
from diffprobe.hooks.capture import StopForward
from diffprobe.hooks.errors import SiteNotFound, UnsupportedAttention
from diffprobe.hooks.needs import BatchLayout, Need, Reduce
from diffprobe.hooks.registry import ProbeRegistry
from diffprobe.hooks.sites import Selection, Site, SiteKind

__all__ = ["ActivationCache", "BatchLayout", "Need", "ProbeRegistry", "Reduce", "Selection", "Site", "SiteKind",
           "SiteNotFound", "StopForward", "UnsupportedAttention"]
