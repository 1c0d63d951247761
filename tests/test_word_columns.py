"""A word's columns are the family's fact: on every family's tiny model (whose text parts mirror the real pipeline's:
FLUX's and SD3's T5 with a tokenizer of its own, AuraFlow's Llama tokenizer that pads on the left), each word's
columns hold that word's tokens in the padded stream the denoiser attends to, and lie inside the text length its
sites record."""

import pytest

from diffprobe.loading import tiny_backbone

PROMPT, WORDS = "a photo of a cat and a dog", ["cat", "dog"]


@pytest.mark.parametrize("structure", ["sd15", "sd21", "sdxl", "pixart", "sd3", "flux", "auraflow"])
def test_each_words_columns_decode_back_to_the_word(structure):
    bb = tiny_backbone(structure)
    tokens = bb.context_tokens(PROMPT)                     # what each column of the text stream holds
    text = next(s.text_tokens for s in bb.probe.sites.values() if s.kind == "cross_attn")
    # one name per column the sites record; SD3's stream is CLIP's 77 columns, then T5's (named by CLIP's only, yet)
    assert len(tokens) == (text if structure != "sd3" else text - bb.tokenizer_3.model_max_length)
    for word, columns in zip(WORDS, bb.word_positions(PROMPT, WORDS)):
        assert all(0 <= c < text for c in columns)
        tokenizer, offset = bb.context_tokenizer, bb.family.context_offset
        ids = tokenizer([PROMPT], padding="max_length", max_length=tokenizer.model_max_length).input_ids[0]
        spelled = tokenizer.decode([ids[c - offset] for c in columns]).strip()
        assert spelled == word, (structure, columns, [tokens[c] for c in columns])


def test_flux_reads_words_from_t5_not_from_clip():
    # FLUX's context is T5's states: T5 adds no start token, so a word sits one column earlier than CLIP's count
    # would say, and its prompt splits otherwise; reading CLIP's positions took a neighbouring token's column
    bb = tiny_backbone("flux")
    (cat,) = bb.word_positions("a photo of a cat", ["cat"])
    clip = bb.tokenizer("a photo of a cat").input_ids
    clip_cat = clip.index(bb.tokenizer("cat", add_special_tokens=False).input_ids[0])
    assert bb.context_tokenizer is bb.tokenizer_2 and cat != [clip_cat]
    assert bb.context_tokens("a photo of a cat")[cat[0]] == "▁cat"
