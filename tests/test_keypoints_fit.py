"""A short fit and a prediction on a tiny random SD 1.5-structured model."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from diffprobe.loading import tiny_backbone
from diffprobe.errors import DiffprobeError
from diffprobe.heads.keypoints.affine import AffineRange
from diffprobe.training.keypoints import FitSettings, attention_maps, fit, fit_embeddings
from diffprobe.heads.keypoints.image_sets import ImageSet, LandmarkItem
from diffprobe.heads.keypoints.maps import MapSettings, default_sites
from diffprobe.heads.keypoints.predict import PredictSettings
from diffprobe.heads.keypoints.state import load_model, save_model
from diffprobe.hooks import ProbeRegistry


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        a = np.full((64, 80, 3), 30, np.uint8)
        cx, cy = rng.integers(20, 50, 2)
        a[cy - 8 : cy + 8, cx - 8 : cx + 8] = (220, 60, 60)
        Image.fromarray(a).save(root / f"{i}.png")
        items.append(LandmarkItem(root / f"{i}.png"))
    bb = tiny_backbone("sd15")
    probe = ProbeRegistry(bb.unet)
    spec = MapSettings(tuple(default_sites(probe.sites)), res=16)
    return bb, probe, spec, ImageSet(items, 64)


def test_default_sites_are_the_reference_layers(setup):
    _, _, spec, _ = setup
    assert spec.sites == tuple(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2.hook_probs"
                               for b, a in ((1, 0), (1, 1), (1, 2), (2, 0)))


def test_short_fit_lowers_the_loss(setup):
    bb, probe, spec, images = setup
    # a deterministic objective: one image, identity transform, clean latent; only Adam moves the loss
    one = ImageSet(images.items[:1], 64)
    cfg = FitSettings(num_tokens=8, top_k=2, candidates=4, steps=8, batch_size=1, lr=0.05,
                    affine=AffineRange(0.0, (1.0, 1.0), 0.0))
    _, history = fit_embeddings(bb, MapSettings(spec.sites, spec.res, noise=False), cfg, one, progress=False)
    loss = [row["loss"] for row in history]
    assert loss[-1] < 0.97 * loss[0]
    assert all(b < a for a, b in zip(loss, loss[1:]))


def test_fit_writes_a_loadable_model(setup, tmp_path):
    bb, probe, spec, images = setup
    cfg = FitSettings(num_tokens=8, top_k=2, candidates=4, steps=3, batch_size=2, lr=0.02, num_indices=3,
                    checkpoint_every=2)
    res = fit(bb, spec, cfg, images, out_dir=tmp_path, progress=False)
    assert [row["step"] for row in res.history] == [1, 2, 3]
    assert all(np.isfinite(row["loss"]) and row["loss"] > 0 for row in res.history)
    assert res.model.embeddings.shape == (8, bb.context_dim)
    assert res.model.indices.shape == (2,) and len(set(res.model.indices.tolist())) == 2
    assert sum(res.model.counts) <= 3 * 2
    path = save_model(tmp_path / "keypoints", res.model)
    back = load_model(path)
    torch.testing.assert_close(back.embeddings, res.model.embeddings)
    assert back.indices.tolist() == res.model.indices.tolist()
    assert MapSettings.from_dict(back.config["maps"]) == spec
    assert (tmp_path / "checkpoint.safetensors").is_file()
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DiffprobeError):
        load_model(tmp_path / "bad.safetensors")


def test_resume_continues_exactly(setup, tmp_path):
    bb, probe, spec, images = setup
    cfg = FitSettings(num_tokens=8, top_k=2, candidates=4, steps=4, batch_size=2, lr=0.02, checkpoint_every=2)
    full, _ = fit_embeddings(bb, spec, cfg, images, progress=False)

    def interrupt(history):
        if len(history) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_embeddings(bb, spec, cfg, images, out_dir=tmp_path, progress=False, on_checkpoint=interrupt)
    resumed, history = fit_embeddings(bb, spec, cfg, images, resume=tmp_path, progress=False)
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    torch.testing.assert_close(resumed, full)
    with pytest.raises(DiffprobeError, match="num_tokens"):
        fit_embeddings(bb, spec, FitSettings(num_tokens=9, top_k=2, candidates=4, steps=4), images,
                       resume=tmp_path, progress=False)


@pytest.mark.parametrize("per_call", [4, 3])
def test_iterations_sharing_a_call_give_the_reference_loops_gradients(setup, per_call):
    # the reference: one denoiser call per iteration, gradients accumulated; sharing calls (4 in one, or 3 + 1)
    # keeps each iteration's image, transform and noise, so the loss curve and the embeddings agree to rounding
    bb, probe, spec, images = setup
    cfg = FitSettings(num_tokens=8, top_k=2, candidates=4, steps=3, batch_size=4, lr=0.05)
    reference, ref_history = fit_embeddings(bb, spec, cfg, images, progress=False)
    shared, history = fit_embeddings(bb, spec, replace(cfg, iterations_per_call=per_call), images, progress=False)
    assert len({row["loss"] for row in ref_history}) == 3              # the steps differ: the comparison can fail
    for a, b in zip(ref_history, history):
        for key in ("loss", "localisation", "equivariance"):
            assert b[key] == pytest.approx(a[key], rel=1e-4)
    torch.testing.assert_close(shared, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reference, fit_embeddings(bb, spec, replace(cfg, seed=1), images,
                                                         progress=False)[0], atol=1e-3)


def test_prediction_head_ensembles_its_views_as_computed_one_at_a_time_and_reads_points(setup):
    bb, probe, spec, images = setup
    from diffprobe.heads.keypoints.affine import unwarp
    from diffprobe.heads.keypoints.predict import KeypointPredictHead
    from diffprobe.heads.keypoints.state import KeypointModel
    from diffprobe.runner import run_heads

    model = KeypointModel(torch.randn(8, bb.context_dim, generator=torch.Generator().manual_seed(1)),
                          torch.tensor([5, 2, 7]))
    image = images.tensor(0)
    spec0 = MapSettings(spec.sites, spec.res, noise=False)      # deterministic UNet input for the comparison
    cfg = PredictSettings(augmentations=4, affine=AffineRange(10, (0.9, 1.0), 0.1))
    head = KeypointPredictHead(spec0, model, cfg, 64)
    (pred,) = run_heads(bb, [head], image)
    thetas, _ = cfg.transforms()
    views = head.inputs(image)
    with torch.no_grad():                                   # by hand: each view alone, upsampled, unwarped, averaged
        one = [attention_maps(bb, spec0, views[i:i + 1], model.embeddings)[:, model.indices] for i in range(4)]
    ups = torch.nn.functional.interpolate(torch.cat(one), size=(64, 64), mode="bilinear", align_corners=False)
    seen = unwarp(torch.ones(4, 1, 64, 64), thetas).sum(0)
    expected = torch.where(seen > 0, unwarp(ups, thetas).sum(0) / seen.clamp_min(1e-12), torch.zeros(()))
    torch.testing.assert_close(pred.maps, expected, atol=1e-5, rtol=1e-4)
    noisy = [run_heads(bb, [KeypointPredictHead(spec, model, replace(cfg, batch_size=n), 64)], image)[0].maps
             for n in (4, 3, 1)]                          # views split over calls draw the noise one batch would
    torch.testing.assert_close(noisy[1], noisy[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(noisy[2], noisy[0], atol=1e-5, rtol=1e-4)
    with torch.no_grad():                               # selecting tokens early == indexing all maps
        full = attention_maps(bb, spec0, image, model.embeddings)
        some = attention_maps(bb, spec0, image, model.embeddings, tokens=model.indices)
    torch.testing.assert_close(some, full[:, model.indices])
    torch.testing.assert_close(full.sum(1), torch.ones(1, 16, 16))      # a softmax over all 8 tokens
    assert pred.points.shape == (3, 2) and pred.maps.shape == (3, 64, 64)
    assert ((pred.points > 0) & (pred.points < 64)).all()
    for k in range(3):                                   # argmax read-out: the peak of each ensembled map
        x, y = (pred.points[k] - 0.5).long().tolist()
        assert pred.maps[k, y, x] == pred.maps[k].max() == pred.confidence[k]


@pytest.mark.parametrize("structure", ["sd21", "sdxl"])
def test_maps_and_gradients_on_other_structures(structure):
    bb = tiny_backbone(structure)
    probe = ProbeRegistry(bb.unet)
    spec = MapSettings(tuple(default_sites(probe.sites)), res=8)
    assert len(spec.sites) == 4 and all(probe.sites[s].direction == "up" for s in spec.sites)
    emb = torch.randn(6, bb.context_dim, requires_grad=True)
    maps = attention_maps(bb, spec, torch.zeros(1, 3, 64, 64), emb)
    assert maps.shape == (1, 6, 8, 8)
    torch.testing.assert_close(maps.sum(1), torch.ones(1, 8, 8))
    maps[:, :2].sum().backward()
    assert emb.grad[:2].abs().sum() > 0
    with pytest.raises(DiffprobeError, match="another model"):
        attention_maps(bb, spec, torch.zeros(1, 3, 64, 64), torch.randn(6, bb.context_dim + 1))


def test_localisation_is_on_the_original_images_maps_and_views_are_black_outside(setup, monkeypatch):
    # planted maps: x's maps are exact peak-1 Gaussians (localisation 0), T(x)'s are flat; the reference
    # takes the localisation loss on x's maps (optimize.py: sharpening_loss(attn_map[top_embedding_indices]))
    import diffprobe.training.keypoints as fit_module
    from diffprobe.heads.keypoints.losses import localisation_loss
    from diffprobe.heads.keypoints.targets import gaussian_maps

    bb, probe, spec, images = setup
    seen = {}
    centres = torch.randint(2, 14, (8, 2), generator=torch.Generator().manual_seed(0)) + 0.5  # pixel centres
    sharp = gaussian_maps(centres, (16, 16), 2.0)
    flat = torch.full((8, 16, 16), 0.125)

    def planted(bb_, spec_, pairs, embeddings, generators, tokens=None):
        seen["pair"] = pairs[0]
        return [torch.stack([sharp, flat]) + 0 * embeddings.sum()]

    monkeypatch.setattr(fit_module, "maps_in_one_call", planted)
    cfg = FitSettings(num_tokens=8, top_k=2, candidates=4, affine=AffineRange(0.0, (1.0, 1.0), 0.4))
    emb = torch.zeros(8, bb.context_dim, requires_grad=True)
    white = torch.ones(1, 3, 64, 64)
    _, (parts,) = fit_module.iteration_losses(bb, spec, cfg, [white], emb, [torch.Generator().manual_seed(3)])
    assert parts["localisation"] == pytest.approx(0.0, abs=1e-12)
    assert localisation_loss(flat[:2], 2.0) > 0.01          # T(x)'s maps would have given a large loss
    view = seen["pair"][1]                                  # a pure translation of a white image
    assert view.min() == -1.0 and view.max() == 1.0         # out-of-view pixels black, not mid-grey (0)
    assert (view.abs() < 0.5).float().mean() < 0.05          # grey only where the edge is interpolated


def test_prediction_views_are_black_outside(setup):
    from diffprobe.heads.keypoints.predict import KeypointPredictHead
    from diffprobe.heads.keypoints.state import KeypointModel

    bb, probe, spec, _ = setup
    model = KeypointModel(torch.zeros(8, bb.context_dim), torch.tensor([1, 3]))
    cfg = PredictSettings(augmentations=3, affine=AffineRange(0.0, (1.0, 1.0), 0.4), seed=1)
    views = KeypointPredictHead(spec, model, cfg, 64).inputs(torch.ones(1, 3, 64, 64))
    corners = views[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.min(dim=-1).values == -1.0).all()       # every shifted view has black where it left the image


def test_checkpoints_by_time_and_a_rerun_in_the_same_folder_continues(setup, tmp_path, caplog):
    bb, probe, spec, images = setup
    every_step = FitSettings(num_tokens=8, top_k=2, candidates=4, steps=4, batch_size=1, lr=0.02,
                           checkpoint_every=100, checkpoint_minutes=1e-9)  # by count: never; by time: always
    full, _ = fit_embeddings(bb, spec, every_step, images, progress=False)
    seen = []

    def interrupt(history):
        seen.append(len(history))
        if len(history) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_embeddings(bb, spec, every_step, images, out_dir=tmp_path, progress=False, on_checkpoint=interrupt)
    assert seen[:2] == [1, 2]  # a checkpoint after every step although checkpoint_every is 100
    caplog.set_level("INFO")
    resumed, history = fit_embeddings(bb, spec, every_step, images, out_dir=tmp_path, progress=False)  # no resume=
    assert "resuming keypoints fit at step 2" in caplog.text
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    torch.testing.assert_close(resumed, full)
    with pytest.raises(DiffprobeError, match="other settings"):
        fit_embeddings(bb, spec, FitSettings(num_tokens=8, top_k=2, candidates=4, steps=4, batch_size=1, lr=0.05),
                       images, out_dir=tmp_path, progress=False)


def test_a_long_run_is_announced(caplog):
    from diffprobe.items import warn_if_long

    assert warn_if_long("keypoints fit", 8.4, 499, "hint") > 60
    assert "about 70 minutes to go" in caplog.text and "hint" in caplog.text
    caplog.clear()
    warn_if_long("x", 0.1, 100, "hint")
    assert caplog.text == ""
