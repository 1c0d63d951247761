"""diffusers diffusion transformers: PixArt (self- and cross-attention, as in the UNet), SD3 / SD3.5 (joint
attention over image and text tokens, qk norms, SD3.5's extra image self-attention) and FLUX (double-stream
joint blocks, single-stream blocks, rotary embeddings, qk RMSNorm).

Sites come from the module tree in execution order: per transformer block its attention module(s), then the
block's output (`hook_out`, the image tokens as a (C, h, w) map on the patch grid). PixArt's attention is
recomputed from the module's inputs like the UNet's; SD3's and FLUX's attention is captured at the module's
scaled_dot_product_attention call (diffprobe.hooks.kernel), where q and k are exactly what the model uses.
Per-block AdaLN modulation is a site of its own (`hook_modulation`, kind `modulation`): the (B, k * C) output
of the block's AdaLN projection, diffusers' shift, scale and gate vectors in its chunk order, so a head can
see (and undo) what the timestep does to `hook_out`, whose massive activations it explains.
"""

from __future__ import annotations

from typing import Any

from einops import rearrange
import torch
from torch import nn

from diffprobe.backends.base import Backend, Conditioning, call_arguments, register, token_ids
from diffprobe.backends.unet import StandardAttention
from diffprobe.hooks.attention import split_heads, upsample_tokens
from diffprobe.hooks.sites import JOINT_PARTS, OUT, PROBS, Site

MODULATION = "hook_modulation"


def _attention_sites(path: str, attn: nn.Module, block: int, direction: str, divisor: int, joint: bool,
                     text_first: bool | None, kind: str = "self_attn") -> list[Site]:
    """The sites of one attention module: one map, or a joint map and its four blocks."""
    common = dict(direction=direction, block=block, divisor=divisor, heads=int(attn.heads),
                  channels=int(attn.to_q.in_features), order=0, module=path)
    if not joint:
        context = attn.to_k.in_features
        return [Site(name=f"{path}.{PROBS}", kind=kind, context_dim=int(context), **common)]
    context = attn.add_k_proj.in_features if getattr(attn, "add_k_proj", None) is not None else attn.to_k.in_features
    sites = [Site(name=f"{path}.{PROBS}", kind="joint_attn", context_dim=int(context), text_first=text_first,
                  **common)]
    sites += [Site(name=f"{path}.hook_{part}", kind=kind_, context_dim=int(context), part=part,
                   text_first=text_first, **common) for part, kind_ in JOINT_PARTS.items()]
    return sites


def _modulation_site(path: str, block: nn.Module, index: int, direction: str, divisor: int, norm: str) -> list[Site]:
    """The block's AdaLN modulation (the output of its norm module's projection), when it has one: it runs
    first in the block."""
    module = getattr(block, norm, None)
    if module is None or not hasattr(module, "linear"):
        return []
    return [Site(name=f"{path}.{MODULATION}", kind="modulation", direction=direction, block=index, divisor=divisor,
                 heads=None, channels=int(module.linear.out_features), order=0, module=f"{path}.{norm}.linear")]


def _out_site(path: str, index: int, direction: str, divisor: int, channels: int) -> Site:
    """The block's image-token output, the last of its sites to fire."""
    return Site(name=f"{path}.{OUT}", kind="block", direction=direction, block=index, divisor=divisor, heads=None,
                channels=channels, order=0, module=path)


def _numbered(sites: list[Site]) -> dict[str, Site]:
    return {s.name: Site(**{**s.__dict__, "order": i}) for i, s in enumerate(sites)}


class TransformerBackend(Backend):
    """What the diffusers transformers share: patch-grid sites and image-token block outputs."""

    def feature_module(self, model: nn.Module, site) -> nn.Module:
        return model.get_submodule(site.module)

    def feature_tensor(self, site, output: Any, grid: tuple[int, int]) -> torch.Tensor:
        """hook_out: the block's image tokens (B, h*w, C) as (B, C, h, w); hook_modulation: (B, D) as is."""
        if site.kind == "modulation":
            return output
        tokens = output[1] if isinstance(output, tuple) else output
        return rearrange(tokens, "b (h w) c -> b c h w", h=grid[0], w=grid[1])


class PixArtBackend(StandardAttention, TransformerBackend):
    """PixArtTransformer2DModel: per block attn1 (self) and attn2 (cross, T5 tokens); AdaLN-single (one
    timestep embedding for all blocks, each block adding its own scale-shift table, so no per-block site)."""

    name = "pixart"

    def matches(self, model: nn.Module) -> bool:
        from diffusers import PixArtTransformer2DModel

        return isinstance(model, PixArtTransformer2DModel)

    def encode_prompt(self, bb, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        """The text encoder's last hidden states; a T5 encoder (PixArt's own) also gets and passes on the
        padding mask, as PixArt's pipeline does. CLIP encoders (diffprobe-mini-dit) are used as in SD."""
        ids = bb.tokenizer(prompts, padding="max_length", max_length=bb.tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        if getattr(bb.text_encoder.config, "model_type", "") != "t5":
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
            found += _attention_sites(f"{path}.attn1", block.attn1, i, "dit", p, False, None)
            if getattr(block, "attn2", None) is not None:
                found += _attention_sites(f"{path}.attn2", block.attn2, i, "dit", p, False, None, "cross_attn")
            found.append(_out_site(path, i, "dit", p, int(block.attn1.to_q.in_features)))
        return _numbered(found)


class JointAttentionBackend(TransformerBackend):
    """Rectified-flow transformers with joint attention, captured at the SDPA call."""

    captures_at_kernel = True
    flow_matching = True

    def check_attention(self, module: nn.Module, name: str) -> None:
        """Nothing to refuse up front: a processor that does not call SDPA once is refused when it runs."""

    def noisy_latents(self, bb, latents: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Rectified flow: x_t = (1 - s) x_0 + s e with s = t / num_train_timesteps (SD3's and FLUX's training)."""
        s = t / bb.scheduler.config.num_train_timesteps
        return (1 - s) * latents + s * noise


class SD3Backend(JointAttentionBackend):
    """SD3Transformer2DModel: joint attention over [image tokens, text tokens] per block (SD3.5's qk norms
    included), SD3.5's second image-only attention (attn2), AdaLN-Zero modulation per block; conditioned on two
    CLIP encoders and T5 as SD3's pipeline does."""

    name = "sd3"
    upsamples_queries = True

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
            t5 = bb.text_encoder_3(token_ids(bb.tokenizer_3, prompts, bb.device))[0]
        else:
            t5 = torch.zeros(len(prompts), bb.tokenizer.model_max_length, width, device=bb.device)
        context = torch.cat([clip, t5.to(clip.dtype)], dim=1)
        return Conditioning(context.to(bb.dtype), {"pooled_projections": pooled.to(bb.dtype)})

    def text_tokens(self, bb) -> int:
        """CLIP's states (77), then T5's (its tokenizer's length) or as many zeros as CLIP's."""
        clip = int(bb.tokenizer.model_max_length)
        return clip + (int(bb.tokenizer_3.model_max_length) if bb.text_encoder_3 is not None else clip)

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
        q = split_heads(attn.to_q(upsample_tokens(hidden, grid, size).to(hidden.dtype)), attn.heads)
        return q if attn.norm_q is None else attn.norm_q(q)

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
            found += _modulation_site(path, block, i, "dit", p, "norm1")
            found += _attention_sites(f"{path}.attn", block.attn, i, "dit", p, True, False)
            if getattr(block, "attn2", None) is not None:
                found += _attention_sites(f"{path}.attn2", block.attn2, i, "dit", p, False, None)
            found.append(_out_site(path, i, "dit", p, int(block.attn.to_q.in_features)))
        return _numbered(found)


class FluxBackend(JointAttentionBackend):
    """FluxTransformer2DModel: double-stream blocks (joint attention over [text, image]), then single-stream
    blocks (one attention over the concatenated [text, image] sequence); RoPE and qk RMSNorm in every
    attention. Its input is packed latent tokens (B, h*w, 4C), each a 2x2 patch of latent pixels: the token grid
    comes from `img_ids`. Conditioned as FLUX's pipeline does: CLIP's pooled output, T5's states, zero text
    position ids, the distilled guidance embedding at the pipeline's default scale."""

    name = "flux"
    latent_per_token = 2
    default_sample_size = 128   # FluxPipeline's default latent side (1024 px)
    default_guidance = 3.5      # FluxPipeline's default guidance_scale; also the guidance embedding of one-step calls
    classifier_free = False     # guidance-distilled: the scale goes into the guidance embedding

    def encode_prompt(self, bb, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        """As FluxPipeline: T5's last states (its tokenizer's full length) as the context, CLIP's pooled output."""
        pooled = bb.text_encoder(token_ids(bb.tokenizer, prompts, bb.device), output_hidden_states=False).pooler_output
        context = bb.text_encoder_2(token_ids(bb.tokenizer_2, prompts, bb.device), output_hidden_states=False)[0]
        return Conditioning(context.to(bb.dtype), {"pooled_projections": pooled.to(bb.dtype)})

    def text_tokens(self, bb) -> int:
        return int(bb.tokenizer_2.model_max_length)

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
            found += _modulation_site(path, block, i, "dit", 1, "norm1")
            found += _attention_sites(f"{path}.attn", block.attn, i, "dit", 1, True, True)
            found.append(_out_site(path, i, "dit", 1, int(block.attn.to_q.in_features)))
        for i, block in enumerate(model.single_transformer_blocks):
            path = f"single_transformer_blocks.{i}"
            found += _modulation_site(path, block, i, "single", 1, "norm")
            found += _attention_sites(f"{path}.attn", block.attn, i, "single", 1, True, True)
            found.append(_out_site(path, i, "single", 1, int(block.attn.to_q.in_features)))
        return _numbered(found)


register(PixArtBackend())
register(SD3Backend())
register(FluxBackend())
