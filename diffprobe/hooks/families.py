"""The table of model families the capture reads sites and attention through.

A family (a `diffprobe.families.Family`) registers itself here when its module is imported (importing `diffprobe`
imports them all); the hooks look families up in this table and never import them, so the arrow runs one way.
"""

from __future__ import annotations

from torch import nn

from diffprobe.errors import DiffprobeError

FAMILIES: list = []


def register(family):
    """Add a family to the table (families registered earlier are tried first); returns it."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"a model family named {family.name!r} is already registered")
    FAMILIES.append(family)
    return family


def family_for(model: nn.Module):
    """The registered family that describes the denoiser `model`; a DiffprobeError naming the class when none does."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    names = ", ".join(f.name for f in FAMILIES)
    raise DiffprobeError(f"no diffprobe model family describes a {type(model).__name__} (known: {names})")


def family_named(name: str):
    for family in FAMILIES:
        if family.name == name:
            return family
    raise DiffprobeError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
