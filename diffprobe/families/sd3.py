"""SD3 / SD3.5 (SD3Transformer2DModel): joint attention over [image tokens, text tokens] per block with SD3.5's qk
norms and second image self-attention, captured at the SDPA call; two CLIP encoders and T5 as SD3's pipeline."""

from __future__ import annotations

import torch
from torch import nn

from diffprobe.families import tiny
from diffprobe.families.base import CLIP, T5, Conditioning, TextPart, TextStream, register, token_ids
from diffprobe.families.transformer import JointAttentionFamily, attention_sites, modulation_site, numbered, out_site
from diffprobe.hooks.attention import split_heads, upsample_tokens
from diffprobe.hooks.sites import Site

# stable-diffusion-3-medium
SD3 = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
# stable-diffusion-3.5-medium: qk RMSNorm and a second image self-attention in blocks 0-12
SD35 = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                 dual_attention_layers=list(range(13)), qk_norm="rms_norm")
TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                pos_embed_max_size=16)
TINY_SD35 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
                 out_channels=4, pos_embed_max_size=16, dual_attention_layers=[0], qk_norm="rms_norm")


T5_LENGTH = 256   # StableDiffusion3Pipeline's max_sequence_length


class SD3Family(JointAttentionFamily):
    """SD3Transformer2DModel: joint attention over [image tokens, text tokens] per block (SD3.5's qk norms
    included), SD3.5's second image-only attention (attn2), AdaLN-Zero modulation per block; conditioned on two
    CLIP encoders and T5 as SD3's pipeline does."""

    name = "sd3"
    denoiser_class = "SD3Transformer2DModel"
    text_parts = (TextPart("", ("CLIPTextModelWithProjection",), CLIP),
                  TextPart("_2", ("CLIPTextModelWithProjection",), CLIP),
                  TextPart("_3", ("T5EncoderModel",), T5, optional=True))
    default_guidance = 7.0   # StableDiffusion3Pipeline's
    upsamples_queries = True
    configs = {"sd3": SD3, "sd35": SD35}
    tiny_configs = {"sd3": TINY_SD3, "sd35": TINY_SD35}

    def tiny_parts(self, structure: str, words: list[str]) -> dict:
        """Two CLIPs with projections (8 + 8 wide: states padded to the joint width 32, pooled 16) and a T5
        encoder 32 wide on a T5 tokenizer; SD3's flow-matching schedule (shift 3)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        tokenizer, t5 = tiny.word_tokenizer(words), tiny.t5_tokenizer(words)
        clip = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, projection_dim=8)
        return dict(unet=self.build(structure, tiny=True), vae=tiny.vae(shift=0.1),
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                    text_encoder=tiny.clip_encoder(tokenizer, projection=True, **clip), tokenizer=tokenizer,
                    text_encoder_2=tiny.clip_encoder(tokenizer, projection=True, **clip), tokenizer_2=tokenizer,
                    text_encoder_3=tiny.t5_encoder(t5), tokenizer_3=t5)

    def matches(self, model: nn.Module) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(model, SD3Transformer2DModel)

    @staticmethod
    def _clip(bb, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both CLIP encoders' penultimate states side by side (B, 77, D1 + D2) and pooled embeddings (B, P1 + P2)."""
        states, pooled = [], []
        for encoder, tokenizer in ((bb.text_encoder, bb.tokenizer), (bb.text_encoder_2, bb.tokenizer_2)):
            out = encoder(token_ids(tokenizer, prompts, bb.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        return torch.cat(states, dim=-1), torch.cat(pooled, dim=-1)

    def encode_prompt(self, bb, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        """As SD3's pipeline: both CLIP encoders' penultimate states side by side, zero-padded to the joint width,
        then the T5 states (zeros of CLIP's length without a T5) along the sequence; pooled CLIP embeddings."""
        clip, pooled = self._clip(bb, prompts)
        width = int(bb.unet.config.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        if bb.text_encoder_3 is not None:
            t5 = bb.text_encoder_3(self.text_streams(bb)[1].ids(bb, prompts))[0]
        else:
            t5 = torch.zeros(len(prompts), bb.tokenizer.model_max_length, width, device=bb.device)
        context = torch.cat([clip, t5.to(clip.dtype)], dim=1)
        return Conditioning(context.to(bb.dtype), {"pooled_projections": pooled.to(bb.dtype)})

    def text_streams(self, bb) -> tuple[TextStream, ...]:
        """CLIP's tokens (both CLIPs' states side by side, 77), then T5's when a T5 is loaded (without it, the
        columns after CLIP's are zeros: no stream)."""
        clip = TextStream("clip", "tokenizer")
        if bb.text_encoder_3 is None:
            return (clip,)
        return clip, TextStream("t5", "tokenizer_3", int(bb.tokenizer.model_max_length), T5_LENGTH)

    def text_tokens(self, bb) -> int:
        """CLIP's states (77), then T5's (256, the pipeline's max_sequence_length) or as many zeros as CLIP's."""
        clip, *t5 = self.text_streams(bb)
        return clip.padded_length(bb) + (t5[0].padded_length(bb) if t5 else clip.padded_length(bb))

    def context_conditioning(self, bb, context: torch.Tensor, batch: int, size: tuple[int, int]) -> Conditioning:
        """A learned context (T, D) as the whole text stream of the joint attention (keypoints), with the pooled
        CLIP embeddings of the empty prompt (the pipeline's unconditional ones), encoded once per backbone: a
        keypoints fit asks for this conditioning at every step."""
        pooled = getattr(bb, "_empty_pooled", None)
        if pooled is None:
            with torch.no_grad():
                pooled = bb._empty_pooled = self._clip(bb, [""])[1]
        pooled = pooled.to(bb.device, bb.dtype)
        return Conditioning(context.to(bb.device, bb.dtype).unsqueeze(0).expand(batch, -1, -1),
                            {"pooled_projections": pooled.expand(batch, -1)})

    def upsampled_queries(self, attn: nn.Module, hidden: torch.Tensor, grid: tuple[int, int],
                          size: tuple[int, int]) -> torch.Tensor:
        """As JointAttnProcessor2_0 builds the image queries: to_q, heads split, qk norm (SD3.5), on the input
        upsampled bicubically (the projection is linear, so this is to_q's output upsampled; the norm is not)."""
        q = split_heads(attn.to_q(upsample_tokens(hidden, grid, size)), attn.heads)
        return q if attn.norm_q is None else attn.norm_q(q)

    def max_latent_side(self, model: nn.Module) -> int:
        """pos_embed_max_size patches a side (SD3-medium: 192, 3072 px)."""
        return model.config.pos_embed_max_size * model.config.patch_size

    def denoise(self, model: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's output: the flow velocity (noise minus data), not the noise."""
        t = t.reshape(-1).expand(latents.shape[0]) if t.numel() == 1 else t
        return model(hidden_states=latents, encoder_hidden_states=cond.context, timestep=t,
                     pooled_projections=cond.added["pooled_projections"]).sample

    def pipeline(self, bb):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(transformer=bb.unet, scheduler=bb.scheduler, vae=bb.vae,
                                        text_encoder=bb.text_encoder, tokenizer=bb.tokenizer,
                                        text_encoder_2=bb.text_encoder_2, tokenizer_2=bb.tokenizer_2,
                                        text_encoder_3=bb.text_encoder_3, tokenizer_3=bb.tokenizer_3)

    def sites(self, model: nn.Module) -> dict[str, Site]:
        p = int(model.config.patch_size)
        found = []
        for i, block in enumerate(model.transformer_blocks):
            path = f"transformer_blocks.{i}"
            found += modulation_site(path, block, i, "dit", p, "norm1")
            found += attention_sites(f"{path}.attn", block.attn, i, "dit", p, True, False)
            if getattr(block, "attn2", None) is not None:
                found += attention_sites(f"{path}.attn2", block.attn2, i, "dit", p, False, None)
            found.append(out_site(path, i, "dit", p, int(block.attn.to_q.in_features)))
        return numbered(found)


register(SD3Family())
