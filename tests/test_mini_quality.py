"""The attention-quality scores on planted attention whose answer is known."""

import numpy as np
import torch

from diffprobe.mini.quality import grid_masks, own_object_ratios, peak_in_object


def test_grid_masks_take_cells_covered_at_least_half():
    inst = np.zeros((8, 8), np.int32)
    inst[0:4, 0:4] = 1  # exactly the top-left cell of a 2x2 grid
    inst[4:8, 4:6] = 2  # half of the bottom-right cell
    inst[0:1, 4:8] = 3  # a quarter of the top-right cell
    m = grid_masks(inst, [1, 2, 3], (2, 2))
    assert m.tolist() == [[True, False, False, False], [False, False, False, True], [False, False, False, False]]


def test_own_object_ratio_is_one_for_uniform_and_k_over_size_for_perfect_grouping():
    k = 16
    masks = torch.zeros(2, k, dtype=torch.bool)
    masks[0, :4] = True
    masks[1, 4:12] = True
    uniform = torch.full((k, k), 1.0 / k)
    assert np.allclose(own_object_ratios(uniform, masks), [1.0, 1.0])
    perfect = torch.zeros(k, k)
    for m in masks:
        idx = m.nonzero()[:, 0]
        perfect[idx[:, None], idx[None, :]] = 1.0 / len(idx)
    perfect[12:] = 1.0 / k
    assert np.allclose(own_object_ratios(perfect, masks), [16 / 4, 16 / 8])
    half = 0.5 * perfect + 0.5 * uniform  # mass on own = 0.5 + 0.5 * |o| / K
    assert np.allclose(own_object_ratios(half, masks), [0.5 * 4 + 0.5, 0.5 * 2 + 0.5])
    assert own_object_ratios(uniform, torch.zeros(1, k, dtype=torch.bool)) == []


def test_peak_in_object_upsamples_the_map_to_the_image():
    grid = (4, 4)
    token = torch.zeros(16)
    token[2 * 4 + 3] = 1.0  # row 2, column 3 -> image pixels y 32..47, x 48..63 at 64 px
    mask = np.zeros((64, 64), bool)
    mask[30:50, 46:64] = True
    assert peak_in_object(token, grid, mask)
    mask2 = np.zeros((64, 64), bool)
    mask2[:, :32] = True
    assert not peak_in_object(token, grid, mask2)


def test_part_words_are_scored_only_where_the_tokenizer_has_them(tmp_path):
    from types import SimpleNamespace

    from diffprobe.data.world import render_scene, scene_seed, vocabulary
    from diffprobe.data.world.vocab import CAPTION_PARTS
    from diffprobe.mini.quality import part_tokens
    from diffprobe.mini.tokenizer import load_tokenizer, write_tokenizer

    scene = render_scene(scene_seed("test", 0), first="bird", closeup=True)
    words = scene.caption.split()
    new = SimpleNamespace(tokenizer=load_tokenizer(write_tokenizer(tmp_path / "new", vocabulary(), 24)))
    found = part_tokens(new, scene)
    assert [p for _, p, _ in found] == list(scene.words[0]["parts"]) and len(found) >= 4
    assert all(k == 0 and words[tok - 1] == part for k, part, tok in found)  # position = word index + 1 (BOS)
    parts = {p for names in CAPTION_PARTS.values() for p in names}
    old = SimpleNamespace(tokenizer=load_tokenizer(write_tokenizer(tmp_path / "old", [w for w in vocabulary()
                                                                                     if w not in parts], 24)))
    assert part_tokens(old, scene) == []  # byte-level pieces, not one token: not scored
