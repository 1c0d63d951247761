"""Shared by the hyperfeatures tests: planted correspondence pairs, one tiny model, a one-thread torch scope."""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from diffprobe.data.pairs_json import CorrespondencePair

SIZE = 64


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Run a module's tiny-model work on one thread: on a shared CPU, thread oversubscription makes
    these tests several times slower. Restores the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def tiny_sd15():
    """One frozen tiny SD 1.5-structured backbone and its registry for all hyperfeatures test modules
    (captures remove their hooks, so sharing it is safe)."""
    from diffprobe.backbones import tiny_backbone
    from diffprobe.hooks import ProbeRegistry

    bb = tiny_backbone("sd15", seed=0)
    return bb, ProbeRegistry(bb.unet)


def planted_pairs(root, n=3, seed=0):
    """Gaussian-blob images; the target is the source rolled by (8(k+1), 8) px with colours inverted, so
    the blob centres move by a known shift and raw features of the two images differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    pairs = []
    for k in range(n):
        img, pts = np.zeros((SIZE, SIZE, 3)), []
        for _ in range(6):
            cx, cy = rng.uniform(8, 56, 2)
            img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 32.0)[..., None] * rng.uniform(0, 1, 3)
            pts.append([cx, cy])
        img = np.clip(img, 0, 1)
        dx, dy = 8 * (k + 1), 8
        tgt = 1 - np.roll(img, (dy, dx), (0, 1))
        for name, arr in ((f"s{k}.png", img), (f"t{k}.png", tgt)):
            Image.fromarray((arr * 255).astype(np.uint8)).save(root / name)
        src_pts = np.array(pts)
        pairs.append(CorrespondencePair(root / f"s{k}.png", root / f"t{k}.png", src_pts, (src_pts + [dx, dy]) % SIZE,
                                        target_bbox=np.array([0.0, 0.0, 32.0, 32.0]), name=str(k)))
    return pairs
