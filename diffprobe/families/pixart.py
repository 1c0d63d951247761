"""PixArt (PixArtTransformer2DModel): self- and cross-attention per block, as in the UNet, recomputed from the
module's inputs; T5 text states with their padding mask."""

from __future__ import annotations

from typing import Any

from einops import rearrange
import torch
from torch import nn

from diffprobe.families import tiny
from diffprobe.families.base import CLIP, T5, Conditioning, TextPart, TextStream, call_arguments, register
from diffprobe.families.transformer import MODULATION, TransformerFamily, attention_sites, numbered, out_site
from diffprobe.families.unet import StandardAttention
from diffprobe.hooks.sites import Site

# PixArt-Sigma-XL-2-1024-MS
PUBLISHED = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096,
                   interpolation_scale=2, use_additional_conditions=False)
TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                   cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=32, norm_num_groups=1,
                   use_additional_conditions=False)


class PixArtFamily(StandardAttention, TransformerFamily):
    """PixArtTransformer2DModel: per block attn1 (self) and attn2 (cross, T5 tokens); AdaLN-single (one
    timestep embedding for all blocks, each block adding its own scale-shift table: `hook_modulation`)."""

    name = "pixart"
    denoiser_class = "PixArtTransformer2DModel"
    text_parts = (TextPart("", ("T5EncoderModel", "CLIPTextModel"), T5 + CLIP),)
    scheduler_class = "DDIMScheduler"
    default_guidance = 4.5   # PixArtSigmaPipeline's
    configs = {"pixart": PUBLISHED}
    tiny_configs = {"pixart": TINY}

    def tiny_parts(self, structure: str, words: list[str]) -> dict:
        """PixArt's parts, tiny: a T5 encoder as wide as the captions (32) on a T5 tokenizer, its padding mask
        passed on as the pipeline does."""
        tokenizer = tiny.t5_tokenizer(words)
        width = int(self.tiny_configs[structure]["caption_channels"])
        return dict(unet=self.build(structure, tiny=True), vae=tiny.vae(), scheduler=tiny.ddim_schedule(),
                    text_encoder=tiny.t5_encoder(tokenizer, width), tokenizer=tokenizer)

    def text_streams(self, bb) -> tuple[TextStream, ...]:
        """One stream: T5's (PixArt's own encoder) or CLIP's (diffprobe-mini-dit)."""
        if bb.tokenizer is None:
            return ()
        if getattr(bb.text_encoder.config, "model_type", "") == "t5":
            return (TextStream("t5", "tokenizer", length=300),)   # PixArtSigmaPipeline's max_sequence_length
        return (TextStream("clip", "tokenizer"),)

    def attention_context(self, model: nn.Module, states: torch.Tensor) -> torch.Tensor:
        """Cross-attention reads the captions through the model's caption projection."""
        return model.caption_projection(states)

    def matches(self, model: nn.Module) -> bool:
        from diffusers import PixArtTransformer2DModel

        return isinstance(model, PixArtTransformer2DModel)

    def encode_prompt(self, bb, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        """The text encoder's last hidden states; a T5 encoder (PixArt's own) also gets and passes on the
        padding mask, as PixArt's pipeline does. CLIP encoders (diffprobe-mini-dit) are used as in SD."""
        (stream,) = self.text_streams(bb)
        ids = bb.tokenizer(prompts, padding="max_length", max_length=stream.padded_length(bb), truncation=True,
                           return_tensors="pt")
        if stream.name != "t5":
            return Conditioning(bb.text_encoder(ids.input_ids.to(bb.device))[0].to(bb.dtype))
        mask = ids.attention_mask.to(bb.device)
        context = bb.text_encoder(ids.input_ids.to(bb.device), attention_mask=mask)[0]
        return Conditioning(context.to(bb.dtype), {"encoder_attention_mask": mask})

    def context_conditioning(self, bb, context: torch.Tensor, batch: int, size: tuple[int, int]) -> Conditioning:
        return Conditioning(context.to(bb.device, bb.dtype).unsqueeze(0).expand(batch, -1, -1))

    def denoise(self, model: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The predicted noise; of a learned-sigma model (2C output channels) its first C channels, as PixArt's
        pipeline takes them."""
        t = t.reshape(-1).expand(latents.shape[0]) if t.numel() == 1 else t
        mask = None if cond.added is None else cond.added.get("encoder_attention_mask")
        out = model(latents, encoder_hidden_states=cond.context, timestep=t, encoder_attention_mask=mask,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return out[:, : latents.shape[1]]

    def pipeline(self, bb):
        from diffusers import PixArtSigmaPipeline

        return PixArtSigmaPipeline(tokenizer=bb.tokenizer, text_encoder=bb.text_encoder, vae=bb.vae,
                                   transformer=bb.unet, scheduler=bb.scheduler)

    def sites(self, model: nn.Module) -> dict[str, Site]:
        p = int(model.config.patch_size)
        found = []
        for i, block in enumerate(model.transformer_blocks):
            path = f"transformer_blocks.{i}"
            found += attention_sites(f"{path}.attn1", block.attn1, i, "dit", p, False, None)
            if getattr(block, "attn2", None) is not None:
                found += attention_sites(f"{path}.attn2", block.attn2, i, "dit", p, False, None, "cross_attn")
            found.append(out_site(path, i, "dit", p, int(block.attn1.to_q.in_features)))
            if getattr(block, "scale_shift_table", None) is not None:   # AdaLN-single: read at the block's end
                found.append(Site(name=f"{path}.{MODULATION}", kind="modulation", direction="dit", block=i, divisor=p,
                                  heads=None, channels=int(block.scale_shift_table.numel()), order=0, module=path))
        return numbered(found)

    def feature_tensor(self, site, output: Any, grid: tuple[int, int], call: tuple) -> torch.Tensor:
        """hook_modulation: the block's scale-shift table plus the call's timestep embedding, (B, 6 C) in diffusers'
        chunk order (shift, scale, gate of the attention, then of the feed-forward), what the block computes."""
        if site.kind != "modulation":
            return super().feature_tensor(site, output, grid, call)
        module, args, kwargs = call
        t = call_arguments(module, args, kwargs)["timestep"]
        table = module.scale_shift_table                                            # (6, C)
        return rearrange(table[None] + rearrange(t, "b (k c) -> b k c", k=table.shape[0]), "b k c -> b (k c)")


    def put_feature(self, site, output: Any, value: torch.Tensor, grid: tuple[int, int]) -> Any:
        if site.kind == "modulation":
            from diffprobe.errors import DiffprobeError

            raise DiffprobeError(f"{site.name}: PixArt's modulation is made inside the block from its inputs; it can be "
                                 "read, not edited")
        return super().put_feature(site, output, value, grid)


register(PixArtFamily())
