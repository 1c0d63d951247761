"""The hyperfeature aggregation network: one bottleneck per layer, joint softmax mixing over (layer, step).

    descriptor = sum_{l, s} w[l, s] * B_l(resize(f[l, s]))        w = softmax over all L*S weights

Built from channel counts alone (the registry's Site metadata), so it exists before any image is
seen. Features arrive one saved step at a time through `Aggregation.add`, so memory does not grow
with the number of saved steps S.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffprobe.errors import DiffprobeError
from diffprobe.io import load_tensors, save_json, save_tensors

CONFIG_FILE = "aggregator.json"
WEIGHTS_FILE = "aggregator.safetensors"


@dataclass
class AggregatorSettings:
    """What fixes the network's shape. layers: site names in order; channels: their widths;
    num_steps: S saved steps; output_size: descriptor side (ref 64 = latent side at 512 px)."""

    layers: list[str]
    channels: list[int]
    num_steps: int
    output_size: int = 64
    projection_dim: int = 384
    bottleneck_dim: int | None = None  # default projection_dim // 4 (ref 96)
    max_groups: int = 32
    step_labels: list[float] = field(default_factory=list)  # timestep of each saved step (noise order)

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.channels) or not self.layers:
            raise DiffprobeError(f"aggregator needs one channel count per layer, got {self.layers} / {self.channels}")
        if self.num_steps < 1 or self.output_size < 1 or self.projection_dim < 1:
            raise DiffprobeError("aggregator num_steps, output_size and projection_dim must be positive")
        if self.bottleneck_dim is None:
            self.bottleneck_dim = max(1, self.projection_dim // 4)

    @classmethod
    def from_sites(cls, sites, num_steps: int, **kwargs) -> "AggregatorSettings":
        """From registry Site metadata (names and channels), before any image is seen."""
        sites = list(sites)
        return cls(layers=[s.name for s in sites], channels=[int(s.channels) for s in sites], num_steps=num_steps, **kwargs)


def _groups(channels: int, max_groups: int) -> int:
    """Largest group count <= max_groups dividing `channels` (32 for the reference widths 96 and 384)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class Bottleneck(nn.Module):
    """1x1 conv-GN-ReLU, 3x3 conv-GN-ReLU, 1x1 conv-GN, plus a (1x1 conv + GN) shortcut when widths
    differ; residual add; ReLU. Convs without bias, initialised as the reference's detectron2 block
    (`c2_msra_fill`: Kaiming normal, fan out, ReLU gain). (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, max_groups: int = 32):
        super().__init__()

        def conv_gn(ci: int, co: int, k: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(ci, co, k, padding=k // 2, bias=False), nn.GroupNorm(_groups(co, max_groups), co))

        self.conv1, self.conv2, self.conv3 = conv_gn(c_in, c_mid, 1), conv_gn(c_mid, c_mid, 3), conv_gn(c_mid, c_out, 1)
        self.shortcut = conv_gn(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


def resize(feat: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to (B, C, size, size) (no-op when already that size)."""
    if feat.shape[-2:] == (size, size):
        return feat
    return F.interpolate(feat, size=(size, size), mode="bilinear", align_corners=False)


class AggregationNetwork(nn.Module):
    """L bottlenecks shared across steps and an (L, S) table of mixing logits initialised to 1."""

    def __init__(self, config: AggregatorSettings):
        super().__init__()
        self.config = config
        c = config
        self.bottlenecks = nn.ModuleList(Bottleneck(ch, c.bottleneck_dim, c.projection_dim, c.max_groups) for ch in c.channels)
        self.mixing = nn.Parameter(torch.ones(len(c.layers), c.num_steps))
        self._index = {name: i for i, name in enumerate(c.layers)}

    def mixing_weights(self) -> torch.Tensor:
        """(L, S) softmax over all L*S logits jointly (sums to 1)."""
        return torch.softmax(self.mixing.flatten(), 0).view_as(self.mixing)

    def layer_index(self, name: str) -> int:
        if name not in self._index:
            raise DiffprobeError(f"feature {name!r} is not one of the aggregator's layers {self.config.layers}")
        return self._index[name]

    def project(self, layer: int, feat: torch.Tensor) -> torch.Tensor:
        """B_l(resize(feat)): (B, C_l, h, w) -> (B, D, H, H)."""
        p = next(self.parameters())
        return self.bottlenecks[layer](resize(feat.to(p.device, p.dtype), self.config.output_size))

    def stream(self) -> "Aggregation":
        """A running sum to feed one saved step at a time."""
        return Aggregation(self)

    def forward(self, steps: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """steps[s][layer name] = (B, C, h, w) -> descriptors (B, D, H, H). Holds all inputs; prefer `stream`."""
        agg = self.stream()
        for s, feats in enumerate(steps):
            agg.add(s, feats)
        return agg.result()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, directory: str | Path) -> Path:
        """Write aggregator.safetensors and aggregator.json into `directory`."""
        d = Path(directory)
        save_tensors(d / WEIGHTS_FILE, dict(self.state_dict()), metadata={"format": "diffprobe.hyperfeatures"})
        save_json(d / CONFIG_FILE, asdict(self.config))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "AggregationNetwork":
        """Rebuild from aggregator.json and load aggregator.safetensors; mismatches are DiffprobeErrors."""
        d = Path(directory)
        net = cls(read_config(d / CONFIG_FILE, AggregatorSettings))
        tensors, _ = load_tensors(d / WEIGHTS_FILE)
        try:
            net.load_state_dict(tensors)
        except RuntimeError as exc:
            raise DiffprobeError(f"{d / WEIGHTS_FILE} does not match {CONFIG_FILE}: {str(exc).splitlines()[0]}") from None
        return net


def read_config(path: Path, schema: type):
    """A dataclass from a JSON file a training run wrote; a missing or malformed file is a DiffprobeError."""
    if not path.is_file():
        raise DiffprobeError(f"no {path.name} in {path.parent}: pass the model directory a hyperfeatures training run wrote")
    try:
        return schema(**json.loads(path.read_text()))
    except (TypeError, json.JSONDecodeError) as exc:
        raise DiffprobeError(f"{path} is not a {schema.__name__} ({exc})") from None


class Aggregation:
    """Running weighted sum: add(step, {layer: feat}) per saved step, result() -> (B, D, H, H).

    Holds one (B, D, H, H) accumulator, never the inputs (they are released by the caller after add).
    """

    def __init__(self, net: AggregationNetwork):
        self.net = net
        self.weights = net.mixing_weights()
        self.total: torch.Tensor | None = None
        self.seen: set[tuple[int, int]] = set()

    def add(self, step: int, feats: dict[str, torch.Tensor]) -> None:
        if not 0 <= step < self.net.config.num_steps:
            raise DiffprobeError(f"saved step {step} out of range for an aggregator of {self.net.config.num_steps} steps")
        for name, feat in feats.items():
            layer = self.net.layer_index(name)
            if (layer, step) in self.seen:
                raise DiffprobeError(f"feature {name!r} at saved step {step} was added twice")
            self.seen.add((layer, step))
            term = self.weights[layer, step] * self.net.project(layer, feat)
            self.total = term if self.total is None else self.total + term

    def result(self) -> torch.Tensor:
        c = self.net.config
        expected = len(c.layers) * c.num_steps
        if len(self.seen) != expected:
            raise DiffprobeError(f"aggregator got {len(self.seen)} of {expected} (layer, step) features")
        return self.total

