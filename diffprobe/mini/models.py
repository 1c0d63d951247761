"""diffprobe-mini's architecture: fresh diffusers/transformers modules built from one small config.

Images are 64 px RGB; the VAE halves the side (latent 4 x 32 x 32); the UNet has four levels
(32, 16, 8, 4 latent px) with self- and cross-attention at 16, 8 and 4 and in the mid block, and a
plain 32 px level: SD's three attention levels and one plain level, only much narrower, with the
plain level at the top (attention over 32 x 32 cells doubles the step time and stayed uniform in
training; docs/mini.md). Attention heads are `unet_head_dim` channels wide at every level.
`grow_top_attention` adds self- and cross-attention to a trained UNet's top up level (32 latent px) without
changing its output, for a continuation that trains them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffprobe.mini.tokenizer import BOS, EOS, build_vocab


@dataclass(frozen=True)
class MiniArch:
    image_size: int = 64
    vae_channels: tuple[int, ...] = (16, 32)  # length n -> latent factor 2**(n-1)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 96, 128)
    unet_head_dim: int = 16  # channels per attention head; heads per level = channels // unet_head_dim
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 24
    denoiser: str = "unet"  # "unet", or "pixart": diffprobe-mini-dit, a PixArt-style transformer on the same latents
    dit_width: int = 128    # transformer channels; heads = dit_width // unet_head_dim
    dit_layers: int = 4
    dit_patch: int = 2      # latent 32 x 32 -> a 16 x 16 token grid, the UNet's finest attention level

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def build_vae(arch: MiniArch):
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=arch.vae_channels,
                         layers_per_block=1, latent_channels=arch.latent_channels, norm_num_groups=8,
                         sample_size=arch.image_size, scaling_factor=1.0, mid_block_add_attention=False)


def build_unet(arch: MiniArch):
    from diffusers import UNet2DConditionModel

    n = len(arch.unet_channels)
    if any(c % arch.unet_head_dim for c in arch.unet_channels):
        raise ValueError(f"unet_channels {arch.unet_channels} must be multiples of unet_head_dim {arch.unet_head_dim}")
    # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads per level
    heads = tuple(c // arch.unet_head_dim for c in arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=arch.latent_size, in_channels=arch.latent_channels, out_channels=arch.latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=arch.unet_channels, layers_per_block=1, cross_attention_dim=arch.text_dim,
        attention_head_dim=heads, norm_num_groups=16)


def grow_top_attention(unet):
    """A copy of a trained mini UNet whose top up block (up_blocks.-1, the finest level) gets self- and
    cross-attention like the levels below it. Every existing weight is copied; the new transformers' output
    projections start at zero, so the grown UNet computes exactly what `unet` does until they are trained."""
    from diffusers import UNet2DConditionModel

    types = list(unet.config.up_block_types)
    if types[-1] == "CrossAttnUpBlock2D":
        return unet
    grown = UNet2DConditionModel.from_config({**unet.config, "up_block_types": types[:-1] + ["CrossAttnUpBlock2D"]})
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    new = f"up_blocks.{len(types) - 1}.attentions."
    if unexpected or not all(k.startswith(new) for k in missing):
        raise ValueError(f"cannot grow this UNet: unexpected {unexpected[:1]}, missing {missing[:1]}")
    with torch.no_grad():
        for block in grown.up_blocks[-1].attentions:
            block.proj_out.weight.zero_()
            block.proj_out.bias.zero_()
    return grown.train(unet.training)


def top_attention_parameters(unet) -> list:
    """The parameters of the top up block's attention (what `grow_top_attention` adds)."""
    if unet.config.up_block_types[-1] != "CrossAttnUpBlock2D":
        raise ValueError("this UNet has no attention at its top up level")
    return list(unet.up_blocks[-1].attentions.parameters())


def build_transformer(arch: MiniArch):
    """diffprobe-mini-dit: PixArt's transformer (AdaLN-single, self- then cross-attention per block) predicting
    the noise of mini's latents from mini's text states (caption_channels = text_dim)."""
    from diffusers import PixArtTransformer2DModel

    if arch.dit_width % arch.unet_head_dim:
        raise ValueError(f"dit_width {arch.dit_width} must be a multiple of unet_head_dim {arch.unet_head_dim}")
    return PixArtTransformer2DModel(
        num_attention_heads=arch.dit_width // arch.unet_head_dim, attention_head_dim=arch.unet_head_dim,
        in_channels=arch.latent_channels, out_channels=arch.latent_channels, num_layers=arch.dit_layers,
        cross_attention_dim=arch.dit_width, sample_size=arch.latent_size, patch_size=arch.dit_patch,
        caption_channels=arch.text_dim, use_additional_conditions=False)


def build_denoiser(arch: MiniArch):
    return build_transformer(arch) if arch.denoiser == "pixart" else build_unet(arch)


def build_text_encoder(arch: MiniArch, words: list[str]):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = build_vocab(words)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=arch.text_dim, intermediate_size=2 * arch.text_dim,
                         num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
                         max_position_embeddings=arch.max_tokens, projection_dim=arch.text_dim,
                         bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    return CLIPTextModel(cfg)


def adopt_vocabulary(text_encoder, old_vocab: dict[str, int], new_vocab: dict[str, int]) -> torch.Tensor:
    """Re-index text_encoder's token embedding (V_old, D) from old_vocab's ids to new_vocab's (V_new, D), rows
    matched by token string, so every caption the old tokenizer could write encodes exactly as before; tokens
    new to it start at the mean old row. Returns (V_new,) bool: True for the new tokens."""
    old = text_encoder.get_input_embeddings().weight.detach()
    fresh = torch.ones(len(new_vocab), dtype=torch.bool)
    weight = old.mean(0).repeat(len(new_vocab), 1)
    for token, i in new_vocab.items():
        if token in old_vocab:
            weight[i], fresh[i] = old[old_vocab[token]], False
    text_encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(weight, freeze=False))
    text_encoder.config.update({"vocab_size": len(new_vocab), "bos_token_id": new_vocab[BOS],
                                "eos_token_id": new_vocab[EOS], "pad_token_id": new_vocab[EOS]})
    return fresh


def build_scheduler():
    """SD's DDIM schedule (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon prediction)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, prediction_type="epsilon")


def has_transformer(path) -> bool:
    """Whether the pipeline directory `path` holds a diffprobe-mini-dit transformer (transformer/config.json)."""
    return (Path(path) / "transformer" / "config.json").is_file()


def load_trained(path, denoiser: str = "unet", parts_from=None):
    """(vae, denoiser, text_encoder) of a diffprobe-mini pipeline directory, trainable (fp32, train mode).

    denoiser "unet" reads unet/; "pixart" reads transformer/, or gives None when the directory has none (a
    transformer trained from scratch on mini's VAE and text encoder). The VAE and text encoder come from
    `parts_from` (default: `path`).
    """
    parts = path if parts_from is None else parts_from
    from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffprobe.loading import quiet_libraries

    from safetensors.torch import load_file

    def diffusers_part(cls, subfolder: str, root=path):  # from config and weights: no source path saved again
        model = cls.from_config(cls.load_config(root, subfolder=subfolder))
        weights = load_file(Path(root) / subfolder / "diffusion_pytorch_model.safetensors")
        model.load_state_dict({k: v.float() for k, v in weights.items()})
        return model

    with quiet_libraries():
        vae = diffusers_part(AutoencoderKL, "vae", parts)
        if denoiser == "pixart":
            model = diffusers_part(PixArtTransformer2DModel, "transformer") if has_transformer(path) else None
        else:
            model = diffusers_part(UNet2DConditionModel, "unet")
        text_encoder = CLIPTextModel.from_pretrained(parts, subfolder="text_encoder", use_safetensors=True)
    return vae, None if model is None else model.train(), text_encoder.train()


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
