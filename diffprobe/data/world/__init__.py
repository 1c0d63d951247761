"""The procedural world: deterministic scenes with exact ground truth, pairs, and real-format writers."""

from diffprobe.data.world.scene import SPLITS, Scene, WorldObject, render_scene, scene_seed
from diffprobe.data.world.vocab import CLASSES, COLOURS, KEYPOINTS, THINGS, vocabulary

__all__ = ["CLASSES", "COLOURS", "KEYPOINTS", "SPLITS", "THINGS", "Scene", "WorldObject", "render_scene",
           "scene_seed", "vocabulary"]
