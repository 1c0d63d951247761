"""diffusers UNet2DConditionModel families: SD 1.x, SD 2.x, SDXL and other UNets with cross-attention
(diffprobe-mini), the standard `Attention` module they share, and their published and tiny configs (SD 1.5, SD 2.1
(768) and SDXL base; the tiny ones keep block types, layers per block, transformer depth and added conditioning at
a few channels).

Sites come from the module tree (down/mid/up blocks; resnets[j] before attentions[j]; transformer blocks in
order; attn1 before attn2); probabilities are recomputed as softmax(to_q(x) to_k(ctx)^T * scale) from the
module's own inputs; the families differ only in their conditioning.
"""

from __future__ import annotations


import torch
from torch import nn

from diffprobe.families import tiny
from diffprobe.families.base import CLIP, Conditioning, Family, TextPart, register, token_ids
from diffprobe.hooks.attention import split_heads
from diffprobe.hooks.errors import UnsupportedAttention
from diffprobe.hooks.sites import OUT, PROBS, RESIDUAL, Site

SD1_DOWN_BLOCKS = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]

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
UNREPRODUCED = ("norm_q", "norm_k", "norm_cross", "group_norm", "spatial_norm", "add_k_proj")


def _is_attention(module: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention)


def _is_resnet(module: nn.Module) -> bool:
    from diffusers.models.resnet import ResnetBlock2D

    return isinstance(module, ResnetBlock2D)


def _top_blocks(unet: nn.Module) -> list[tuple[str, str, int, nn.Module]]:
    """(path, direction, index, module) of the UNet's top-level blocks in execution order."""
    blocks = [(f"down_blocks.{i}", "down", i, b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", "mid", 0, unet.mid_block))
    blocks += [(f"up_blocks.{i}", "up", i, b) for i, b in enumerate(unet.up_blocks)]
    return blocks


def _order_key(rel: str) -> tuple:
    """Execution-order key of a module path inside a block.

    Within diffusers' down/mid/up blocks, resnets[j] runs before attentions[j] (mid: resnets[0], then
    attentions[k] before resnets[k+1]), transformer blocks run in index order and attn1 before attn2.
    """
    parts = rel.split(".")
    key: list = []
    for i, part in enumerate(parts):
        if part in ("resnets", "attentions") and i + 1 < len(parts):
            key += [int(parts[i + 1]), 0 if part == "resnets" else 1]
        elif part == "transformer_blocks" and i + 1 < len(parts):
            key.append(int(parts[i + 1]))
        elif part.startswith("attn") and part[4:].isdigit():
            key.append(int(part[4:]))
    return tuple(key)


def unet_sites(unet: nn.Module) -> dict[str, Site]:
    """All capture sites of a UNet2DConditionModel in execution order, keyed by name."""
    found: list[tuple[tuple, Site]] = []
    divisor = 1
    for seq, (path, direction, index, block) in enumerate(_top_blocks(unet)):
        for rel, module in block.named_modules():
            if not rel:
                continue
            full = f"{path}.{rel}"
            if _is_attention(module):
                kind = "cross_attn" if module.is_cross_attention else "self_attn"
                site = Site(name=f"{full}.{PROBS}", kind=kind, direction=direction, block=index, divisor=divisor,
                            heads=int(module.heads), channels=int(module.to_q.in_features), order=0, module=full,
                            context_dim=int(module.to_k.in_features))
            elif _is_resnet(module):
                site = Site(name=f"{full}.{RESIDUAL}", kind="resnet", direction=direction, block=index,
                            divisor=divisor, heads=None, channels=int(module.conv2.out_channels), order=0, module=full)
            else:
                continue
            found.append(((seq, 0) + _order_key(rel), site))
        if getattr(block, "downsamplers", None):
            divisor *= 2
        if getattr(block, "upsamplers", None):
            divisor = max(1, divisor // 2)
        found.append(((seq, 1), Site(name=f"{path}.{OUT}", kind="block", direction=direction, block=index,
                                     divisor=divisor, heads=None, channels=int(block.resnets[-1].conv2.out_channels),
                                     order=0, module=path)))
    found.sort(key=lambda item: item[0])
    return {site.name: Site(**{**site.__dict__, "order": order}) for order, (_, site) in enumerate(found)}


class StandardAttention:
    """diffusers' `Attention` with its standard processors: what the UNet families (and PixArt) share."""

    def check_attention(self, module: nn.Module, name: str) -> None:
        used = [flag for flag in UNREPRODUCED if getattr(module, flag, None) is not None]
        if used:
            raise UnsupportedAttention(f"cannot capture {name}: its Attention uses {', '.join(used)}, which "
                                       "probability capture does not reproduce")

    def attention_call(self, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        return hidden, context, mask

    def attention_qk(self, attn: nn.Module, hidden: torch.Tensor, context: torch.Tensor | None,
                     mask: torch.Tensor | None):
        source = hidden if context is None else context
        q = split_heads(attn.to_q(hidden).float() * attn.scale, attn.heads)  # (B, h, N, d)
        k = split_heads(attn.to_k(source).float(), attn.heads)               # (B, h, K, d)
        bias = None
        if mask is not None:
            bias = attn.prepare_attention_mask(mask, k.shape[2], hidden.shape[0]).float()
            bias = bias.view(hidden.shape[0], attn.heads, *bias.shape[1:])  # (B, h, 1 or N, K)
        return q, k, bias



class UNetFamily(StandardAttention, Family):
    """A UNet2DConditionModel conditioned on one CLIP text encoder's last hidden states (SD 1.x / 2.x, mini),
    sampled with DDIM on SD's schedule at guidance 7.5 (SD's customary scale)."""

    denoiser_class = "UNet2DConditionModel"
    denoiser_folder = "unet"
    text_parts = (TextPart("", ("CLIPTextModel",), CLIP),)
    scheduler_class = "DDIMScheduler"
    default_guidance = 7.5

    def __init__(self, name: str, structure, structures: tuple[str, ...] = ()):
        self.name, self._structure = name, structure
        self.configs = {s: UNET_CONFIGS[s] for s in structures}
        self.tiny_configs = {s: TINY_UNET_CONFIGS[s] for s in structures}

    def tiny_parts(self, structure: str, words: list[str]) -> dict:
        tokenizer = tiny.word_tokenizer(words)
        parts = dict(unet=self.build(structure, tiny=True), vae=tiny.vae(), scheduler=tiny.ddim_schedule(),
                     text_encoder=tiny.clip_encoder(tokenizer), tokenizer=tokenizer)
        if len(self.text_parts) > 1:
            parts.update(text_encoder_2=tiny.clip_encoder(tokenizer, projection=True), tokenizer_2=tokenizer)
        return parts

    def matches(self, model: nn.Module) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(model, UNet2DConditionModel) and self._structure(model.config)

    def sites(self, model: nn.Module) -> dict[str, Site]:
        return unet_sites(model)

    def feature_module(self, model: nn.Module, site: Site) -> nn.Module:
        module = model.get_submodule(site.module)
        return module.conv2 if site.kind == "resnet" else module

    def encode_prompt(self, bb, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        return Conditioning(bb.text_encoder(token_ids(bb.tokenizer, prompts, bb.device))[0].to(bb.dtype))

    def context_conditioning(self, bb, context: torch.Tensor, batch: int, size: tuple[int, int]) -> Conditioning:
        return Conditioning(context.to(bb.device, bb.dtype).unsqueeze(0).expand(batch, -1, -1))

    def denoise(self, model: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        kwargs = {} if cond.added is None else {"added_cond_kwargs": cond.added}
        return model(latents, t, encoder_hidden_states=cond.context, **kwargs).sample

    def pipeline(self, bb):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
                                       scheduler=bb.scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


class SDXLFamily(UNetFamily):
    """SDXL: two text encoders' penultimate states side by side, pooled text embeddings and size time ids."""

    text_parts = (TextPart("", ("CLIPTextModel",), CLIP),
                  TextPart("_2", ("CLIPTextModelWithProjection",), CLIP))

    def __init__(self):
        super().__init__("sdxl", lambda config: config.get("addition_embed_type") == "text_time", ("sdxl",))

    def _time_ids(self, bb, batch: int, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=bb.dtype, device=bb.device).expand(batch, 6)

    def encode_prompt(self, bb, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        out1 = bb.text_encoder(token_ids(bb.tokenizer, prompts, bb.device), output_hidden_states=True)
        out2 = bb.text_encoder_2(token_ids(bb.tokenizer_2, prompts, bb.device), output_hidden_states=True)
        context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        added = {"text_embeds": out2.text_embeds.to(bb.dtype), "time_ids": self._time_ids(bb, len(prompts), size)}
        return Conditioning(context.to(bb.dtype), added)

    def context_conditioning(self, bb, context: torch.Tensor, batch: int, size: tuple[int, int]) -> Conditioning:
        """Zero pooled text embeddings and the image's size as time ids beside the learned context."""
        config = bb.unet.config
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(batch, pooled, device=bb.device, dtype=bb.dtype),
                 "time_ids": self._time_ids(bb, batch, size)}
        return Conditioning(super().context_conditioning(bb, context, batch, size).context, added)

    def pipeline(self, bb):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=bb.vae, text_encoder=bb.text_encoder, text_encoder_2=bb.text_encoder_2,
                                         tokenizer=bb.tokenizer, tokenizer_2=bb.tokenizer_2, unet=bb.unet,
                                         scheduler=bb.scheduler)


def _sd_blocks(config) -> bool:
    return list(config.get("down_block_types", [])) == SD1_DOWN_BLOCKS


register(SDXLFamily())
register(UNetFamily("sd2", lambda c: _sd_blocks(c) and bool(c.get("use_linear_projection")), ("sd21",)))
register(UNetFamily("sd1", lambda c: _sd_blocks(c) and not c.get("use_linear_projection"), ("sd15",)))
register(UNetFamily("custom", lambda c: c.get("addition_embed_type") is None))
