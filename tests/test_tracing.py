"""diffprobe.trace on users' own diffusers pipelines (tiny models of every family): the generation is unchanged, a
guided batch's prompt rows and a word's columns in the ids the pipeline used are what a direct capture and the
backbone's word rule give, per-step maps average to the running mean, and every hook is gone on exit."""

import json

import pytest
import torch
import torch.nn.functional as F

import diffprobe
from diffprobe.errors import DiffprobeError
from diffprobe.heads.heatmaps import daam_word_maps
from diffprobe.hooks import BatchLayout, Need, ProbeRegistry, Reduce
from diffprobe.loading import tiny_backbone

PROMPT = "a red cat"
CALL = dict(height=64, width=64, output_type="pt")
EXTRA = {"pixart": dict(use_resolution_binning=False), "flux": dict(max_sequence_length=32)}


def _pipeline(structure: str):
    bb = tiny_backbone(structure)
    pipe = bb.family.pipeline(bb)
    pipe.set_progress_bar_config(disable=True)
    return bb, pipe


def _generate(pipe, structure: str = "sd15", steps: int = 2, **kw):
    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                **CALL, **EXTRA.get(structure, {}), **kw).images


@pytest.fixture(scope="module")
def sd():
    return _pipeline("sd15")


def _hooks(*modules) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for module in modules for m in module.modules())


def test_a_guided_generation_is_unchanged_and_its_word_map_is_the_prompt_rows_daam_map(sd):
    """With guidance (a [negative; prompt] batch) the trace reads the prompt's half: its word map equals DAAM's
    aggregation of what a plain capture of the same calls keeps with BatchLayout(cfg=True) at the columns the
    backbone's word rule gives for the prompt string; the images equal an untraced generation's."""
    bb, pipe = sd
    bare = _generate(pipe, guidance_scale=7.5)
    probe = ProbeRegistry(pipe.unet)
    cross = probe.select(lambda s: s.kind == "cross_attn" and s.direction != "mid")   # DAAM's: no mid block
    need = Need(cross, Reduce(heads="none", steps="mean"), layout=BatchLayout(cfg=True))
    with diffprobe.trace(pipe) as tr, probe.capture(need) as ref:
        images = _generate(pipe, guidance_scale=7.5)
    assert torch.equal(images, bare) and tr.calls == 2
    (cols,) = bb.word_positions(PROMPT, ["cat"])
    assert tr.columns("cat") == cols and tr.prompt_of(0) == (0, PROMPT)
    layers = [(probe.sites[n].divisor, ref.grid(n), ref[n][0]) for n in cross]
    grid = daam_word_maps(layers, [cols])
    finest = min(d for d, _, _ in layers if d != 8)
    want = F.interpolate(grid[None], scale_factor=finest * bb.grid_factor, mode="bicubic").clamp(min=0)[0, 0]
    torch.testing.assert_close(tr.word_map("cat"), want)
    assert set(tr.word_maps()) == {"a", "red", "cat"}


def test_per_step_maps_average_to_the_running_mean_and_differ_between_steps(sd):
    bb, pipe = sd
    with diffprobe.trace(pipe) as mean:
        _generate(pipe, steps=3)
    with diffprobe.trace(pipe, steps="all") as every:
        _generate(pipe, steps=3)
    assert every.calls == 3
    torch.testing.assert_close(every.word_map("cat"), mean.word_map("cat"), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(every.word_map("cat", steps=[0, 1, 2]), mean.word_map("cat"), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(every.word_map("cat", steps=[0]), every.word_map("cat", steps=[2]))
    one = every.word_map("cat", layers="up_blocks.*")
    assert one.shape == mean.word_map("cat").shape and not torch.allclose(one, mean.word_map("cat"))
    with pytest.raises(DiffprobeError, match="steps='all'"):
        mean.word_map("cat", steps=[0])


def test_hooks_are_gone_on_exit_and_when_the_generation_raises(sd):
    bb, pipe = sd
    before = _hooks(pipe.unet, pipe.text_encoder)
    with pytest.raises(RuntimeError, match="stop"):
        with diffprobe.trace(pipe):
            assert _hooks(pipe.unet, pipe.text_encoder) > before
            raise RuntimeError("stop")
    assert _hooks(pipe.unet, pipe.text_encoder) == before
    with diffprobe.trace(pipe) as tr:
        _generate(pipe, steps=1)
    assert _hooks(pipe.unet, pipe.text_encoder) == before
    with diffprobe.trace(pipe) as tr:   # no prompt: nothing to find a word in
        pipe(prompt_embeds=torch.zeros(1, 77, bb.context_dim), num_inference_steps=1, guidance_scale=1.0, **CALL)
    with pytest.raises(DiffprobeError, match="no prompt tokens"):
        tr.word_map("cat")


@pytest.mark.parametrize("structure,guided", [("sdxl", True), ("pixart", True), ("sd3", True), ("flux", False)])
def test_every_family_finds_the_word_in_the_tokens_its_pipeline_used(structure, guided):
    """SDXL (two CLIP encoders, one set of columns), PixArt (T5 with its mask; guidance decided inside its call),
    SD3 (CLIP columns, then T5's), FLUX (T5 only, no guidance batch): each column of "cat" holds, in the ids of its
    stream as the pipeline padded them, exactly the word's tokens; the map is at the image's size."""
    bb, pipe = _pipeline(structure)
    with diffprobe.trace(pipe) as tr:
        _generate(pipe, structure, steps=1)
    assert tr._guided() == guided and tr.calls == 1
    assert tr.names and all(tr.bb.probe.sites[n].direction != "mid" for n in tr.names)   # SDXL's mid: not DAAM's
    cols = tr.columns("cat")
    streams = bb.streams_named("all")
    found = []
    for s in streams:
        ids = tr.ids[s.tokenizer][0][0]
        mine = [c - s.offset for c in cols if s.offset <= c < s.offset + len(ids)]
        if mine:
            found.append(s.name)
            assert getattr(bb, s.tokenizer).decode(ids[mine]).strip() == "cat"
    assert found == [s.name for s in streams]   # SD3: both its CLIP and its T5 copy of the word
    assert tr.word_map("cat").shape == (64, 64)


def test_start_and_end_tokens_are_words_on_request():
    """"<start>" and "<end>": CLIP's start token (column 0) and its first end token, right after the prompt's
    tokens; SD3 has an end token in both streams (CLIP's and T5's </s>); T5 alone has no start token."""
    sd = tiny_backbone("sd15")
    start, end, cat = sd.word_positions(PROMPT, ["<start>", "<end>", "cat"])
    tokens = sd.context_tokens(PROMPT)
    assert start == [0] and end == [cat[0] + 1] and tokens[end[0]] == "<|endoftext|>"
    sd3 = tiny_backbone("sd3")
    (end,) = sd3.word_positions(PROMPT, ["<end>"])
    assert [sd3.context_tokens(PROMPT)[c] for c in end] == ["<|endoftext|>", "</s>"]
    with pytest.raises(DiffprobeError, match="no start token"):
        tiny_backbone("flux").word_positions(PROMPT, ["<start>"])


def test_a_batch_of_prompts_maps_each_image_with_its_own_prompt(sd):
    """pipe([p0, p1], num_images_per_prompt=2): images 0, 1 are p0's, 2, 3 are p1's; each reads its own words."""
    bb, pipe = sd
    with diffprobe.trace(pipe) as tr:
        pipe(["a red cat", "a dog"], num_images_per_prompt=2, num_inference_steps=1, **CALL)
    assert [tr.prompt_of(i) for i in range(4)] == [(0, "a red cat")] * 2 + [(1, "a dog")] * 2
    assert tr.columns("dog", image=3) == bb.word_positions("a dog", ["dog"])[0]
    with pytest.raises(DiffprobeError, match="not found"):
        tr.word_map("dog", image=0)
    assert not torch.equal(tr.word_map("a", image=0), tr.word_map("a", image=2))
    with pytest.raises(DiffprobeError, match="not one of the 4"):
        tr.word_map("a", image=4)


def test_a_long_prompt_finds_its_last_word_past_clips_77_tokens(tmp_path):
    """SD3: "cat" x 80 then "dog" is cut by CLIP's 77 tokens, so "dog" has only its T5 column (77 + 80); FLUX reads
    T5's 512 tokens: "dog" after 400 words is column 400. Its map is made (task=heatmap, one step)."""
    prompt = "cat " * 80 + "dog"
    sd3 = tiny_backbone("sd3")
    (dog,) = sd3.word_positions(prompt, ["dog"])
    assert dog == [77 + 80] and sd3.context_tokens(prompt)[dog[0]] == "▁dog"
    flux = tiny_backbone("flux")
    assert flux.word_positions("cat " * 400 + "dog", ["dog"]) == [[400]]
    from config_helpers import make_cfg
    from diffprobe.tasks import heatmap

    summary = heatmap.run(make_cfg("heatmap", model="tiny_sd3", prompt=prompt, words=["dog"], steps=1), tmp_path)
    record = json.loads((tmp_path / summary["prompts"][0]["folder"] / "heatmaps.json").read_text())
    assert record["words"][0]["columns"] == [157] and record["words"][0]["peak"] > 0
