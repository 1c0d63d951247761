"""docs/architecture.md's recipes are true: its head example runs as written beside DiffSeg in one pass, and a
model family made as it says (one Family subclass registered, nothing else touched) is found for its model, builds
its tiny backbone, and runs heads and captures."""

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def test_the_head_example_runs_as_written():
    from diffprobe.heads.diffseg.head import DiffSegHead, DiffSegSettings
    from diffprobe.loading import tiny_backbone

    code = re.search(r"## The head protocol\n\n```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    scope = {"backbone": tiny_backbone("sd15"), "DiffSegHead": DiffSegHead, "settings": DiffSegSettings(tau=0.5),
             "pil_image": Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))}
    exec(compile(code, str(DOC), "exec"), scope)
    mine, segments = scope["results"]
    sites = scope["MyHead"]().read(scope["backbone"].probe.sites)
    assert sites and mine.shape == (1, 4 * 4, 77)        # 64 px: an 8 x 8 latent, at divisor 2 4 x 4 queries; 77 tokens
    torch.testing.assert_close(mine.sum(-1), torch.ones(1, 16))     # each query's softmax over the tokens
    assert segments is not None


def test_a_family_added_as_the_recipe_says_is_found_built_and_probed():
    from diffusers import UNet2DConditionModel

    from diffprobe.families import FAMILIES, register
    from diffprobe.families.unet import UNetFamily
    from diffprobe.heads.probe import ProbeHead, ProbeSettings
    from diffprobe.loading import tiny_backbone
    from diffprobe.runner import Item, run_heads

    class ToyUNet(UNet2DConditionModel):
        """A denoiser class of its own (as a new family's would be)."""

    class ToyFamily(UNetFamily):
        denoiser_class = "UNet2DConditionModel"

        def __init__(self):
            super().__init__("toy", lambda config: True, ("sd15",))
            self.tiny_configs = {"toy": self.tiny_configs["sd15"]}

        def matches(self, model):
            return isinstance(model, ToyUNet)

        def build(self, structure, tiny=False, device="cpu"):
            with torch.device(device):
                return ToyUNet(**self.tiny_configs[structure])

    family = register(ToyFamily())
    try:
        bb = tiny_backbone("toy")
        assert bb.family is family and bb.probe.family is family and type(bb.unet) is ToyUNet
        assert tiny_backbone("sd15").family.name == "sd1"            # the others are untouched
        head = ProbeHead(ProbeSettings(sites=["*.attn2.hook_probs"], timestep=100), 64)
        (view,) = run_heads(bb, [head], Item("grey", Image.new("RGB", (64, 64), (128, 128, 128))))
        assert len(view.names) == 16
    finally:
        FAMILIES.remove(family)
