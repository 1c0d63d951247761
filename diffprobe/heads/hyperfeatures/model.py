"""A hyperfeature model = aggregation network + the extraction it was trained on; descriptor functions
for evaluation and matching (full model, the pruned ablation, one raw layer).

Saved as a directory: aggregator.safetensors, aggregator.json (network shape) and extraction.json
(layers, process, steps, image size), so evaluation extracts exactly what training saw.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.heads.hyperfeatures.evaluate import Describe, prepare_image
from diffprobe.heads.hyperfeatures.extract import (
    AUTO,
    ExtractionSettings,
    default_layers,
    extract_descriptors,
    extract_features,
    image_generator,
    layer_names,
    run_extraction,
)
from diffprobe.heads.hyperfeatures.network import AggregationNetwork, AggregatorSettings, read_config, resize
from diffprobe.io import save_json

EXTRACTION_FILE = "extraction.json"
RAW_LAYER = "up_blocks.1.resnets.0.hook_residual"  # layer 4 of SD 1.5: the paper's SD-Layer-4 baseline


@dataclass
class HyperfeatureModel:
    net: AggregationNetwork
    extraction: ExtractionSettings

    @classmethod
    def build(cls, sites, extraction: ExtractionSettings, output_size: int, projection_dim: int = 384,
              seed: int = 0, step_labels: list[float] | None = None) -> "HyperfeatureModel":
        """A fresh network for the extraction's layers (channels from the registry) and saved steps;
        step_labels: the timestep of each saved step (for figures)."""
        names = layer_names(sites, extraction.layers)
        torch.manual_seed(seed)
        cfg = AggregatorSettings.from_sites([sites[n] for n in names], extraction.num_saved,
                                          output_size=output_size, projection_dim=projection_dim,
                                          step_labels=list(step_labels or []))
        return cls(AggregationNetwork(cfg), extraction)

    def save(self, directory: str | Path) -> Path:
        self.net.save(directory)
        return self.save_extraction(directory)

    def save_extraction(self, directory: str | Path) -> Path:
        """Only extraction.json (e.g. beside training checkpoints, whose weights the trainer writes)."""
        save_json(Path(directory) / EXTRACTION_FILE, asdict(self.extraction))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> "HyperfeatureModel":
        d = Path(directory)
        net = AggregationNetwork.load(d)
        extraction = read_config(d / EXTRACTION_FILE, ExtractionSettings)
        if extraction.num_saved != net.config.num_steps:
            raise DiffprobeError(f"{d}: {extraction.num_saved} saved steps but the aggregator has {net.config.num_steps}")
        return cls(net, extraction)

    def check_backbone(self, sites) -> None:
        """The backbone must have the layers and channel counts the network was built for."""
        for name, ch in zip(self.net.config.layers, self.net.config.channels):
            site = sites.get(name)
            if site is None or site.channels != ch:
                got = "missing" if site is None else f"{site.channels} channels"
                raise DiffprobeError(f"aggregator layer {name} ({ch} channels) does not fit this model ({got}): "
                                     "use the model it was trained with")

    def top_layer_step(self) -> tuple[int, int, float]:
        """(layer index, saved-step index, weight) of the largest mixing weight (the pruned ablation's pick)."""
        w = self.net.mixing_weights().detach()
        i = int(w.argmax())
        return i // w.shape[1], i % w.shape[1], float(w.flatten()[i])


def cached(fn: Callable[[Path], tuple[torch.Tensor, tuple[int, int]]], capacity: int = 32) -> Describe:
    """Memoise a describe function on the last `capacity` paths (pairs reuse images)."""
    store: OrderedDict[str, tuple[torch.Tensor, tuple[int, int]]] = OrderedDict()

    def describe(path: Path):
        key = str(path)
        if key not in store:
            store[key] = fn(Path(path))
            while len(store) > capacity:
                store.popitem(last=False)
        store.move_to_end(key)
        return store[key]

    return describe


def hyperfeature_describer(model: HyperfeatureModel, bb, seed: int = 0) -> Describe:
    """path -> ((D, H, H) hyperfeatures, original (H, W)); every saved step streamed through the network."""
    model.check_backbone(bb.probe.sites)

    def describe(path: Path):
        x, hw = prepare_image(path, model.extraction.image_size)
        with torch.no_grad():
            d = extract_descriptors(bb, model.net, x, model.extraction, generator=image_generator(seed, x))
        return d[0], hw

    return cached(describe)


def single_map_describer(bb, extraction: ExtractionSettings, layer: str, call: int, output_size: int,
                         project: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0) -> Describe:
    """path -> one layer at one inversion call, resized to output_size (raw), or through `project`."""
    one = ExtractionSettings(**{**asdict(extraction), "layers": [layer], "saved_steps": [call]})

    def describe(path: Path):
        x, hw = prepare_image(path, one.image_size)
        with torch.no_grad():
            feat = extract_features(bb, x, one, layers=[layer], generator=image_generator(seed, x))[0][layer]
            d = project(feat) if project is not None else resize(feat.float(), output_size)
        return d[0], hw

    return cached(describe)


def resolve_raw_layer(sites, layer: str) -> str:
    """The single-layer baseline's layer; "auto": SD's layer 4 (RAW_LAYER) on a UNet that has it, else the
    output of the middle transformer block (of a UNet without it, its middle decoder ResNet)."""
    if layer != AUTO:
        return layer
    if RAW_LAYER in sites:
        return RAW_LAYER
    names = default_layers(sites)
    return names[len(names) // 2]


def raw_layer_describer(bb, layer: str, image_size: int, seed: int = 0) -> Describe:
    """One raw layer ("auto": `default_raw_layer`) at the clean t=-1 step at latent resolution (the paper's
    SD-Layer-4 baseline for layer up_blocks.1.resnets.0); no training needed."""
    layer = resolve_raw_layer(bb.probe.sites, layer)
    if layer not in bb.probe.sites:
        raise DiffprobeError(f"raw layer {layer!r} is not a site of this model")
    one = ExtractionSettings(layers=[layer], process="one_step", image_size=image_size)
    return single_map_describer(bb, one, layer, 0, image_size // bb.vae_factor, seed=seed)


def pruned_describers(model: HyperfeatureModel, bb, seed: int = 0) -> dict[str, Describe]:
    """The pruned ablation: the top-weighted (layer, step) alone, raw ("pruned_raw", SD-Layer-Pruned)
    and through its trained bottleneck ("pruned_bottleneck", Ours-Pruned)."""
    layer, step, _ = model.top_layer_step()
    name = model.net.config.layers[layer]
    call = model.extraction.saved_calls()[step]
    size = model.net.config.output_size
    return {
        "pruned_raw": single_map_describer(bb, model.extraction, name, call, size, seed=seed),
        "pruned_bottleneck": single_map_describer(
            bb, model.extraction, name, call, size, project=lambda f: model.net.project(layer, f), seed=seed),
    }


def generated_pair(bb, prompts: list[str], model: HyperfeatureModel | None = None, raw_layer: str = RAW_LAYER,
                   num_steps: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images and descriptors from their own generation: ((B, D, h, w), images (B, 3, H, W) in [0, 1]).

    With a model: its saved steps mirrored into generation order, so inversion-trained weights apply with
    the timesteps flipped (the paper's transfer). Without: raw_layer at the last, least noisy call.
    """
    gen = torch.Generator().manual_seed(seed)
    if model is not None:
        model.check_backbone(bb.probe.sites)
        agg = model.net.stream()
        _, images = run_extraction(bb, None, replace(model.extraction, process="generation"), agg.add,
                                   layers=model.net.config.layers, prompts=prompts, generator=gen)
        return agg.result(), images
    raw_layer = resolve_raw_layer(bb.probe.sites, raw_layer)
    if raw_layer not in bb.probe.sites:
        raise DiffprobeError(f"raw layer {raw_layer!r} is not a site of this model")
    one = ExtractionSettings(layers=[raw_layer], process="generation", num_steps=num_steps, saved_steps=[0])
    held: dict[str, torch.Tensor] = {}
    _, images = run_extraction(bb, None, one, lambda s, f: held.update(f), layers=[raw_layer],
                               prompts=prompts, generator=gen)
    return resize(held[raw_layer].float(), images.shape[-1] // bb.vae_factor), images
