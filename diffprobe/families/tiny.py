"""Parts of tiny random models the families share: a word tokenizer, CLIP and T5 text encoders, a VAE and SD's
DDIM schedule, each a few channels wide, built offline from configs."""

from __future__ import annotations

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64,
    block_out_channels=[8, 16, 16, 16], scaling_factor=0.18215,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)
CLIP_CONFIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=77, projection_dim=16)


def word_tokenizer(words: list[str] = (), max_length: int = 77):
    """A CLIPTokenizer built offline: byte-level characters plus each of `words` as one token."""
    from transformers import CLIPTokenizer

    from diffprobe.mini.tokenizer import build_vocab

    vocab, merges = build_vocab(list(words))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def clip_encoder(tokenizer, projection: bool = False, **sizes):
    """A CLIP text encoder (with a projection: SDXL's and SD3's second) on `tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{**CLIP_CONFIG, **sizes},
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_encoder(tokenizer, width: int = 32):
    """A one-layer T5 encoder `width` wide on `tokenizer`'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=37, num_layers=1,
                                   num_heads=2))


def vae(shift: float | None = None):
    """SD's VAE structure, 8 to 16 channels (shift: SD3's and FLUX's latent shift factor)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG, **({"shift_factor": shift} if shift is not None else {}))


def ddim_schedule():
    """SD's training schedule read as DDIM."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def t5_tokenizer(words: list[str] = (), max_length: int = 512):
    """A T5 (sentencepiece unigram) tokenizer built offline, as T5's: "▁word" for each of `words`, single
    characters for everything else, </s> last; 512 long as T5's (each pipeline cuts it to its own length)."""
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [(f"▁{w}", -1.0) for w in words]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
