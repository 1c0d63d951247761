"""A word's columns are a backend fact. On every family's tiny model (whose text parts mirror the real pipeline's:
FLUX's and SD3's T5 with a tokenizer of its own, padded to the pipeline's length; AuraFlow's Llama tokenizer that
pads on the left), each word's columns hold that word's tokens in the stream the denoiser attends to. A planted
model, whose joint attention sends exactly the pixels of a known mask to the word's tokens, shows that the right
columns give that mask and the wrong ones do not."""

import pytest
import torch
from einops import rearrange

from diffprobe.drives import encode_prompt
from diffprobe.errors import DiffprobeError
from diffprobe.hooks import Reduce
from diffprobe.loading import tiny_backbone

PROMPT, WORDS = "a photo of a cat and a dog", ["cat", "dog"]


@pytest.mark.parametrize("structure", ["sd15", "sd21", "sdxl", "pixart", "sd3", "flux", "auraflow"])
def test_each_words_columns_decode_back_to_the_word_through_its_streams_tokenizer(structure):
    bb = tiny_backbone(structure)
    tokens = bb.context_tokens(PROMPT)                     # what each column of the text stream holds
    text = next(s.text_tokens for s in bb.probe.sites.values() if s.kind == "cross_attn")
    assert len(tokens) == text == bb.max_tokens            # one name per column the sites record
    for stream in bb.text_streams:
        tokenizer, ids = getattr(bb, stream.tokenizer), bb.stream_ids(stream, PROMPT)
        for word, columns in zip(WORDS, bb.word_positions(PROMPT, WORDS, stream=stream.name)):
            assert all(stream.offset <= c < stream.offset + len(ids) for c in columns)
            assert tokenizer.decode([ids[c - stream.offset] for c in columns]).strip() == word, (structure, columns)
    if structure == "sdxl":   # two CLIPs side by side: the second tokenizer puts the word at the same columns
        assert bb.tokenizer_2(PROMPT).input_ids[:9] == bb.tokenizer(PROMPT).input_ids[:9]


def test_streams_and_lengths_are_the_pipelines():
    sd3, flux, pixart = tiny_backbone("sd3"), tiny_backbone("flux"), tiny_backbone("pixart")
    assert [(s.name, s.offset, s.padded_length(sd3)) for s in sd3.text_streams] == [("clip", 0, 77), ("t5", 77, 256)]
    assert [(s.name, s.padded_length(flux)) for s in flux.text_streams] == [("t5", 512)]
    assert [(s.name, s.padded_length(pixart)) for s in pixart.text_streams] == [("t5", 300)]
    assert encode_prompt(sd3, PROMPT).context.shape[1] == 77 + 256
    assert encode_prompt(flux, PROMPT).context.shape[1] == 512
    # a word in both of SD3's streams has columns in both; one stream can be asked for; a stream SD3 lacks is refused
    (cat,) = sd3.word_positions(PROMPT, ["cat"])
    assert [c for c in cat if c < 77] == sd3.word_positions(PROMPT, ["cat"], stream="clip")[0]
    assert [c for c in cat if c >= 77] == sd3.word_positions(PROMPT, ["cat"], stream="t5")[0]
    with pytest.raises(DiffprobeError, match="word_stream 'umt5' is not a text stream"):
        sd3.word_positions(PROMPT, ["cat"], stream="umt5")
    sd3.text_encoder_3 = None   # SD3 without T5 (the pipeline feeds 77 zero columns instead): CLIP is its only stream
    assert [s.name for s in sd3.text_streams] == ["clip"] and sd3.context_tokens(PROMPT)[77:] == ["<zero>"] * 77


def test_flux_reads_words_from_t5_not_from_clip():
    # FLUX's context is T5's states: T5 adds no start token, so a word sits one column earlier than CLIP's count
    # would say, and its prompt splits otherwise; reading CLIP's positions took a neighbouring token's column
    bb = tiny_backbone("flux")
    (cat,) = bb.word_positions("a photo of a cat", ["cat"])
    clip = bb.tokenizer("a photo of a cat").input_ids
    clip_cat = clip.index(bb.tokenizer("cat", add_special_tokens=False).input_ids[0])
    assert cat != [clip_cat] and bb.context_tokens("a photo of a cat")[cat[0]] == "▁cat"


# -- a planted answer ---------------------------------------------------------------------------------------------

GRID = 4   # tiny SD3 and FLUX at 64 px: 4 x 4 image tokens
MASK = torch.zeros(GRID, GRID)
MASK[1:3, 0:3] = 1


def _plant_encoder(embedding: torch.nn.Embedding, token: int | None) -> None:
    """Every token embeds to zero but `token` (None: none), to ones."""
    with torch.no_grad():
        embedding.weight.zero_()
        if token is not None:
            embedding.weight[token] = 1.0


def _silence(*linears: torch.nn.Module) -> None:
    with torch.no_grad():
        for linear in linears:
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


def _plant_text(bb, streams: set[str], word: str) -> None:
    """Text encoders whose states are zero at every column but `word`'s, in the planted `streams` only."""
    clip_encoders = [bb.text_encoder, bb.text_encoder_2] if bb.family.name == "sd3" else []   # FLUX's: pooled only
    for encoder in clip_encoders:   # SD3 reads CLIP's penultimate states: layer 0 passes its embeddings through
        layer, emb = encoder.text_model.encoder.layers[0], encoder.text_model.embeddings
        _silence(layer.self_attn.out_proj, layer.mlp.fc2)
        torch.nn.init.zeros_(emb.position_embedding.weight)
        token = bb.tokenizer(word, add_special_tokens=False).input_ids[0]
        _plant_encoder(emb.token_embedding, token if "clip" in streams else None)
    t5, t5_tokenizer = (bb.text_encoder_3, bb.tokenizer_3) if bb.family.name == "sd3" else (bb.text_encoder_2,
                                                                                          bb.tokenizer_2)
    block = t5.encoder.block[0]
    _silence(block.layer[0].SelfAttention.o, block.layer[1].DenseReluDense.wo)
    token = t5_tokenizer(word, add_special_tokens=False).input_ids[0]
    _plant_encoder(t5.shared, token if "t5" in streams else None)


def _plant_denoiser(bb) -> None:
    """Block 0's joint attention: image tokens in MASK query +e0, the rest -e0; the word's text columns key +e0,
    every other key is zero; so the image inside MASK attends to the word's columns, outside to everything else."""
    model, strength = bb.unet, 6.0
    block = model.transformer_blocks[0]
    attn, heads, dim = block.attn, block.attn.heads, block.attn.to_q.out_features // block.attn.heads
    _silence(block.norm1.linear, block.norm1_context.linear, attn.to_k, attn.add_k_proj, attn.to_q,
             model.context_embedder)
    with torch.no_grad():
        model.context_embedder.weight[0] = 1.0                 # text feature 0: the sum of the encoder's states
        for h in range(heads):                                 # head dim 0 (never rotated: FLUX's first rope axis)
            attn.to_q.weight[h * dim, 0] = strength
            attn.add_k_proj.weight[h * dim, 0] = strength
        for norm in (attn.norm_q, attn.norm_added_k):          # FLUX's qk RMSNorm: a fixed gain on the unit vector
            if norm is not None:
                norm.weight.fill_(2.0)
        if bb.family.name == "sd3":                            # latent channel 0 -> image feature 0, no positions
            model.pos_embed.proj.weight.zero_(), model.pos_embed.proj.bias.zero_()
            model.pos_embed.proj.weight[0, 0] = 1.0
            model.pos_embed.pos_embed.zero_()
        else:                                                  # FLUX packs 2 x 2 latents per token: channel 0's four
            _silence(model.x_embedder)
            model.x_embedder.weight[0, 0:4] = 1.0


def _word_map(bb, streams: set[str], read: str | None, word: str = "cat") -> torch.Tensor:
    """(GRID, GRID) attention block 0's image tokens pay `word`'s columns of stream `read`, on the planted model."""
    _plant_text(bb, streams, word)
    _plant_denoiser(bb)
    latents = torch.zeros(1, 4, 2 * GRID, 2 * GRID)
    latents[:, 0] = (2 * MASK - 1).repeat_interleave(2, 0).repeat_interleave(2, 1)
    cond = encode_prompt(bb, [PROMPT])
    site = "transformer_blocks.0.attn.hook_img2txt"
    with torch.no_grad(), bb.probe.capture(site, reduce=Reduce(heads="mean")) as cache:
        bb.family.denoise(bb.unet, latents, torch.tensor([500.0]), cond)
    probs = cache[site][0]                                                  # (image tokens, text columns)
    columns = bb.word_positions(PROMPT, [word], stream=read)[0] if isinstance(read, (str, type(None))) else read
    return rearrange(probs[:, columns].sum(-1), "(h w) -> h w", h=GRID)


def _is_mask(word_map: torch.Tensor) -> bool:
    """The map holds most of the attention inside MASK (a word in two streams: half in each) and little outside."""
    inside = float(word_map[MASK > 0].min())
    return inside > 0.45 and float(word_map[MASK == 0].max()) < 0.1 * inside


@pytest.mark.parametrize("planted", [{"clip"}, {"t5"}, {"clip", "t5"}])
def test_sd3_word_map_is_the_attention_to_the_word_in_either_stream(planted):
    # a word's map on SD3 sums its columns in CLIP's part and T5's (word_stream=all, the default): it finds the
    # planted mask whichever stream carries the word; a single stream's map finds it only when that stream does
    bb = tiny_backbone("sd3")
    assert _is_mask(_word_map(bb, planted, None))
    assert float(_word_map(bb, planted, None)[MASK > 0].min()) > 0.9
    for stream in ("clip", "t5"):
        assert _is_mask(_word_map(bb, planted, stream)) == (stream in planted)


def test_flux_word_map_from_t5_columns_is_the_planted_mask_and_clips_count_is_not():
    bb = tiny_backbone("flux")
    assert _is_mask(_word_map(bb, {"t5"}, None))
    clip = bb.tokenizer(PROMPT).input_ids                       # the old reading: CLIP's token count
    wrong = [clip.index(bb.tokenizer("cat", add_special_tokens=False).input_ids[0])]
    assert wrong != bb.word_positions(PROMPT, ["cat"])[0]
    wrong_map = _word_map(bb, {"t5"}, wrong)
    assert not _is_mask(wrong_map) and float(wrong_map[MASK > 0].max()) < 0.01   # a neighbour's column: nothing there
