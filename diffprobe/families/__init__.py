"""Model families, one module each (unet.py: SD 1.x, 2.x, XL and other UNets; pixart.py, sd3.py, flux.py,
auraflow.py: diffusion transformers), every module in this package imported here so each registers itself in the
table diffprobe.hooks reads (diffprobe.hooks.families). A family is one record (diffprobe.families.base.Family):
adding one is a module here and its golden site list under tests/golden/.
"""

import importlib
import pkgutil

from diffprobe.families.base import Conditioning, Family, TextPart, TextStream, register, token_ids
from diffprobe.hooks.families import FAMILIES, family_for, family_named

SHARED = ("base", "tiny", "transformer")   # modules of what families share, not families

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FAMILIES", "Conditioning", "Family", "TextPart", "TextStream", "family_for", "family_named", "register", "token_ids"]
