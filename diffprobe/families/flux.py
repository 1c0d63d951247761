"""FLUX (FluxTransformer2DModel): double-stream joint blocks over [text, image], single-stream blocks, rotary
embeddings and qk RMSNorm, captured at the SDPA call; packed 2 x 2 latent tokens; guidance-distilled."""

from __future__ import annotations

from einops import rearrange
import torch
from torch import nn

from diffprobe.families import tiny
from diffprobe.families.base import CLIP, T5, Conditioning, TextPart, TextStream, call_arguments, register, token_ids
from diffprobe.families.transformer import JointAttentionFamily, attention_sites, modulation_site, numbered, out_site
from diffprobe.hooks.sites import Site

# FLUX.1-dev
PUBLISHED = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=[16, 56, 56])
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
                 axes_dims_rope=[2, 2, 4])


class FluxFamily(JointAttentionFamily):
    """FluxTransformer2DModel: double-stream blocks (joint attention over [text, image]), then single-stream
    blocks (one attention over the concatenated [text, image] sequence); RoPE and qk RMSNorm in every
    attention. Its input is packed latent tokens (B, h*w, 4C), each a 2x2 patch of latent pixels: the token grid
    comes from `img_ids`. Conditioned as FLUX's pipeline does: CLIP's pooled output, T5's states, zero text
    position ids, the distilled guidance embedding at the pipeline's default scale."""

    name = "flux"
    denoiser_class = "FluxTransformer2DModel"
    text_parts = (TextPart("", ("CLIPTextModel",), CLIP), TextPart("_2", ("T5EncoderModel",), T5))
    streams = (TextStream("t5", "tokenizer_2", length=512),)
    """T5's states, padded to FluxPipeline's max_sequence_length; CLIP gives only the pooled vector."""
    no_upsampled_queries = ("its queries carry rotary embeddings of their positions, so queries at upsampled "
                            "positions would not be the model's")
    configs = {"flux": PUBLISHED}
    tiny_configs = {"flux": TINY}
    latent_per_token = 2
    default_sample_size = 128   # FluxPipeline's default latent side (1024 px)
    default_guidance = 3.5      # FluxPipeline's default guidance_scale; also the guidance embedding of one-step calls
    classifier_free = False     # guidance-distilled: the scale goes into the guidance embedding

    def encode_prompt(self, bb, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        """As FluxPipeline: T5's last states (its tokenizer's full length) as the context, CLIP's pooled output."""
        pooled = bb.text_encoder(token_ids(bb.tokenizer, prompts, bb.device), output_hidden_states=False).pooler_output
        context = bb.text_encoder_2(self.streams[0].ids(bb, prompts), output_hidden_states=False)[0]
        return Conditioning(context.to(bb.dtype), {"pooled_projections": pooled.to(bb.dtype)})

    def denoise(self, model: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The flow velocity for latents (B, C, h, w): packed into 2x2 tokens with their position ids, the
        timestep as a fraction of 1000, unpacked again."""
        b, c, h, w = latents.shape
        tokens = rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)  # FLUX's 2 x 2 packing
        ids = torch.zeros(h // 2, w // 2, 3, device=latents.device, dtype=latents.dtype)
        ids[..., 1] += torch.arange(h // 2, device=latents.device)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=latents.device)[None, :]
        t = (t.reshape(-1).expand(b) if t.numel() == 1 else t).to(latents.dtype) / 1000
        guidance = None
        if model.config.guidance_embeds:   # generation passes its scale as conditioning; one-step drives use 3.5
            given = (cond.added or {}).get("guidance")
            guidance = (torch.full((b,), self.default_guidance) if given is None else given).to(latents.device,
                                                                                               latents.dtype)
        text_ids = torch.zeros(cond.context.shape[1], 3, device=latents.device, dtype=latents.dtype)
        out = model(hidden_states=tokens, timestep=t, guidance=guidance, encoder_hidden_states=cond.context,
                    pooled_projections=cond.added["pooled_projections"], txt_ids=text_ids,
                    img_ids=ids.reshape(-1, 3)).sample
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // 2, ph=2, pw=2)

    def context_conditioning(self, bb, context: torch.Tensor, batch: int, size: tuple[int, int]) -> Conditioning:
        from diffprobe.errors import DiffprobeError

        raise DiffprobeError("flux: learned contexts (keypoints) need maps at upsampled queries, and FLUX's queries "
                             "carry rotary embeddings of their token positions; use model=sd3 or a UNet model")

    def sampler(self, bb, num_steps: int, size: tuple[int, int]):
        """FluxPipeline's schedule: sigmas from 1 to 1/num_steps, shifted by mu, which grows with the number of
        image tokens (diffusers' calculate_shift on the scheduler's settings)."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler.config)
        config = scheduler.config
        tokens = (size[0] // bb.grid_factor) * (size[1] // bb.grid_factor)
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(num_steps, device=bb.device, sigmas=sigmas, mu=mu)
        return scheduler

    def tiny_parts(self, structure: str, words: list[str]) -> dict:
        """CLIP 16 wide (the pooled projection) and a T5 encoder 32 wide (the joint width) on a T5 tokenizer: the
        context's positions are T5's tokens; FLUX.1's schedule."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        tokenizer, t5 = tiny.word_tokenizer(words), tiny.t5_tokenizer(words)
        unet = self.build(structure, tiny=True)
        unet.register_to_config(sample_size=8)  # FLUX's config has no sample size; its pipeline defaults to 128
        return dict(unet=unet, vae=tiny.vae(shift=0.1),
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                              max_shift=1.15),
                    text_encoder=tiny.clip_encoder(tokenizer, hidden_size=16, intermediate_size=16,
                                                   num_attention_heads=2), tokenizer=tokenizer,
                    text_encoder_2=tiny.t5_encoder(t5), tokenizer_2=t5)

    def pipeline(self, bb):
        from diffusers import FluxPipeline

        return FluxPipeline(transformer=bb.unet, scheduler=bb.scheduler, vae=bb.vae, text_encoder=bb.text_encoder,
                            tokenizer=bb.tokenizer, text_encoder_2=bb.text_encoder_2, tokenizer_2=bb.tokenizer_2)

    def matches(self, model: nn.Module) -> bool:
        from diffusers import FluxTransformer2DModel

        return isinstance(model, FluxTransformer2DModel)

    def model_call(self, model: nn.Module, args: tuple, kwargs: dict):
        bound = call_arguments(model, args, kwargs)
        ids = bound["img_ids"].reshape(-1, bound["img_ids"].shape[-1])
        return (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1), bound["timestep"]

    def sites(self, model: nn.Module) -> dict[str, Site]:
        found = []
        for i, block in enumerate(model.transformer_blocks):
            path = f"transformer_blocks.{i}"
            found += modulation_site(path, block, i, "dit", 1, "norm1")
            found += attention_sites(f"{path}.attn", block.attn, i, "dit", 1, True, True)
            found.append(out_site(path, i, "dit", 1, int(block.attn.to_q.in_features)))
        for i, block in enumerate(model.single_transformer_blocks):
            path = f"single_transformer_blocks.{i}"
            found += modulation_site(path, block, i, "single", 1, "norm")
            found += attention_sites(f"{path}.attn", block.attn, i, "single", 1, True, True)
            found.append(out_site(path, i, "single", 1, int(block.attn.to_q.in_features)))
        return numbered(found)


register(FluxFamily())
