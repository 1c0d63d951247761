"""DiffSeg (Tian et al., CVPR 2024): zero-shot segmentation from self-attention, as pure tensor functions.

`segment(maps_by_grid, size, params)` turns the head-averaged self-attention probabilities of each
resolution into a label map and its proposals; `vote_words` names segments with cross-attention.
"""

from diffprobe.heads.diffseg.aggregate import aggregate
from diffprobe.heads.diffseg.distance import symmetric_kl
from diffprobe.heads.diffseg.segment import SegmentSettings, SegmentationResult, non_max_suppression, segment

__all__ = ["SegmentSettings", "SegmentationResult", "aggregate", "non_max_suppression", "segment", "symmetric_kl"]
