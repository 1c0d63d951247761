"""Segmentation metrics on hand-computed confusion matrices and matchings."""

import numpy as np
import pytest

from diffprobe.errors import DiffprobeError
from diffprobe.eval.segmentation import (DatasetHungarian, PerImageHungarian, SegmentCount, confusion_matrix,
                                         match_counts, scores)

LABEL = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
PRED = np.array([[3, 3, 0, 0], [0, 1, 1, 2]])


def test_confusion_matrix_by_hand():
    hist = confusion_matrix(LABEL, PRED, 3)
    np.testing.assert_array_equal(hist, [[0, 0, 0, 2], [2, 0, 1, 0], [1, 1, 0, 0]])
    assert confusion_matrix(LABEL, PRED, 3, num_pred=6).shape == (3, 6)
    with pytest.raises(DiffprobeError):
        confusion_matrix(LABEL, PRED[:, :2], 3)


def test_hungarian_counts_by_hand():
    # best matching: class 0 -> id 3, class 1 -> id 0, class 2 -> id 1 (5 pixels); id 2 stays unmatched
    tp, fp, fn = match_counts(confusion_matrix(LABEL, PRED, 3))
    np.testing.assert_array_equal(tp, [2, 2, 1])
    np.testing.assert_array_equal(fp, [0, 1, 0])
    np.testing.assert_array_equal(fn, [0, 1, 1])
    s = scores(tp, fp, fn, 7)
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)
    assert s["iou"] == pytest.approx([1.0, 0.5, 0.5])
    assert s["miou"] == pytest.approx(2 / 3)


def test_per_image_and_dataset_matching_differ_when_ids_swap():
    label = np.array([0, 0, 1, 1])
    per_image, dataset = PerImageHungarian(2), DatasetHungarian(2)
    for pred in (np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0])):
        per_image.update(label, pred)
        dataset.update(label, pred)
    a, b = per_image.result(), dataset.result()
    assert (a["matching"], a["pixel_accuracy"], a["miou"]) == ("per_image", 1.0, 1.0)
    # dataset confusion [[2, 2], [2, 2]]: TP 2 per class, FP 2, FN 2 -> IoU 1/3, accuracy 1/2
    assert b["matching"] == "dataset"
    assert b["pixel_accuracy"] == pytest.approx(0.5)
    assert b["miou"] == pytest.approx(1 / 3)


def test_dataset_matching_grows_prediction_range_and_nan_classes():
    acc = DatasetHungarian(3)
    acc.update(np.array([0, 1, 255]), np.array([5, 7, 7]))
    np.testing.assert_array_equal(acc.hist.shape, (3, 8))
    res = acc.result()
    assert res["pixel_accuracy"] == 1.0
    assert res["iou"][2] is None and res["miou"] == 1.0


def test_state_round_trip():
    acc = PerImageHungarian(3)
    acc.update(LABEL, PRED)
    other = PerImageHungarian(3)
    other.load_state({k: v.copy() for k, v in acc.state().items()})
    assert other.result() == acc.result()
    ds = DatasetHungarian(3)
    ds.update(LABEL, PRED)
    ds2 = DatasetHungarian(3)
    ds2.load_state(ds.state())
    assert ds2.result() == ds.result()


def test_segment_count():
    c = SegmentCount()
    c.update(LABEL, PRED)  # ids 0, 1, 2, 3
    c.update(LABEL, np.zeros_like(PRED))
    assert c.result() == {"segments_per_image": 2.5}
    d = SegmentCount()
    d.load_state(c.state())
    assert d.result() == c.result()


def test_naive_baselines_on_planted_images():
    from diffprobe.eval.segmentation_baselines import colour_kmeans, one_segment, top_bottom

    assert top_bottom(5, 3).tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert one_segment(2, 4).sum() == 0 and one_segment(2, 4).shape == (2, 4)
    rng = np.random.default_rng(0)
    truth = np.zeros((24, 24), np.int64)
    truth[:, 8:] = 1
    truth[12:, 16:] = 2
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.float64)
    image = colours[truth] + rng.normal(0, 10, (24, 24, 3))
    pred = colour_kmeans(image, 3, seed=0)
    pairs = {(int(t), int(p)) for t, p in zip(truth.ravel(), pred.ravel())}
    assert len(pairs) == 3 and len({p for _, p in pairs}) == 3  # the same partition up to relabelling
    assert np.array_equal(colour_kmeans(image, 3, seed=0), pred)   # deterministic for a seed


def test_per_object_scores_average_each_images_classes():
    """Image 1: a big background (class 0, 14 px) and a 2 px object (class 1) merged into one segment: its
    classes' IoUs are 14/16 and 0, mean 0.4375, pixels 14/16. Image 2 segmented exactly: 1 and 1. The per-object
    score is the mean of the images (0.71875); the accumulated protocol weighs the merge by its 2 pixels only."""
    from diffprobe.eval.segmentation import PerObjectHungarian

    label1 = np.zeros((4, 4), np.int64)
    label1[0, :2] = 1
    pred1 = np.zeros((4, 4), np.int64)
    label2 = np.array([[0, 0], [2, 2]])
    pred2 = np.array([[5, 5], [3, 3]])
    meter, accumulated = PerObjectHungarian(3), PerImageHungarian(3)
    for label, pred in ((label1, pred1), (label2, pred2)):
        meter.update(label, pred)
        accumulated.update(label, pred)
    r = meter.result()
    assert r["images"] == 2
    assert abs(r["miou"] - (0.4375 + 1) / 2) < 1e-12
    assert abs(r["pixel_accuracy"] - (14 / 16 + 1) / 2) < 1e-12
    # accumulated: class 0 IoU 16/18, class 1 0/2, class 2 2/2 -> mean 0.6296
    assert abs(accumulated.result()["miou"] - (16 / 18 + 0 + 1) / 3) < 1e-12
    state = meter.state()
    again = PerObjectHungarian(3)
    again.load_state(state)
    assert again.result() == r


def test_the_scikit_image_baselines_find_planted_colour_regions():
    """Three flat colour regions with a little noise: Felzenszwalb at a moderate scale and SLIC asked for few
    segments give segments that never straddle two regions, and a larger scale gives fewer segments."""
    from diffprobe.eval.segmentation_baselines import felzenszwalb, slic

    rng = np.random.default_rng(0)
    truth = np.zeros((48, 48), np.int64)
    truth[:, 16:] = 1
    truth[24:, 32:] = 2
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.float64)
    image = np.clip(colours[truth] + rng.normal(0, 4, (48, 48, 3)), 0, 255).astype(np.uint8)
    for pred in (felzenszwalb(image, scale=100), slic(image, segments=3, compactness=0.1)):
        assert pred.shape == truth.shape and pred.dtype == np.int64
        for segment in np.unique(pred):
            assert len(np.unique(truth[pred == segment])) == 1   # no segment crosses a colour edge
    assert len(np.unique(felzenszwalb(image, scale=100))) <= len(np.unique(felzenszwalb(image, scale=1)))
