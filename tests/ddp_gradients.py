"""Run by tests/test_distributed.py, alone or under torchrun: one training step of the hyperfeature aggregator
on synthetic features, writing the gradients the optimiser is handed (first process) to argv[1]."""

import sys
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import save_file

from diffprobe import distributed
from diffprobe.data.pairs_json import CorrespondencePair
from diffprobe.training import hyperfeatures as training
from diffprobe.heads.hyperfeatures.network import AggregationNetwork, AggregatorSettings

LAYERS, CHANNELS = ["a", "b"], [8, 16]


def features(path: str):
    """Two saved steps of two layers, drawn from the image's name: the same in every process."""
    g = torch.Generator().manual_seed(sum(map(ord, path)))
    steps = [{n: torch.randn(1, c, 8, 8, generator=g) for n, c in zip(LAYERS, CHANNELS)} for _ in range(2)]
    return steps, (32, 32)


class Source:
    """Stands in for FeatureSource: features by image name, images of 32 px."""

    extraction = SimpleNamespace(image_size=32)

    def __call__(self, path):
        return features(str(path))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = AggregationNetwork(AggregatorSettings(LAYERS, CHANNELS, num_steps=2, output_size=8, projection_dim=16))
    source = Source()
    rng = np.random.default_rng(0)
    pairs = [CorrespondencePair(f"s{k}", f"t{k}", rng.uniform(0, 32, (5, 2)), rng.uniform(0, 32, (5, 2)))
             for k in range(4)]
    seen = {}

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            seen.update({f"{i}": p.grad.detach().clone() for i, p in enumerate(net.parameters())})
            return super().step(closure)

    training.torch.optim.AdamW = Recording
    training.train(net, source, pairs, [], training.AggregatorTrainSettings(train_steps=1, batch=2, val_every=1), sys.argv[2],
                   progress=False)
    if distributed.shard()[0] == 0:
        save_file(seen, sys.argv[1])


if __name__ == "__main__":
    main()
