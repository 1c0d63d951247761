"""task=patch: causal tracing between a clean and a corrupted prompt over a generation.

Both prompts are generated from the same seed (or, with image=, from the DDIM inversion of that image under the
clean prompt: a real image's trace; with guidance=1 the clean generation reconstructs the image). For every site
(default: every block's output) and every step, the corrupted generation is run again with that one site at that
one step restored to the clean generation's value (probe.intervene with Set, both rows of a guided batch); the
effect on the output is the share of the distance between the corrupted and the clean image that the restoration
removes:

    effect[site, step] = 1 - |image_patched - image_clean| / |image_corrupt - image_clean|      (L2 over pixels)

and the same with the site restored at every step (the last column).

1 = restoring that site at that step alone gives the clean image; 0 = no effect; below 0 = further away. The
clean values of one site are captured at a time (memory: one site's tensor per step, not sites x steps). Sites are
the loop's items: progress, checkpoints by count, time and Ctrl-C, resume (diffprobe.items).

Writes in out_dir: clean.png, corrupt.png, patch.png (the effect as a site x step map beside both images),
patch.safetensors (effect (sites, steps + 1): the last column restores the site at every step), patch.json (the
prompts, the sites, each site's effect row and the step where it peaks, the corrupted image's distance).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from diffprobe.config import check_values, load_configured_backbone, run_config, section
from diffprobe.data.images import image_to_tensor, load_image
from diffprobe.drives import Drive, ddim_inversion, encode_images, encode_prompt
from diffprobe.errors import DiffprobeError
from diffprobe.hooks import Need, Reduce
from diffprobe.hooks.edits import Set
from diffprobe.io import save_figure, save_json, save_png, save_tensors
from diffprobe.items import IndexedRows, run_items
from diffprobe.runner import Plan, run_plans

log = logging.getLogger(__name__)


@dataclass
class PatchSettings:
    """clean, corrupt: the two prompts; sites: the sites restored (names or globs; null: every block's output);
    steps: generation steps; guidance: its scale (null: the family's); image_size: null for the model's own."""

    LIMITS = {"steps": "1..1000", "guidance": ">= 0", "image_size": "8..16384"}

    clean: str | None = None
    corrupt: str | None = None
    sites: list[str] | None = None
    steps: int = 10
    guidance: float | None = None
    image_size: int | None = None

    def validate(self) -> None:
        for key in ("clean", "corrupt"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise DiffprobeError('task=patch needs clean="a red bird" corrupt="a blue bird"')
        check_values(self, "patch")


def settings_of(cfg: DictConfig) -> PatchSettings:
    """The patch.* keys, validated (no model needed)."""
    settings = section(cfg, "patch", PatchSettings)
    settings.validate()
    return settings


def traced_sites(bb, chosen: list[str] | None) -> list[str]:
    """The feature sites restored: the chosen ones (attention sites are refused: restore their module's output
    through a block site instead), or every block's output."""
    sites = bb.probe.sites
    names = bb.probe.select(chosen) if chosen else [n for n, s in sites.items() if s.kind == "block"]
    wrong = [n for n in names if sites[n].is_attention or sites[n].kind == "modulation"]
    if wrong or not names:
        raise DiffprobeError(f"task=patch restores feature sites (blocks, ResNets); {wrong[0] if wrong else chosen} "
                             "is not one")
    return names


class Tracer:
    """The generations of one causal trace: clean, corrupted, and corrupted with one site restored at one step."""

    def __init__(self, bb, s: PatchSettings, seed: int, image: str | None = None):
        self.bb, self.s, self.seed = bb, s, seed
        self.size = bb.check_image_size(s.image_size)
        self.drive = Drive("generation", num_steps=s.steps, guidance=s.guidance)
        self.start = None if image is None else self.inverted(image)

    def inverted(self, path: str) -> torch.Tensor:
        """The DDIM inversion of the image's centre square under the clean prompt, over the generation's steps: the
        latents both generations start from."""
        x = image_to_tensor(load_image(path), self.size, crop="center")
        with torch.no_grad():
            latents = encode_images(self.bb, x)
            return ddim_inversion(self.bb, latents, encode_prompt(self.bb, [self.s.clean], (self.size, self.size)),
                                  num_steps=self.s.steps)

    def generate(self, prompt: str, need: Need | None = None, edits: dict | None = None):
        """(image (3, H, W) in [0, 1], the capture of `need` (every row of the batch) or None)."""
        plan = Plan(self.drive, (), prompt=(prompt,), size=(self.size, self.size), start=self.start)
        capture = self.bb.probe.capture(need) if need is not None else nullcontext()
        with torch.no_grad(), self.bb.probe.intervene(edits or {}), capture as cache:
            (view,) = run_plans(self.bb, [plan], [None], generator=torch.Generator().manual_seed(self.seed))
        return view.images[0].float(), cache

    def site_effects(self, site: str, clean: torch.Tensor, corrupt: torch.Tensor) -> np.ndarray:
        """(steps + 1,) effect of restoring `site` at each step alone, then at every step."""
        _, cache = self.generate(self.s.clean, Need((site,), Reduce(steps="all")))
        values = cache[site]                                         # (steps, B, C, h, w): both rows of the batch
        base = float((corrupt - clean).norm())
        effects = []
        for steps in [(k,) for k in range(values.shape[0])] + [None]:
            patched, _ = self.generate(self.s.corrupt, edits={site: Set(value=values, per_step=True, steps=steps)})
            effects.append(1 - float((patched - clean).norm()) / base)
        return np.array(effects, np.float32)


def _figure(names: list[str], effect: np.ndarray, clean: np.ndarray, corrupt: np.ndarray, s: PatchSettings):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 1.5 + 0.22 * len(names)))
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 2.5])
    for i, (title, image) in enumerate(((f"clean: {s.clean}", clean), (f"corrupt: {s.corrupt}", corrupt))):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(image)
        ax.set_title(title[:40], fontsize=7)
        ax.axis("off")
    ax = fig.add_subplot(grid[0, 2])
    shown = ax.imshow(effect, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_yticks(range(len(names)), [n.replace(".hook_out", "") for n in names], fontsize=6)
    ax.set_xticks(range(effect.shape[1]), [*map(str, range(effect.shape[1] - 1)), "all"], fontsize=6)
    ax.set_xlabel("step restored (0: the noisiest; all: every step)", fontsize=7)
    ax.set_title("share of the corruption undone", fontsize=8)
    fig.colorbar(shown, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def run(cfg: DictConfig, out_dir: Path) -> dict:
    s = settings_of(cfg)
    seed = run_config(cfg).seed
    image = cfg.get("image")
    if image is not None and not Path(str(image)).is_file():
        raise DiffprobeError(f"image={image}: task=patch traces one image file (its DDIM inversion)")
    bb = load_configured_backbone(cfg)
    names = traced_sites(bb, s.sites)
    tracer = Tracer(bb, s, seed, None if image is None else str(image))
    clean, _ = tracer.generate(s.clean)
    corrupt, _ = tracer.generate(s.corrupt)
    if torch.equal(clean, corrupt):
        raise DiffprobeError("the clean and the corrupted prompt give the same image: nothing to trace")
    rows = IndexedRows(len(names))
    fingerprint = {"model": cfg.model.name, "settings": asdict(s), "seed": seed, "sites": names,
                   "image": None if image is None else str(image)}

    def process(i: int):
        effect = tracer.site_effects(names[i], clean, corrupt)
        return lambda: rows.update(i, effect=effect)

    run_items(len(names), process, {"effects": rows}, out_dir, fingerprint, name="patch", checkpoint_every=1,
              desc="patch sites")
    effect = rows.arrays["effect"]
    pictures = [(x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in (clean, corrupt)]
    save_png(out_dir / "clean.png", pictures[0])
    save_png(out_dir / "corrupt.png", pictures[1])
    save_tensors(out_dir / "patch.safetensors", {"effect": torch.from_numpy(effect)},
                 metadata={"sites": ",".join(names)})
    save_figure(out_dir / "patch.png", _figure(names, effect, *pictures, s))
    summary = {"model": cfg.model.name, "clean": s.clean, "corrupt": s.corrupt, "seed": seed, "steps": s.steps,
               "image": fingerprint["image"],
               "distance_corrupt_clean": float((corrupt - clean).norm()),
               "sites": [{"site": n, "effect_per_step": [round(float(e), 6) for e in row[:-1]],
                          "effect_every_step": round(float(row[-1]), 6), "peak_step": int(row[:-1].argmax())}
                         for n, row in zip(names, effect)]}
    save_json(out_dir / "patch.json", summary)
    log.info("causal trace of %d sites x %d steps in %s", len(names), s.steps, out_dir)
    return summary
