"""Aggregation network: SD 1.5 parameter count from site metadata, joint softmax, streaming = holding,
save/load round trip."""

import pytest
import torch

from diffprobe.loading import build_denoiser
from diffprobe.errors import DiffprobeError
from diffprobe.heads.hyperfeatures.network import AggregationNetwork, AggregatorSettings, Bottleneck, resize
from diffprobe.hooks import ProbeRegistry


def _hand_count(channels, steps, d=384):
    m = d // 4
    gn = 2 * (m + m + d)  # GroupNorm weight + bias after conv1, conv2, conv3
    per = [c * m + 9 * m * m + m * d + gn + (c * d + 2 * d if c != d else 0) for c in channels]
    return sum(per) + len(channels) * steps


def test_sd15_dims_give_about_6_5m_parameters_and_132_mixing_weights():
    probe = ProbeRegistry(build_denoiser("sd15", device="meta"))
    sites = [probe.sites[n] for n in probe.select("up_blocks.*.resnets.*.hook_residual")]
    assert [s.channels for s in sites] == [1280] * 6 + [640] * 3 + [320] * 3
    net = AggregationNetwork(AggregatorSettings.from_sites(sites, num_steps=11))
    assert net.mixing.numel() == 132
    assert net.num_parameters() == _hand_count([1280] * 6 + [640] * 3 + [320] * 3, 11) == 6_529_668
    assert net.bottlenecks[0].conv1[1].num_groups == 32 and net.bottlenecks[0].conv3[1].num_groups == 32


def _small_net(steps=3, size=8):
    torch.manual_seed(0)
    cfg = AggregatorSettings(layers=["a", "b"], channels=[6, 8], num_steps=steps, output_size=size, projection_dim=16)
    return AggregationNetwork(cfg)


def _features(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(2, 6, 4, 4, generator=g), "b": torch.randn(2, 8, 8, 8, generator=g)} for _ in range(steps)]


def test_joint_softmax_and_weighted_sum_of_bottlenecks():
    net = _small_net()
    with torch.no_grad():
        net.mixing.copy_(torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]]))
    w = net.mixing_weights()
    expected = torch.exp(net.mixing) / torch.exp(net.mixing).sum()
    torch.testing.assert_close(w, expected)
    feats = _features(3)
    out = net(feats)
    manual = sum(w[i, s] * net.bottlenecks[i](resize(feats[s][n], 8)) for s in range(3) for i, n in enumerate("ab"))
    torch.testing.assert_close(out, manual)
    assert out.shape == (2, 16, 8, 8)


def test_streaming_in_any_order_equals_holding_and_checks_completeness():
    net = _small_net()
    feats = _features(3)
    agg = net.stream()
    for s in (2, 0, 1):
        agg.add(s, {"b": feats[s]["b"]})
        agg.add(s, {"a": feats[s]["a"]})
    torch.testing.assert_close(agg.result(), net(feats))
    partial = net.stream()
    partial.add(0, feats[0])
    with pytest.raises(DiffprobeError, match="2 of 6"):
        partial.result()
    with pytest.raises(DiffprobeError, match="twice"):
        partial.add(0, {"a": feats[0]["a"]})
    with pytest.raises(DiffprobeError, match="not one of"):
        partial.add(1, {"zzz": feats[0]["a"]})


def test_save_load_round_trip_and_mismatch(tmp_path):
    net = _small_net()
    with torch.no_grad():
        net.mixing.add_(torch.randn_like(net.mixing))
    net.save(tmp_path / "agg")
    back = AggregationNetwork.load(tmp_path / "agg")
    assert back.config == net.config
    feats = _features(3)
    torch.testing.assert_close(back(feats), net(feats))
    other = _small_net(steps=2)
    (tmp_path / "bad").mkdir()
    other.save(tmp_path / "bad")
    (tmp_path / "bad" / "aggregator.json").write_text((tmp_path / "agg" / "aggregator.json").read_text())
    with pytest.raises(DiffprobeError, match="does not match"):
        AggregationNetwork.load(tmp_path / "bad")
    with pytest.raises(DiffprobeError, match="no aggregator.json"):
        AggregationNetwork.load(tmp_path / "nothing")


def test_bottleneck_convolutions_use_the_references_msra_fill():
    # detectron2's c2_msra_fill: Kaiming normal with fan_out, ReLU gain: std = sqrt(2 / (out_channels * k * k))
    torch.manual_seed(0)
    block = Bottleneck(640, 96, 384)
    for conv, fan_out in ((block.conv1[0], 96), (block.conv2[0], 96 * 9), (block.conv3[0], 384),
                          (block.shortcut[0], 384)):
        assert conv.bias is None
        assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05)
