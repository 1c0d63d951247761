"""UNet/VAE/text-encoder configurations of the supported structures, real-sized and tiny.

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

KINDS = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}

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
