"""Training on planted pairs with a tiny SD 1.5-structured model: the loss falls, PCK rises, resume is exact."""

import numpy as np
import pytest
import torch
from hyperfeatures_fixtures import SIZE, planted_pairs, tiny_sd15

from diffprobe.heads.hyperfeatures.evaluate import evaluate_pairs
from diffprobe.heads.hyperfeatures.extract import ExtractionSettings, layer_names
from diffprobe.heads.hyperfeatures.network import AggregationNetwork, AggregatorSettings
from diffprobe.training.hyperfeatures import FeatureSource, AggregatorTrainSettings, descriptor_fn, pair_order, train

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    bb, probe = tiny_sd15()
    ex = ExtractionSettings(num_steps=2, save_every=1, image_size=SIZE)
    names = layer_names(probe.sites, ex.layers)
    source = FeatureSource(bb, ex, names)
    sites = [probe.sites[n] for n in names]

    def new_net():
        torch.manual_seed(0)
        return AggregationNetwork(AggregatorSettings.from_sites(sites, ex.num_saved, output_size=16, projection_dim=32))

    return planted_pairs(root), source, new_net


def test_training_lowers_loss_and_raises_pck(setup, tmp_path):
    pairs, source, new_net = setup
    net = new_net()
    before = evaluate_pairs(descriptor_fn(net, source), pairs, SIZE).summary()
    # the reference's c2_msra_fill start needs about twice the steps of PyTorch's default init here
    history = train(net, source, pairs, pairs, AggregatorTrainSettings(train_steps=48, val_every=24), tmp_path / "ck",
                    progress=False)
    loss = [v for _, v in history["loss"]]
    assert np.mean(loss[-6:]) < np.mean(loss[:6]) - 1.0
    assert [r[0] for r in history["val"]] == [24, 48]
    after = history["val"][-1][1]
    assert before["pck@0.1_img_per_point"] <= 0.2 and after >= 0.8
    assert history["val"][-1][2] is not None  # the planted pairs have boxes: PCK@0.1_bbox reported too
    assert source.extractions == 6  # each of the 6 images went through the UNet once


def test_resume_continues_exactly(setup, tmp_path):
    pairs, source, new_net = setup
    straight = new_net()
    train(straight, source, pairs, [], AggregatorTrainSettings(train_steps=8, val_every=4), tmp_path / "a", progress=False)
    first = new_net()
    train(first, source, pairs, [], AggregatorTrainSettings(train_steps=4, val_every=4), tmp_path / "b", progress=False)
    resumed = new_net()
    history = train(resumed, source, pairs, [], AggregatorTrainSettings(train_steps=8, val_every=4), tmp_path / "c",
                    resume=tmp_path / "b", progress=False)
    assert [s for s, _ in history["loss"]] == list(range(1, 9))
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, msg=k)


def test_pair_order_is_a_permutation_per_epoch():
    order = [pair_order(5, s, seed=1) for s in range(10)]
    assert sorted(order[:5]) == sorted(order[5:]) == list(range(5))


def test_a_rerun_in_the_same_folder_continues_and_other_settings_are_refused(setup, tmp_path):
    from diffprobe.errors import DiffprobeError

    pairs, source, new_net = setup
    straight = new_net()
    train(straight, source, pairs, [], AggregatorTrainSettings(train_steps=8, val_every=4), tmp_path / "a", progress=False)
    first = new_net()
    train(first, source, pairs, [], AggregatorTrainSettings(train_steps=4, val_every=4), tmp_path / "b", progress=False)
    again = new_net()
    history = train(again, source, pairs, [], AggregatorTrainSettings(train_steps=8, val_every=4), tmp_path / "b", progress=False)
    assert [s for s, _ in history["loss"]] == list(range(1, 9))
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, msg=k)
    with pytest.raises(DiffprobeError, match="other settings.*lr"):
        train(new_net(), source, pairs, [], AggregatorTrainSettings(train_steps=9, val_every=4, lr=5e-3), tmp_path / "b",
              progress=False)
