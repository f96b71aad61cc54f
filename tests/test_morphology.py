"""morphology.py: shape descriptors on hand-made masks (numpy), the torch twin held equal to them on
hand-made and real LA masks, and the image statistics the CoT writers read."""
import numpy as np
import pytest
import torch
from scipy import ndimage

import data
from bank import grid_boxes
from morphology import (MORPH_DIM, MORPH_NAMES, eigvalsh3, image_stats, morphology, morphology_batch,
                        morphology_torch)


def ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def toy_case(seed=0, shape=(48, 48, 32), blur=0.0):
    """A small volume: bright target ball, a bright look-alike tube touching it, darker tissue, noise."""
    rng = np.random.default_rng(seed)
    target = ball(shape, (20, 24, 16), 8)
    tube = np.zeros(shape, bool)
    tube[27:40, 21:27, 13:19] = True
    image = np.where(ball(shape, (24, 24, 16), 22), 1.0, 0.0) + 2.0 * (target | tube)
    if blur:
        image = ndimage.gaussian_filter(image, blur)
    return (image + rng.normal(0, 0.15, shape)).astype(np.float32), target.astype(np.uint8)


# ----------------------------------------------------------------------------- morphology

def test_morphology_sphere():
    r = 12
    d = dict(zip(MORPH_NAMES, morphology(ball((48, 48, 40), (24, 24, 20), r))))
    assert d["fg_fraction"] == pytest.approx(4 / 3 * np.pi * r ** 3 / (48 * 48 * 40), rel=0.03)
    assert (d["extent_x"], d["extent_z"]) == pytest.approx((25 / 48, 25 / 40))
    assert (d["axis_ratio_mid"], d["axis_ratio_min"]) == pytest.approx((1, 1), abs=1e-3)
    # a digital sphere has about 1.5 x 4 pi r^2 faces: faces / volume ~ 4.5 / r
    assert d["surface_to_volume"] == pytest.approx(4.5 / r, rel=0.1)
    centroid = [d[f"centroid_{a}"] for a in "xyz"]
    assert centroid == pytest.approx([0.5 / 48, 0.5 / 48, 0.5 / 40], abs=1e-6)  # voxel 24 vs (48 - 1) / 2
    assert (d["components"], d["largest_share"], d["border_contact"]) == (1, 1, 0)


def test_morphology_box_exact():
    mask = np.zeros((40, 30, 20), bool)
    mask[0:20, 10:20, 5:10] = True          # 20 x 10 x 5, touching the x = 0 face
    d = dict(zip(MORPH_NAMES, morphology(mask)))
    assert d["fg_fraction"] == pytest.approx(1000 / 24000)
    assert [d[f"extent_{a}"] for a in "xyz"] == pytest.approx([0.5, 1 / 3, 0.25])
    assert (d["axis_ratio_mid"], d["axis_ratio_min"]) == pytest.approx((0.5, 0.25))  # side ratios, exactly
    # the face on the patch cut (x = 0) is not surface
    assert d["surface_to_volume"] == pytest.approx((2 * 200 + 2 * 100 + 50) / 1000)
    assert [d[f"centroid_{a}"] for a in "xyz"] == pytest.approx([(9.5 - 19.5) / 40, (14.5 - 14.5) / 30,
                                                                 (7 - 9.5) / 20])
    assert d["border_contact"] == pytest.approx(1 / 6)


def test_morphology_two_blobs_and_batch():
    shape = (40, 40, 32)
    two = ball(shape, (10, 10, 10), 6) | ball(shape, (28, 28, 20), 4)
    sizes = ball(shape, (10, 10, 10), 6).sum(), ball(shape, (28, 28, 20), 4).sum()
    d = dict(zip(MORPH_NAMES, morphology(two)))
    assert d["components"] == 2
    assert d["largest_share"] == pytest.approx(max(sizes) / sum(sizes))
    # a batch is its cases one by one: components do not leak across cases, an empty mask is all zeros
    batch = np.stack([two, np.zeros(shape, bool), ball(shape, (20, 20, 16), 9), two])
    out = morphology_batch(batch)
    assert out.shape == (4, MORPH_DIM) and out.dtype == np.float32
    assert np.array_equal(out[1], np.zeros(MORPH_DIM))
    for row, mask in zip(out, batch):
        np.testing.assert_allclose(row, morphology(mask), rtol=1e-6)
    np.testing.assert_array_equal(out, morphology_batch(batch))  # deterministic


# ----------------------------------------------------------------------------- image statistics

def test_image_stats_follow_the_image():
    sharp_image, mask = toy_case(blur=0.0)
    blurred_image, _ = toy_case(blur=1.5)
    sharp, blurred = image_stats(sharp_image, mask), image_stats(blurred_image, mask)
    assert sharp == image_stats(sharp_image, mask)                       # deterministic
    assert sharp["boundary_sharpness"] > blurred["boundary_sharpness"]
    assert sharp["edge_sharpness"] > blurred["edge_sharpness"]
    assert sharp["lookalike_contact"] > 0 and 0 < sharp["lookalike_share"] < 1  # the tube touches the target
    assert sharp["target_components"] == 1
    only_image = image_stats(sharp_image)
    assert "lookalike_share" not in only_image and only_image["bright_structures"] == 1  # ball + tube merge
    flat = image_stats(np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8))
    assert all(np.isfinite(v) for v in flat.values())


def test_morphology_does_not_depend_on_the_batch():
    """A mask's descriptors are its own: the same alone and beside another mask, border faces included."""
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert morphology(cube)[MORPH_NAMES.index("surface_to_volume")] == pytest.approx(54 / 27)
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[0:4, 0:4, 0:4] = True                      # touches three faces of the patch
    b[5:9, 5:9, 5:9] = True
    assert np.allclose(morphology(a), morphology_batch(np.stack([a, b]))[0])
    assert np.allclose(morphology(b), morphology_batch(np.stack([a, b]))[1])


# ----------------------------------------------------------------------------- morphology on the device

def helix(shape, turns, radius, pitch):
    """A one-voxel-thin, face-connected coil about the z axis: a chain of short runs, the hardest shape for
    label propagation (each round moves a label along a few runs only)."""
    t = np.linspace(0, 2 * np.pi * turns, 200 * turns)
    points = np.rint(np.stack([shape[0] // 2 + radius * np.cos(t), shape[1] // 2 + radius * np.sin(t),
                               2 + pitch * t / (2 * np.pi)], 1)).astype(int)
    mask, p = np.zeros(shape, bool), points[0].copy()
    mask[tuple(p)] = True
    for q in points:                       # one unit move at a time, so consecutive voxels share a face
        for a in range(3):
            while p[a] != q[a]:
                p[a] += np.sign(q[a] - p[a])
                mask[tuple(p)] = True
    return mask


def made_masks(shape=(40, 36, 28)):
    """Hand-made masks, one batch: empty, full, ball, box on three patch faces, two blobs, a coil,
    smoothed noise (many components, cut by the patch faces)."""
    box = np.zeros(shape, bool)
    box[0:25, 10:, 3:] = True
    noise = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=shape), 1.5) > 0.15
    return np.stack([np.zeros(shape, bool), np.ones(shape, bool), ball(shape, (20, 18, 14), 9), box,
                     ball(shape, (10, 10, 10), 6) | ball(shape, (28, 26, 20), 4), helix(shape, 3, 9, 7),
                     noise])


def assert_same_morphology(masks, **kw):
    """morphology_torch against the numpy/scipy oracle: components exactly, the rest to float32 rounding."""
    out, converged = morphology_torch(torch.as_tensor(masks), return_converged=True, **kw)
    ref = morphology_batch(masks)
    assert out.dtype == torch.float32 and out.shape == ref.shape and converged.all()
    col = MORPH_NAMES.index("components")
    np.testing.assert_array_equal(out[:, col].numpy(), ref[:, col])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_morphology_torch_matches_numpy_on_made_masks():
    masks = made_masks()
    assert_same_morphology(masks)
    out = morphology_torch(torch.from_numpy(masks[::-1].astype(np.uint8)))  # {0, 1} input, batch order
    np.testing.assert_allclose(out.numpy()[::-1], morphology_batch(masks), rtol=1e-4, atol=1e-5)


def test_surface_faces_are_differing_pairs_inside_the_patch():
    """morphology_torch counts faces as neighbour pairs inside the patch that differ; morphology_batch
    counts them in the batch's padded bounding-box crop. The two agree, mask by mask and in a batch."""
    masks = made_masks()
    pairs = sum(np.count_nonzero(np.diff(masks, axis=a), axis=(1, 2, 3)) for a in (1, 2, 3))
    col = MORPH_NAMES.index("surface_to_volume")
    volume = np.maximum(masks.sum((1, 2, 3)), 1)
    np.testing.assert_allclose(morphology_batch(masks)[:, col] * volume, pairs, rtol=1e-6)
    np.testing.assert_allclose(np.array([morphology(m)[col] for m in masks]) * volume, pairs, rtol=1e-6)


def test_eigvalsh3_matches_linalg():
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    spectra = [(2, 2, 2), (3, 1, 1), (3, 3, 1), (1e4, 1, 1e-3), (5, 0, 0)]      # equal eigenvalues included
    a = [rotation @ np.diag(s) @ rotation.T for s in spectra] + [x @ x.T for x in rng.normal(size=(20, 3, 3))]
    a = np.stack(a)
    want = np.linalg.eigvalsh(a)[:, ::-1]                                   # (N, 3), largest first
    scale = np.abs(want).max(1, keepdims=True)
    np.testing.assert_allclose(eigvalsh3(torch.from_numpy(a)).numpy() / scale, want / scale, atol=1e-12)


def test_morphology_torch_reads_no_values():
    """Nothing depends on the values on the host (no sync on a GPU): it runs on the meta device, which has
    no data, where .item(), nonzero, boolean indexing, unique and bincount all fail."""
    out, converged = morphology_torch(torch.zeros(3, 12, 10, 8, dtype=torch.bool, device="meta"),
                                           return_converged=True)
    assert (out.shape, out.dtype, out.device.type) == ((3, MORPH_DIM), torch.float32, "meta")
    assert (converged.shape, converged.dtype) == ((3,), torch.bool)


def test_too_few_rounds_are_reported():
    """A long coil needs more rounds than a ball (4 against 1); with too few, it is reported, the coil's
    components are over-counted and its largest one is too small, and the ball beside it is exact."""
    shape = (24, 24, 60)
    masks = np.stack([helix(shape, 6, 8, 8), ball(shape, (12, 12, 30), 6)])
    col = [MORPH_NAMES.index(k) for k in ("components", "largest_share")]
    out, converged = morphology_torch(torch.from_numpy(masks), rounds=2, return_converged=True)
    assert converged.tolist() == [False, True]
    assert out[0, col[0]] > 1 and out[0, col[1]] < 1 and out[1, col].tolist() == [1, 1]
    assert_same_morphology(masks)                                           # the default budget settles both


# LA cases and grid crops that need the most propagation rounds (3) of all 100 cases (morphology.LABEL_ROUNDS)
HARD_LA_CROPS = (("A11O45O3NAXWM7T2H8CH", (5, 6)), ("SN4LF8SGBSRQUPTDSX78", (4, 5)))


def test_morphology_torch_matches_numpy_on_real_la_crops(la_root):
    """Training-grid crops (112 x 112 x 80) of real LA ground truth."""
    masks = []
    for case_id, crops in HARD_LA_CROPS:
        label = data.read_case(data.case_path(la_root, case_id))[1]
        boxes = grid_boxes(label.shape, (112, 112, 80), (112, 112, 80))
        masks += [data.padded_crop(label, boxes[i]) > 0 for i in crops]
    assert_same_morphology(np.stack(masks))
