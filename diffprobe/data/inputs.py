"""The images a task runs on: the user's `image=` (a file or a folder), or a world scene when none is given."""

from __future__ import annotations

import logging
from pathlib import Path

from diffprobe.data.images import list_images
from diffprobe.io import save_png, save_text

log = logging.getLogger(__name__)

DEMO_SIZE = 256


def input_images(image: str | None, out_dir: Path) -> list[Path]:
    """Paths of the images to process. With no `image`, the world's first test scene is rendered into
    out_dir/demo_scene.png (with its caption beside it) so a task runs meaningfully on a fresh machine."""
    if image:
        return list_images(image)
    from diffprobe.data.world import demo_scene

    scene = demo_scene(0, DEMO_SIZE)
    path = save_png(Path(out_dir) / "demo_scene.png", scene.image)
    save_text(Path(out_dir) / "demo_scene.txt", scene.caption + "\n")
    log.info("no image= given: using a world scene (%s), written to %s", scene.caption, path)
    return [path]
