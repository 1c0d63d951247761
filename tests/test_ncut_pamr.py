"""Segmentation by normalised cut on planted attention, and PAMR on planted images."""

import pytest
import torch
from PIL import Image

from diffprobe.errors import DiffprobeError
from diffprobe.heads.diffseg.head import DiffSegHead, DiffSegSettings
from diffprobe.heads.diffseg.ncut import NcutSettings, ncut_segment
from diffseg_planted import block_segmentation, planted_attention, same_partition, voronoi_segmentation
from diffprobe.heads.pamr import affinity, pamr, refine_labels
from diffprobe.hooks import Site
from diffprobe.runner import Item, View


@pytest.mark.parametrize("affinity_name", ["attention_rows", "attention"])
def test_ncut_recovers_planted_regions(affinity_name):
    seg = block_segmentation(16)
    maps = {s: planted_attention(seg, s, layers=2, noise=0.05, seed=s) for s in (16, 8, 4)}
    res = ncut_segment(maps, (16, 16), NcutSettings(tau=0.5, affinity=affinity_name))
    assert res.num_segments == 5 and same_partition(res.labels, seg)
    assert res.proposals.shape == (5, 16, 16) and res.counts == [5]


def test_ncut_on_voronoi_regions():
    seg = voronoi_segmentation(16, 7, seed=3)
    maps = {16: planted_attention(seg, 16, noise=0.1, seed=1)}
    res = ncut_segment(maps, (16, 16), NcutSettings(tau=0.5))
    assert res.num_segments == 7 and same_partition(res.labels, seg)


def test_pamr_moves_a_displaced_boundary_onto_the_colour_edge():
    image = torch.zeros(3, 24, 24)
    image[:, :, 12:] = 1.0                       # colour edge between columns 11 and 12
    image += 0.02 * torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(24, 24, dtype=torch.long)
    labels[:, 9:] = 1                            # the predicted boundary is 3 px to the left of the edge
    refined = refine_labels(labels, image)
    truth = torch.zeros(24, 24, dtype=torch.long)
    truth[:, 12:] = 1
    assert (refined == truth).float().mean() > 0.98
    weights = affinity(image)
    assert torch.allclose(weights.sum(0), torch.ones(24, 24))
    # a flat image spreads masks evenly: a constant mask stays constant
    flat = pamr(torch.ones(3, 8, 8), torch.ones(2, 8, 8))
    assert torch.allclose(flat, torch.ones(2, 8, 8))


def agreement(labels: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of pixels whose label's most common true label is their own."""
    hits = sum(int(torch.bincount(truth[labels == k]).max()) for k in torch.unique(labels))
    return hits / labels.numel()


def interior(labels: torch.Tensor) -> torch.Tensor:
    """Pixels whose 5 x 5 neighbourhood holds one label."""
    x = labels[None, None].float()
    return (torch.nn.functional.max_pool2d(x, 5, 1, 2) == -torch.nn.functional.max_pool2d(-x, 5, 1, 2))[0, 0]


def test_the_head_runs_ncut_and_pamr_on_planted_tensors():
    seg = block_segmentation(16)
    sites, tensors = {}, {}
    for order, (side, divisor) in enumerate(((16, 1), (8, 2))):
        name = f"block{divisor}.attn1.hook_probs"
        sites[name] = Site(name, "self_attn", "up", 0, divisor, 1, 8, order, name[:-11])
        tensors[name] = planted_attention(seg, side, seed=side)
    colours = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40], [120, 40, 160]],
                           dtype=torch.uint8)
    image = Image.fromarray(colours[seg].numpy()).resize((64, 64), Image.NEAREST)
    view = View.from_tensors(sites, tensors)
    truth = seg.repeat_interleave(4, 0).repeat_interleave(4, 1)
    for method, pamr_on in (("ncut", False), ("ncut", True), ("diffseg", True)):
        head = DiffSegHead(DiffSegSettings(tau=0.9, anchors=8, method=method, pamr=pamr_on), 64)
        head.plan(sites)
        result = head.finish(view, Item("planted", image, {"output_size": (64, 64)}))
        assert result.num_segments == 5, (method, pamr_on)
        if pamr_on:  # boundaries on the colour edges: all but the few corner pixels the 3 x 3 median flips
            assert agreement(result.labels, truth) > 0.998, method
        else:
            assert same_partition(result.labels[interior(truth)], truth[interior(truth)]), method


def test_bad_ncut_settings_are_one_line_errors():
    with pytest.raises(DiffprobeError, match="method"):
        DiffSegSettings(tau=0.9, method="cut").params()
    with pytest.raises(DiffprobeError, match="ncut_affinity"):
        DiffSegSettings(tau=0.9, method="ncut", ncut_affinity="features").params()
    with pytest.raises(DiffprobeError, match="ncut_tau"):
        DiffSegSettings(tau=0.9, method="ncut", ncut_tau=0).params()


def test_refining_labels_one_at_a_time_equals_refining_all_masks_at_once():
    """refine_labels keeps a running arg-max over labels refined in turn: the same labels as the arg-max of every
    one-hot mask refined together (pamr), then the median filter; label values kept, first label wins ties."""
    from scipy.ndimage import median_filter

    torch.manual_seed(0)
    image = torch.rand(3, 37, 41)
    labels = torch.randint(0, 5, (37, 41)) * 3 + 2          # values 2, 5, ..., 14
    used, inverse = torch.unique(labels, return_inverse=True)
    masks = torch.stack([(inverse == k).float() for k in range(len(used))])
    want = used[torch.from_numpy(median_filter(pamr(image, masks).argmax(0).numpy(), size=3, mode="nearest"))]
    assert torch.equal(refine_labels(labels, image), want)


def test_masks_refined_in_chunks_equal_masks_refined_one_by_one():
    """Small images refine several masks per call (13 masks here: chunks of 6, 6 and 1); each must be what the
    one-mask iteration (mask <- sum over neighbours of affinity x shifted mask, 10 times) gives alone."""
    from diffprobe.heads.pamr import ITERATIONS, chunk_size, neighbours

    torch.manual_seed(1)
    image, masks = torch.rand(3, 37, 41), torch.rand(13, 37, 41)
    aff = affinity(image)
    alone = []
    for m in masks:
        x = m[None]
        for _ in range(ITERATIONS):
            x = (neighbours(x)[0] * aff).sum(dim=0, keepdim=True)
        alone.append(x)
    assert chunk_size(37, 41) == 6 and chunk_size(512, 512) == 1
    torch.testing.assert_close(pamr(image, masks), torch.cat(alone))
    assert not torch.allclose(torch.cat(alone), masks, atol=1e-2)          # the refinement did move them
