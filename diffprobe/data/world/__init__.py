"""The procedural world: deterministic scenes with exact ground truth, pairs, and real-format writers."""

from diffprobe.data.world.scene import SPLITS, Scene, WorldObject, render_scene, scene_seed
from diffprobe.data.world.vocab import CLASSES, COLOURS, KEYPOINTS, THINGS, vocabulary


def demo_scene(index: int = 0, size: int = 64) -> Scene:
    """Test-split scene `index`: the image tasks fall back to when none is given (scene.image, .caption)."""
    return render_scene(scene_seed("test", index), size)


__all__ = ["CLASSES", "COLOURS", "KEYPOINTS", "SPLITS", "THINGS", "Scene", "WorldObject", "demo_scene",
           "render_scene", "scene_seed", "vocabulary"]
