"""UNet, transformer, VAE and text-encoder configurations of the supported structures, real-sized and tiny.

Real-sized configs are the published diffusers configs of SD 1.5, SD 2.1 (768) and SDXL base; build them with
random weights (or on the meta device) for benchmarks and golden site lists. Tiny configs keep each structure
(block types, layers per block, transformer depth, added conditioning) at a few channels, for tests.
"""

from __future__ import annotations

import copy

_SD1_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=2,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
)
_SDXL_BLOCKS = dict(
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
    addition_embed_type="text_time",
)

UNET_CONFIGS: dict[str, dict] = {
    "sd15": dict(_SD1_BLOCKS, sample_size=64, block_out_channels=[320, 640, 1280, 1280],
                 cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(_SD1_BLOCKS, sample_size=96, block_out_channels=[320, 640, 1280, 1280],
                 cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                 upcast_attention=True),
    "sdxl": dict(_SDXL_BLOCKS, sample_size=128, block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}

TINY_UNET_CONFIGS: dict[str, dict] = {
    "sd15": dict(_SD1_BLOCKS, sample_size=8, block_out_channels=[32, 32, 64, 64], norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=4),
    "sd21": dict(_SD1_BLOCKS, sample_size=8, block_out_channels=[32, 32, 64, 64], norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=[2, 4, 8, 8], use_linear_projection=True,
                 upcast_attention=True),
    "sdxl": dict(_SDXL_BLOCKS, sample_size=8, block_out_channels=[32, 64, 64], norm_num_groups=8,
                 cross_attention_dim=64, attention_head_dim=[2, 4, 8], addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8),
}

KINDS = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl", "pixart": "pixart", "sd3": "sd3", "flux": "flux"}

TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64,
    block_out_channels=[8, 16, 16, 16], scaling_factor=0.18215,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)

TINY_TEXT_CONFIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=77, projection_dim=16)


def unet_config(structure: str, tiny: bool = False) -> dict:
    """A fresh copy of the UNet2DConditionModel config of `structure` ("sd15", "sd21", "sdxl")."""
    table = TINY_UNET_CONFIGS if tiny else UNET_CONFIGS
    if structure not in table:
        raise KeyError(f"unknown UNet structure {structure!r}; known: {', '.join(table)}")
    return copy.deepcopy(table[structure])


def build_unet(structure: str, tiny: bool = False, device: str = "cpu"):
    """A UNet2DConditionModel of `structure` with random weights (device="meta" allocates nothing)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**unet_config(structure, tiny))


# -- diffusion transformers: published diffusers configs and tiny ones with the same structure ---------------

TRANSFORMER_CLASSES = {"pixart": "PixArtTransformer2DModel", "sd3": "SD3Transformer2DModel",
                       "sd35": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}

TRANSFORMER_CONFIGS: dict[str, dict] = {
    # PixArt-Sigma-XL-2-1024-MS
    "pixart": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096,
                   interpolation_scale=2, use_additional_conditions=False),
    # stable-diffusion-3-medium
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    # stable-diffusion-3.5-medium: qk RMSNorm and a second image self-attention in blocks 0-12
    "sd35": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                 dual_attention_layers=list(range(13)), qk_norm="rms_norm"),
    # FLUX.1-dev
    "flux": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=[16, 56, 56]),
}

TINY_TRANSFORMER_CONFIGS: dict[str, dict] = {
    "pixart": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                   cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=32, norm_num_groups=1,
                   use_additional_conditions=False),
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                pos_embed_max_size=16),
    "sd35": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
                 out_channels=4, pos_embed_max_size=16, dual_attention_layers=[0], qk_norm="rms_norm"),
    "flux": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
                 axes_dims_rope=[2, 2, 4]),
}


def build_transformer(structure: str, tiny: bool = False, device: str = "cpu"):
    """A diffusers transformer of `structure` ("pixart", "sd3", "sd35", "flux") with random weights."""
    import diffusers
    import torch

    table = TINY_TRANSFORMER_CONFIGS if tiny else TRANSFORMER_CONFIGS
    if structure not in table:
        raise KeyError(f"unknown transformer structure {structure!r}; known: {', '.join(table)}")
    with torch.device(device):
        return getattr(diffusers, TRANSFORMER_CLASSES[structure])(**copy.deepcopy(table[structure]))
