"""The table of model families: per family, how capture sites are enumerated, how attention probabilities
are recomputed from a module's inputs, how conditioning is built and how the denoiser is called.

Depends on torch and diffusers only (as diffprobe.hooks, which reads sites and attention through it).
Adding a family is one module defining a `Backend` subclass, registered with `register`, plus its golden
site list under tests/golden/. `backend_for(model)` picks the first registered backend that claims a model.
"""

from diffprobe.backends.base import BACKENDS, Backend, Conditioning, backend_for, backend_named, register
from diffprobe.backends import unet as _unet  # noqa: F401  (registers the UNet families)
from diffprobe.backends import dit as _dit  # noqa: F401  (registers PixArt, SD3 and FLUX)

__all__ = ["BACKENDS", "Backend", "Conditioning", "backend_for", "backend_named", "register"]
