"""The dry-run peak of a call's activations equals the hand-counted peak of planted modules and the real peak of a
pass; the weights' and the heads' declared bytes bound what loading and each head's finish hold."""

import numpy as np
import pytest
import torch
from torch import nn

from diffprobe import memory
from diffprobe.memory import forward_peak_bytes


class Scores(nn.Module):
    """x (B, N, C) -> softmax(x x^T) x: a (B, N, N) score matrix and its softmax live at once, then are dropped."""

    def forward(self, x):
        return torch.softmax(x @ x.transpose(1, 2), dim=-1) @ x


def test_sequential_peak_is_one_layers_input_and_output():
    model = nn.Sequential(nn.Linear(1000, 2000), nn.ReLU(), nn.Linear(2000, 10))
    # the call's input (4 x 1000 fp32, held by the call) and ReLU's input (4 x 2000) while its output is made; the
    # weights (real here, on the meta device below) are not counted
    want = (4 * 1000 + 2 * 4 * 2000) * 4
    assert forward_peak_bytes(lambda: model(torch.randn(4, 1000))) == want
    model = model.to("meta")
    assert forward_peak_bytes(lambda: model(torch.randn(4, 1000, device="meta"))) == want


def test_attention_peak_counts_the_score_matrix_and_its_softmax():
    b, n, c = 2, 300, 8
    x = torch.randn(b, n, c)   # a real input read by the call: not counted
    peak = forward_peak_bytes(lambda: Scores()(x))
    assert peak == 2 * b * n * n * 4   # scores and softmax (B, N, N) together; the (B, N, C) output comes after
    half = forward_peak_bytes(lambda: Scores()(x.bfloat16()))
    assert half == peak // 2 + b * n * c * 2   # the bfloat16 copy of x is made by the call


def test_a_model_whose_weights_cannot_fit_is_refused_before_loading(tmp_path, monkeypatch):
    import pytest

    from diffprobe import memory
    from diffprobe.errors import DiffprobeError
    from diffprobe.loading import load_backbone, save_backbone, tiny_backbone

    bb = tiny_backbone("sd15")
    save_backbone(bb, tmp_path / "pipe")
    parts = [bb.unet, bb.vae, bb.text_encoder]
    fp32 = sum(p.numel() * 4 for m in parts for p in m.parameters()) + sum(b.numel() * 4 for m in parts
                                                                          for b in m.buffers() if b.is_floating_point())
    folders = [tmp_path / "pipe" / f for f in ("unet", "vae", "text_encoder")]
    assert abs(memory.weights_bytes(folders, torch.float32) - fp32) <= 4 * 77   # CLIP's saved position ids: int64
    assert memory.weights_bytes(folders, torch.bfloat16) < 0.51 * fp32
    # fp32 files loaded in fp32 are used from their mapping; in bf16 the UNet's file (read first, the largest part
    # here) and its converted copy are resident at once
    assert memory.loading_peak_bytes(folders, torch.float32) == memory.weights_bytes(folders, torch.float32)
    unet32 = memory.weights_bytes(folders[:1], torch.float32)
    assert memory.loading_peak_bytes(folders, torch.bfloat16) >= unet32 + memory.weights_bytes(folders[:1],
                                                                                             torch.bfloat16)
    monkeypatch.setattr(memory, "available_bytes", lambda: fp32 // 2)
    loads = []
    monkeypatch.setattr("diffprobe.loading._load_part", lambda *a: loads.append(a))
    with pytest.raises(DiffprobeError, match=r"loading the weights of pipe in float32 needs about .* MiB but .* is "
                                             r"available; load it in dtype=bfloat16"):
        load_backbone({"path": str(tmp_path / "pipe")})
    assert loads == []   # refused before any part was read


def _live_peak(call, grad=False) -> int:
    """The peak live bytes of `call()` on real tensors, tracked as the dry run tracks fake ones."""
    with torch.set_grad_enabled(grad), memory._LiveBytes() as live:
        call()
    return live.peak


def test_a_passs_dry_run_estimate_equals_the_bytes_a_real_pass_holds():
    """The runner's estimate of a pass's activations (dry runs of the VAE encoding and the denoiser call on fake
    tensors; with gradients, the call and its backward to the context, as a keypoint fit runs it) equals the peak
    of the same calls run for real on tiny SD 1.5 and tiny FLUX (packed tokens)."""
    from diffprobe.drives import encode_prompt, unet_call
    from diffprobe.families import Conditioning
    from diffprobe.loading import tiny_backbone
    from diffprobe.runner import pass_activation_bytes

    for family, grad in (("sd15", False), ("flux", False), ("sd15", True)):
        bb = tiny_backbone(family)
        cond = encode_prompt(bb, ["a cat"], (64, 64))
        grid = (64 // bb.grid_factor, 64 // bb.grid_factor)
        estimate, new = pass_activation_bytes(bb, "one_step", 3, 2, grid, cond, grad)
        assert new and pass_activation_bytes(bb, "one_step", 3, 2, grid, cond, grad) == (estimate, False)
        latents = torch.randn(3, bb.vae.config.latent_channels, 64 // bb.vae_factor, 64 // bb.vae_factor)
        added = None if cond.added is None else {k: v.expand(3, *v.shape[1:]) for k, v in cond.added.items()}

        def denoise():
            context = torch.randn(3, *cond.context.shape[1:]).requires_grad_(grad)
            out = unet_call(bb, latents.clone(), 0, Conditioning(context, added))
            if grad:
                out.sum().backward()

        real = max(_live_peak(denoise, grad), _live_peak(lambda: bb.vae.encode(torch.randn(2, 3, 64, 64))))
        assert estimate == real and estimate > 0, (family, grad)
        if grad:
            assert estimate > pass_activation_bytes(bb, "one_step", 3, 2, grid, cond)[0]   # saved for backward


def test_a_one_step_pass_is_estimated_with_its_capture_up_to_its_early_exit():
    """A one-step pass runs its denoiser call inside its capture, which stops the call once the sites have fired and
    keeps (with gradients) the graph of the probabilities it recomputes; a fit's backward starts from what it kept.
    The dry run does the same: on tiny SD 1.5 the estimate of a keypoint fit's capture (cross-attention of a down
    and an up block, heads averaged, queries upsampled to 32 x 32, gradients to the context) equals the live peak
    of the real capture and backward, as does the first down block's; the first is under half the whole call's
    without a capture (it stops early), the fit's over twice it (its graph at the upsampled queries)."""
    from diffprobe.drives import encode_prompt, unet_call
    from diffprobe.families import Conditioning
    from diffprobe.hooks import Need, Reduce
    from diffprobe.loading import tiny_backbone
    from diffprobe.runner import pass_activation_bytes

    bb = tiny_backbone("sd15")
    cond = encode_prompt(bb, ["a cat"], (64, 64))
    grid = (64 // bb.grid_factor, 64 // bb.grid_factor)
    latents = torch.randn(3, bb.vae.config.latent_channels, 64 // bb.vae_factor, 64 // bb.vae_factor)
    whole = pass_activation_bytes(bb, "one_step", 3, 1, grid, cond, True)[0]
    fit = Need(("down_blocks.1.*.attn2.hook_probs", "up_blocks.1.*.attn2.hook_probs"), Reduce(heads="mean"),
               upsample_queries=(32, 32), grad=True)
    first = Need("down_blocks.0.*.attn2.hook_probs", Reduce(heads="mean"), grad=True)
    estimates = {}
    for need in (fit, first):
        estimates[need] = pass_activation_bytes(bb, "one_step", 3, 1, grid, cond, True, (need,))[0]

        def fit_step(need=need):
            context = torch.randn(3, *cond.context.shape[1:]).requires_grad_(True)
            with bb.probe.capture(need, early_exit=True) as cache:
                unet_call(bb, latents.clone(), 0, Conditioning(context))
            sum(cache[n].sum() for n in cache.names).backward()

        real = max(_live_peak(fit_step, True), _live_peak(lambda: bb.vae.encode(torch.randn(1, 3, 64, 64))))
        assert estimates[need] == real, (need.sites, estimates[need], real)
    assert estimates[first] < 0.5 * whole < 2 * whole < estimates[fit]   # the early exit; the capture's own graph


def test_a_pass_whose_activations_cannot_fit_is_refused_before_the_denoiser_runs(monkeypatch):
    import pytest
    from PIL import Image

    from diffprobe.errors import DiffprobeError
    from diffprobe.heads.probe import ProbeHead, ProbeSettings
    from diffprobe.loading import tiny_backbone
    from diffprobe.runner import Item, run_heads

    bb = tiny_backbone("sd15")
    head = ProbeHead(ProbeSettings(sites=["up_blocks.1.*.attn2.hook_probs"], timestep=300), 64)
    item = Item("x", Image.new("RGB", (64, 64)))
    run_heads(bb, [head], item)   # the dry runs are cached on the backbone
    activations = max(bb.activation_peaks.values())
    calls = []
    bb.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    monkeypatch.setattr(memory, "available_bytes", lambda: activations // 2)
    with pytest.raises(DiffprobeError, match=r"this pass at 64 x 64 px \(activations .* MiB, captures .*\) needs "
                                             r"about .* but .* is available; lower image_size"):
        run_heads(bb, [head], item)
    assert calls == []


def _head_cases():
    from diffprobe.heads.diffseg.head import DiffSegHead, DiffSegSettings, WordMapsHead
    from diffprobe.heads.localize import LocalizeHead, LocalizeSettings

    def localize(bb, words):
        settings = LocalizeSettings(words=words)
        return LocalizeHead(settings, bb.word_positions(settings.full_prompt(), words), 64)

    return {
        "diffseg": lambda bb: DiffSegHead(DiffSegSettings(tau=0.05), 64),
        "diffseg ncut": lambda bb: DiffSegHead(DiffSegSettings(tau=0.05, method="ncut"), 64),
        "diffseg pamr": lambda bb: DiffSegHead(DiffSegSettings(tau=0.05, pamr=True), 64),
        "words": lambda bb: WordMapsHead(["cat", "dog"], bb.word_positions("cat, dog", ["cat", "dog"]),
                                         DiffSegSettings(tau=0.05), 64),
        "localize": lambda bb: localize(bb, ["cat"]),
        "localize 3 words": lambda bb: localize(bb, ["cat", "dog", "red"]),
    }


@pytest.mark.parametrize("case", list(_head_cases()))
def test_a_heads_declared_work_bounds_what_its_finish_holds(case):
    """Head.work (checked with the captures before a pass) is at least the peak of the tensors `finish` holds,
    measured on real tensors, at an output of 384 x 512 px (where the pixel terms matter) and the model's size,
    and not far above it."""
    from PIL import Image

    from diffprobe.loading import tiny_backbone
    from diffprobe.runner import Item, run_heads

    bb = tiny_backbone("sd15")
    rgb = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    for out in ((384, 512), (64, 64)):
        torch.manual_seed(0)
        head, item = _head_cases()[case](bb), Item("x", Image.fromarray(rgb), {"output_size": out})
        finish, peaks = head.finish, []

        def measured(view, it):
            result = []
            peaks.append(_live_peak(lambda: result.append(finish(view, it))))
            return result[0]

        head.finish = measured
        run_heads(bb, [head], item)
        declared = head.work(bb.probe.sites, (64 // bb.grid_factor,) * 2, item)
        assert peaks[0] <= declared <= 6 * peaks[0], (out, peaks[0], declared)


def test_the_remedy_suggests_a_half_dtype_only_where_it_is_not_one_and_says_when_it_is_slow(monkeypatch):
    import torch

    from diffprobe import loading
    from diffprobe.loading import tiny_backbone
    from diffprobe.runner import _remedy

    bb = tiny_backbone("sd15")
    monkeypatch.setattr(loading, "half_is_slow", lambda device, dtype: False)
    assert _remedy(bb).endswith("keep fewer steps, or use dtype=bfloat16")
    monkeypatch.setattr(loading, "half_is_slow", lambda device, dtype: True)
    assert _remedy(bb).endswith("or use dtype=bfloat16 (slow on this CPU: docs/scale.md)")
    half = tiny_backbone("sd15").to(dtype=torch.bfloat16)
    assert "bfloat16" not in _remedy(half) and _remedy(half).endswith("capture fewer sites, or keep fewer steps")


_HOLES = """
import sys, torch
from diffprobe.memory import return_freed_memory, rss_bytes
if sys.argv[1] == "return":
    assert return_freed_memory()
torch.ones(5 * 2**20).sum()                        # a 20 MiB block, freed: glibc's threshold rises to it
blocks = [torch.ones(2**21) for _ in range(64)]    # 64 blocks of 8 MiB
before = rss_bytes()
del blocks[::2]                                    # every other one freed: holes between live blocks
print(before - rss_bytes())
"""


def test_freed_tensors_go_back_to_the_system():
    """With glibc's default, 8 MiB tensors freed between live ones stay in its heap once a larger block has been
    freed (the process keeps them: resident memory does not drop); after return_freed_memory() the same frees give
    the 256 MiB back. Each case in a fresh process."""
    import subprocess
    import sys

    given = {how: int(subprocess.run([sys.executable, "-c", _HOLES, how], capture_output=True, text=True,
                                     check=True).stdout) for how in ("default", "return")}
    assert given["default"] < 32 * 2**20, given
    assert given["return"] > 240 * 2**20, given
