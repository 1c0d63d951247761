"""AuraFlow (AuraFlowTransformer2DModel): MMDiT blocks with joint attention over [text, image] tokens, then
single-stream blocks over the concatenated sequence, qk LayerNorms, learned positions (no rotary embeddings),
captured at the SDPA call. The text stream starts with 8 learned register tokens, then UMT5's states (padding
zeroed, as AuraFlowPipeline does); rectified flow with the timestep as a fraction of 1000; classifier-free guidance.
"""

from __future__ import annotations

import math

from typing import Any

import torch
from torch import nn

from diffprobe.families import tiny
from diffprobe.families.base import Conditioning, TextPart, TextStream, register
from diffprobe.families.transformer import JointAttentionFamily, attention_sites, modulation_site, numbered, out_site
from diffprobe.hooks.sites import Site

# fal/AuraFlow-v0.3 (AuraFlowTransformer2DModel's defaults)
PUBLISHED = dict(sample_size=64, patch_size=2, in_channels=4, num_mmdit_layers=4, num_single_dit_layers=32,
                 attention_head_dim=256, num_attention_heads=12, joint_attention_dim=2048, caption_projection_dim=3072,
                 out_channels=4, pos_embed_max_size=1024)
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
            out_channels=4, pos_embed_max_size=256)
LLAMA = ("LlamaTokenizerFast", "LlamaTokenizer")


def tiny_tokenizer(words: list[str], max_length: int = 256):
    """A Llama (sentencepiece BPE) tokenizer built offline, as AuraFlow's: "▁word" for each of `words` through
    merges of its letters, single characters for everything else, <s> first."""
    import string

    from transformers import LlamaTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", "▁", *string.ascii_letters, *string.digits,
                                          *string.punctuation])}
    merges = []
    for word in words:
        piece = "▁"
        for ch in word:
            if (piece, ch) not in merges:
                merges.append((piece, ch))
            piece += ch
            vocab.setdefault(piece, len(vocab))
    return LlamaTokenizerFast(vocab=vocab, merges=merges, pad_token="<pad>", model_max_length=max_length)


class AuraFlowFamily(JointAttentionFamily):
    """AuraFlowTransformer2DModel conditioned on UMT5 as AuraFlowPipeline does."""

    name = "auraflow"
    denoiser_class = "AuraFlowTransformer2DModel"
    text_parts = (TextPart("", ("UMT5EncoderModel",), LLAMA),)
    streams = (TextStream("umt5", "tokenizer", 8, 256),)  # after the model's 8 registers; AuraFlowPipeline's length
    default_guidance = 3.5      # AuraFlowPipeline's
    no_upsampled_queries = ("its single-stream blocks project text and image tokens as one input, whose queries "
                            "diffprobe does not recompute at upsampled positions")
    concept_path = None   # its joint blocks' text stream differs from MM-DiT's; not ported
    configs = {"auraflow": PUBLISHED}
    tiny_configs = {"auraflow": TINY}

    def matches(self, model: nn.Module) -> bool:
        from diffusers import AuraFlowTransformer2DModel

        return isinstance(model, AuraFlowTransformer2DModel)

    def encode_prompt(self, bb, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        """UMT5's last states at the tokenizer's full length, zero where the prompt is padding (the pipeline's)."""
        ids = bb.tokenizer(prompts, truncation=True, max_length=self.streams[0].padded_length(bb),
                           padding="max_length", return_tensors="pt")
        mask = ids.attention_mask.to(bb.device)
        states = bb.text_encoder(input_ids=ids.input_ids.to(bb.device), attention_mask=mask)[0]
        return Conditioning((states * mask.unsqueeze(-1).to(states.dtype)).to(bb.dtype))

    def context_conditioning(self, bb, context: torch.Tensor, batch: int, size: tuple[int, int]) -> Conditioning:
        return Conditioning(context.to(bb.device, bb.dtype).unsqueeze(0).expand(batch, -1, -1))

    def max_latent_side(self, model: nn.Module) -> int:
        """Its position table holds pos_embed_max_size patches, a square of their square root a side."""
        return math.isqrt(model.config.pos_embed_max_size) * model.config.patch_size

    def denoise(self, model: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The flow velocity; the timestep goes in as t / 1000 (AuraFlow's t=1 is noise)."""
        t = (t.reshape(-1).expand(latents.shape[0]) if t.numel() == 1 else t).to(latents.dtype) / 1000
        return model(latents, encoder_hidden_states=cond.context, timestep=t).sample

    def feature_tensor(self, site, output: Any, grid: tuple[int, int], call: tuple) -> torch.Tensor:
        """A single-stream block's output is [text, image] tokens: its last h*w are the image's."""
        if site.kind == "block" and not isinstance(output, tuple):
            output = output[:, -grid[0] * grid[1]:]
        return super().feature_tensor(site, output, grid, call)

    def put_feature(self, site, output: Any, value: torch.Tensor, grid: tuple[int, int]) -> Any:
        """A single-stream block's image tokens are the last h*w of its [text, image] output."""
        if site.kind == "block" and not isinstance(output, tuple):
            n = grid[0] * grid[1]
            return torch.cat([output[:, :-n], super().put_feature(site, output[:, -n:], value, grid)], 1)
        return super().put_feature(site, output, value, grid)

    def sites(self, model: nn.Module) -> dict[str, Site]:
        p = int(model.config.patch_size)
        found = []
        for stream, blocks in (("dit", model.joint_transformer_blocks), ("single", model.single_transformer_blocks)):
            prefix = "joint_transformer_blocks" if stream == "dit" else "single_transformer_blocks"
            for i, block in enumerate(blocks):
                path = f"{prefix}.{i}"
                found += modulation_site(path, block, i, stream, p, "norm1")
                found += attention_sites(f"{path}.attn", block.attn, i, stream, p, True, True)
                found.append(out_site(path, i, stream, p, int(block.attn.to_q.in_features)))
        return numbered(found)

    def tiny_parts(self, structure: str, words: list[str]) -> dict:
        """A UMT5 encoder 32 wide on a Llama-style sentencepiece tokenizer; SDXL's VAE structure; flow matching."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import UMT5Config, UMT5EncoderModel

        tokenizer = tiny_tokenizer(words)
        encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                              num_heads=2, pad_token_id=tokenizer.pad_token_id))
        return dict(unet=self.build(structure, tiny=True), vae=tiny.vae(), tokenizer=tokenizer,
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73), text_encoder=encoder)

    def pipeline(self, bb):
        from diffusers import AuraFlowPipeline

        return AuraFlowPipeline(tokenizer=bb.tokenizer, text_encoder=bb.text_encoder, vae=bb.vae, transformer=bb.unet,
                                scheduler=bb.scheduler)


register(AuraFlowFamily())
