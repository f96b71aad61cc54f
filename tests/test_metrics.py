"""The metrics against medpy.metric.binary (the field's oracle) and hand-computed answers."""
import numpy as np
import pytest
from medpy.metric import binary as medpy

import test as T


def ball(shape, center, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return ((grid - np.reshape(center, (3, 1, 1, 1))) ** 2).sum(0) <= radius ** 2


def test_our_test_module_is_imported():
    assert T.__file__.endswith("test.py") and hasattr(T, "dice"), T.__file__


def test_hand_made_answers():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = True          # 64 voxels
    b[4:8, 2:6, 2:6] = True          # 64 voxels, 32 shared
    assert T.dice(a, b) == pytest.approx(0.5)
    assert T.jaccard(a, b) == pytest.approx(32 / 96)
    assert T.dice(a, a) == 1.0 and T.hd95(a, a) == 0.0 and T.asd(a, a) == 0.0
    # a cube shifted by 2 along x: every surface voxel is within 2 of the other surface
    assert 0 < T.hd95(a, b) <= 2.0


@pytest.mark.parametrize("seed", range(4))
def test_against_medpy_random_shapes(seed):
    rng = np.random.default_rng(seed)
    shape = (30 + seed, 27, 19)
    pred = ball(shape, rng.uniform(8, 18, 3), rng.uniform(4, 8)) | (rng.random(shape) > 0.995)
    gt = ball(shape, rng.uniform(8, 18, 3), rng.uniform(4, 8))
    assert T.dice(pred, gt) == pytest.approx(medpy.dc(pred, gt))
    assert T.jaccard(pred, gt) == pytest.approx(medpy.jc(pred, gt))
    assert T.hd95(pred, gt) == pytest.approx(medpy.hd95(pred, gt))
    assert T.asd(pred, gt) == pytest.approx(medpy.asd(pred, gt))


def test_against_medpy_touching_the_border():
    pred = np.zeros((12, 12, 8), bool)
    gt = np.zeros_like(pred)
    pred[0:7, 3:12, 0:4] = True       # touches three faces of the volume
    gt[0:5, 0:9, 2:8] = True
    assert T.hd95(pred, gt) == pytest.approx(medpy.hd95(pred, gt))
    assert T.asd(pred, gt) == pytest.approx(medpy.asd(pred, gt))
    assert T.asd(gt, pred) == pytest.approx(medpy.asd(gt, pred))   # asd is one-directional, as in medpy


def test_empty_masks_are_scored_as_documented():
    gt = ball((20, 20, 20), (10, 10, 10), 5)
    empty = np.zeros_like(gt)
    diagonal = np.linalg.norm(gt.shape)
    assert T.dice(empty, gt) == 0.0 and T.jaccard(empty, gt) == 0.0
    assert T.hd95(empty, gt) == pytest.approx(diagonal) and T.asd(empty, gt) == pytest.approx(diagonal)
    assert T.dice(empty, empty) == 1.0 and T.hd95(empty, empty) == 0.0


def test_largest_component():
    m = np.zeros((20, 20, 20), bool)
    m[1:4, 1:4, 1:4] = True           # 27 voxels
    m[10:16, 10:16, 10:16] = True     # 216 voxels
    m[16, 16, 16] = True              # touches the big cube diagonally: 26-connected
    out = T.largest_component(m)
    assert out.sum() == 217 and not out[2, 2, 2]


def test_window_starts_cover_the_axis():
    for size, patch, stride in [(112, 112, 18), (150, 112, 18), (88, 80, 4), (97, 48, 16)]:
        starts = T.window_starts(size, patch, stride)
        assert starts[0] == 0 and starts[-1] == size - patch
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
