"""diffprobe.hooks: named capture sites of diffusers UNets and a scoped capture of what they compute.

Depends on torch and diffusers only; import it alone in other research code::

    from diffprobe.hooks import ProbeRegistry, Reduce, BatchLayout
    probe = ProbeRegistry(unet)
    with probe.capture("up_blocks.*.attn2.hook_probs", reduce=Reduce(heads="mean")) as cache:
        unet(latents, t, encoder_hidden_states=context)
"""

from diffprobe.hooks.cache import ActivationCache, BatchLayout, Reduce
from diffprobe.hooks.registry import ProbeRegistry, StopForward
from diffprobe.hooks.sites import Site

__all__ = ["ActivationCache", "BatchLayout", "ProbeRegistry", "Reduce", "Site", "StopForward"]
