"""The dry-run peak of a call's activations equals the hand-counted peak of planted modules."""

import torch
from torch import nn

from diffprobe.memory import forward_peak_bytes


class Scores(nn.Module):
    """x (B, N, C) -> softmax(x x^T) x: a (B, N, N) score matrix and its softmax live at once, then are dropped."""

    def forward(self, x):
        return torch.softmax(x @ x.transpose(1, 2), dim=-1) @ x


def test_sequential_peak_is_one_layers_input_and_output():
    model = lambda: nn.Sequential(nn.Linear(1000, 2000), nn.ReLU(), nn.Linear(2000, 10))  # noqa: E731
    # ReLU's input (4 x 2000 fp32) is alive while its output is made: 2 x 32,000 bytes; the weights are not counted
    assert forward_peak_bytes(model, lambda: {"input": torch.randn(4, 1000)}) == 2 * 4 * 2000 * 4


def test_attention_peak_counts_the_score_matrix_and_its_softmax():
    b, n, c = 2, 300, 8
    peak = forward_peak_bytes(Scores, lambda: {"x": torch.randn(b, n, c)})
    assert peak == 2 * b * n * n * 4   # scores and softmax (B, N, N) together; the (B, N, C) output comes after
    half = forward_peak_bytes(Scores, lambda: {"x": torch.randn(b, n, c, dtype=torch.bfloat16)})
    assert half == peak // 2


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
    monkeypatch.setattr(memory, "available_bytes", lambda: fp32 // 2)
    loads = []
    monkeypatch.setattr("diffprobe.loading._load_part", lambda *a: loads.append(a))
    with pytest.raises(DiffprobeError, match=r"loading the weights of pipe in float32 needs about .* MiB but .* is "
                                             r"available; load it in dtype=bfloat16"):
        load_backbone({"path": str(tmp_path / "pipe")})
    assert loads == []   # refused before any part was read
