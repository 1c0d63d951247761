"""Localisation of words by their cross-attention refined over the self-attention graph (seed 004's idea,
training-free): refine (the operators: raw, attention powers, random walk, Laplacian diffusion) and head
(the runner's head: maps, masks and boxes per word)."""

from diffprobe.heads.localize.head import Localization, LocalizeHead, LocalizeSettings
from diffprobe.heads.localize.refine import METHODS, RefineSettings, refine

__all__ = ["METHODS", "Localization", "LocalizeHead", "LocalizeSettings", "RefineSettings", "refine"]
