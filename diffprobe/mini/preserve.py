"""Keeping what a loaded model's self-attention does while training continues: a frozen copy (the teacher) sees
the same inputs as the student, and the student pays the KL from the teacher's head-averaged self-attention rows
to its own (`train_mini.keep_self_attention`). The inputs (`keep_self_attention_at`): the training step's noisy
latents, timesteps and captions ("training"), or DiffSeg's reference call on the step's clean latents ("diffseg")."""

from __future__ import annotations

import copy

import torch

from diffprobe.families import Conditioning, family_for
from diffprobe.heads.diffseg.head import DiffSegSettings
from diffprobe.hooks import ProbeRegistry, Reduce

KEEP_AT = ("training", "diffseg")


class AttentionTeacher:
    """A frozen copy of `unet` as it is now; `sites`: its self-attention sites (the student has the same names)."""

    def __init__(self, unet):
        self.unet = copy.deepcopy(unet).eval().requires_grad_(False)
        self.probe = ProbeRegistry(self.unet)
        self.sites = [n for n, s in self.probe.sites.items() if s.kind == "self_attn"]

    @torch.no_grad()
    def maps(self, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> dict[str, torch.Tensor]:
        """{site: (B, Q, Q)} head-averaged self-attention on noisy latents (B, C, h, w) at t (B,) under cond."""
        with self.probe.capture(self.sites, reduce=Reduce(heads="mean")) as cache:
            family_for(self.unet).denoise(self.unet, noisy, t, cond)
        return {n: cache[n] for n in self.sites}


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over rows of KL(teacher row || student row); both (..., K) with rows summing to 1."""
    return (teacher * (teacher.clamp_min(eps).log() - student.clamp_min(eps).log())).sum(-1).mean()


def diffseg_call(latents: torch.Tensor, empty_context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """(noisy, t, cond) of DiffSeg's reference call on clean latents (B, C, h, w): no noise, the timestep
    embedding alone says t = 300, the empty prompt's context (T, D) for every row."""
    t = torch.full((len(latents),), DiffSegSettings.timestep, dtype=torch.long, device=latents.device)
    return latents, t, Conditioning(empty_context.expand(len(latents), *empty_context.shape))
