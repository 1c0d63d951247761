"""Pose templates over keypoint sets (seed 003: Yao et al., ACM MM 2023): normalise each set into a unit box,
cluster with k-means, fit new sets to their nearest template with per-axis scale and offset.

Keypoint sets are (N, K, 2) arrays of (x, y) with a visibility mask (N, K); invisible points are missing,
never zeros. Modules: normalise (unit box, per-axis scale), cluster (masked k-means, templates and their
frequencies), fit (nearest template, residuals, outliers, filling missing points).
"""

from diffprobe.heads.templates.cluster import Templates, fit_templates
from diffprobe.heads.templates.fit import TemplateFit, fit_to_templates
from diffprobe.heads.templates.normalise import Normalised, check_sets, normalise

__all__ = ["Normalised", "TemplateFit", "Templates", "check_sets", "fit_templates", "fit_to_templates", "normalise"]
