"""Loss and matching on planted descriptor maps with known answers."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError
from diffprobe.heads.hyperfeatures.loss import correspondence_loss, to_grid
from diffprobe.heads.hyperfeatures.matching import DescriptorField, match_points


def test_to_grid_rounds_and_clips():
    # the reference: round(clip(p * 64 / W, 0, 63)) with np.round's halves to even: 263 -> 32.875 -> 33,
    # 20 -> 2.5 -> 2, 28 -> 3.5 -> 4; a non-square image scales each axis by its own side
    pts = torch.tensor([[0.0, 0.0], [511.0, 511.0], [600.0, -5.0], [263.0, 7.9], [20.0, 28.0]])
    cells = to_grid(pts, (512, 512), 64)
    assert cells.tolist() == [[0, 0], [63, 63], [63, 0], [33, 1], [2, 4]]
    assert to_grid(torch.tensor([[100.0, 100.0]]), (200, 400), 64).tolist() == [[16, 32]]


def test_loss_matches_hand_computation_and_is_symmetric():
    # 2 channels, 1 x 3 maps; unit vectors at angles 0, 90, 180 degrees
    a = torch.tensor([[[1.0, 0.0, -1.0]], [[0.0, 1.0, 0.0]]])
    b = a.clone()
    ca, cb = torch.tensor([[0, 0]]), torch.tensor([[0, 0]])
    t = 0.5
    # cos(a0, b) = [1, 0, -1] -> CE = -log softmax([2, 0, -2])[0]
    ce = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert correspondence_loss(a, b, ca, cb, t).item() == pytest.approx(ce, rel=1e-6)
    # scale invariance (cosine) and symmetry of the two directions
    assert correspondence_loss(3 * a, b, ca, cb, t).item() == pytest.approx(ce, rel=1e-6)
    with pytest.raises(DiffprobeError):
        correspondence_loss(a, b[:, :, :2], ca, cb)


def test_loss_lower_for_matching_descriptors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 8, 8, generator=g)
    b_match = torch.roll(a, shifts=(1, 2), dims=(1, 2))  # cell (x, y) moves to (x + 2, y + 1)
    ca = torch.tensor([[1, 1], [3, 4], [5, 2]])
    cb = ca + torch.tensor([2, 1])
    good = correspondence_loss(a, b_match, ca, cb)
    bad = correspondence_loss(a, torch.randn(16, 8, 8, generator=g), ca, cb)
    assert good.item() < 0.05 < bad.item()


def _planted(shift=(3, 5), size=32, d=24, seed=0):
    """Random smooth-free descriptor map and a copy translated by (dy, dx) cells (no wrap in the tested area)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, size, size, generator=g)
    b = torch.roll(a, shifts=shift, dims=(1, 2))
    return a, b


def test_nearest_neighbour_finds_planted_shift_at_image_resolution():
    a, b = _planted()
    # maps of 32 x 32 cells seen at 128 x 128 px: one cell = 4 px; shift (dy, dx) = (3, 5) cells = (12, 20) px
    src, tgt = DescriptorField(a, (128, 128), rows_per_chunk=7), DescriptorField(b, (128, 128))
    pts = torch.tensor([[10.0, 20.0], [41.0, 61.0], [70.0, 30.0]])
    m = match_points(src, tgt, pts, method="nn")
    assert torch.allclose(m.target, pts + torch.tensor([20.0, 12.0]), atol=2.0)
    assert (m.score > 0.9).all()
    assert m.mutual.all()


def test_descriptor_field_matches_dense_upsampling():
    a, _ = _planted(size=8, d=5)
    field = DescriptorField(a, (24, 20), rows_per_chunk=5)
    dense = F.normalize(F.interpolate(a[None], size=(24, 20), mode="bilinear", align_corners=False)[0], dim=0)
    q = F.normalize(torch.randn(3, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    idx, score = field.argmax(q)
    sims = (q @ dense.flatten(1)).view(3, 24, 20)
    torch.testing.assert_close(score, sims.flatten(1).max(1).values)
    # the returned pixel attains the dense maximum (robust to float ties between neighbouring pixels)
    at = sims[torch.arange(3), idx[:, 1].long(), idx[:, 0].long()]
    torch.testing.assert_close(at, score)
    torch.testing.assert_close(field.sample(torch.tensor([[7.0, 11.0]]))[0], dense[:, 11, 7])


def test_mutual_flags_points_whose_match_does_not_return():
    a, b = _planted()
    b[:, :, :] = b.mean(dim=(1, 2), keepdim=True) + 0.01 * b  # a featureless target: every match is ambiguous
    b[:, 10, 10] = a[:, 10, 10] * 5  # except one cell
    src, tgt = DescriptorField(a, (32, 32)), DescriptorField(b, (32, 32))
    m = match_points(src, tgt, torch.tensor([[10.0, 10.0], [25.0, 3.0]]), method="mutual")
    assert m.target[0].tolist() == [10.0, 10.0]
    assert m.mutual.tolist() == [True, False]


def test_soft_argmax_gives_subpixel_position_between_two_equal_peaks():
    d = 4
    a = torch.zeros(d, 16, 16)
    a[0] = 1.0
    b = torch.zeros(d, 16, 16)
    b[1] = 1.0
    b[:, 8, 5] = torch.tensor([1.0, 0, 0, 0])
    b[:, 8, 6] = torch.tensor([1.0, 0, 0, 0])
    src, tgt = DescriptorField(a, (16, 16)), DescriptorField(b, (16, 16))
    m = match_points(src, tgt, torch.tensor([[3.0, 3.0]]), method="soft_argmax", soft_radius=2, soft_temperature=0.01)
    assert m.target[0, 0].item() == pytest.approx(5.5, abs=1e-3)
    assert m.target[0, 1].item() == pytest.approx(8.0, abs=1e-3)
    with pytest.raises(DiffprobeError):
        match_points(src, tgt, torch.tensor([[3.0, 3.0]]), method="best")
