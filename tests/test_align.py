"""Aligning references to the query (bank.py, ref_align): crops centred on the label's centroid, whole-cell
shifts, and each reference's centroid moved onto the query's predicted centroid, on hand-made volumes."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import retrieve
from bank import ORIENTATIONS, ReferenceBank, align, centred_box, orient, shift
from data import padded_crop
from morphology import mask_centroids
from config import Config
from test_cot import COT, QUERY


def cube(shape, corner, side):
    """A (X, Y, Z) uint8 volume with one cube of `side` voxels at `corner` (centroid: corner + (side-1)/2)."""
    m = np.zeros(shape, np.uint8)
    m[tuple(slice(c, c + side) for c in corner)] = 1
    return m


def test_shift_moves_by_whole_cells_and_fills_zeros():
    t = torch.arange(2 * 3 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 3, 4, 5, 6) + 1   # (B, C, X, Y, Z)
    offsets = torch.tensor([[1, -2, 0], [0, 0, 7]])                     # one per sample, all channels
    out = shift(t, offsets)
    expected = torch.zeros_like(t)
    expected[0, :, 1:, :3, :] = t[0, :, :3, 2:, :]
    assert torch.equal(out, expected)                                   # sample 1 moves out entirely
    assert torch.equal(shift(t, torch.zeros(2, 3, dtype=torch.long)), t)
    masks = torch.from_numpy(np.stack([cube((8, 8, 8), (1, 2, 3), 3)] * 2)).float()
    there = torch.tensor([[2, -1, 1], [-1, 3, 0]])
    assert torch.equal(shift(shift(masks, there), -there), masks)      # nothing fell off the edge


def test_centroids_of_hand_made_masks():
    masks = torch.from_numpy(np.stack([cube((9, 8, 7), (1, 2, 3), 3), np.zeros((9, 8, 7), np.uint8)]))
    c = mask_centroids(masks)
    assert torch.equal(c[0], torch.tensor([2.0, 3.0, 4.0])) and torch.isnan(c[1]).all()


def test_align_puts_each_reference_centroid_on_its_query():
    """References (B = 2 queries, K = 2) with cubes in different places land, mask and features, where each
    query's foreground is; an empty query or reference stays put."""
    shape = (16, 16, 16)
    refs = torch.from_numpy(np.stack([[cube(shape, (1, 1, 1), 3), cube(shape, (9, 4, 2), 5)],
                                      [cube(shape, (5, 5, 5), 3), np.zeros(shape, np.uint8)]])).float()
    queries = torch.from_numpy(np.stack([cube(shape, (8, 10, 6), 5), cube(shape, (2, 3, 11), 3)]))
    q, r = mask_centroids(queries), mask_centroids(refs)                           # (2, 3), (2, 2, 3)
    aligned = align(refs, r, q)
    for b, k in ((0, 0), (0, 1), (1, 0)):
        assert torch.equal(mask_centroids(aligned[b, k]), q[b]), (b, k)
        assert aligned[b, k].sum() == refs[b, k].sum()                             # moved whole, not cut
    assert not aligned[1, 1].any()
    empty_query = align(refs, r, torch.full((2, 3), float("nan")))
    assert torch.equal(empty_query, refs)
    # features on a 4x coarser grid move by the rounded number of cells: reference (0, 0) by (8, 10, 6)
    # voxels, 2 x 2.5 x 1.5 cells -> 2, 2 (half to even), 2; each feature channel alike
    features = torch.zeros(2, 2, 3, 4, 4, 4)
    features[0, 0, :, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    moved = align(features, r, q, patch=shape)
    assert torch.equal(moved[0, 0, :, 2, 2, 2], torch.tensor([1.0, 2.0, 3.0]))
    assert moved[0, 0].count_nonzero() == 3


def test_centred_box_is_centred_then_kept_inside():
    label = cube((40, 30, 10), (4, 12, 2), 5)                                      # centroid (6, 14, 4)
    box = centred_box(label, (16, 8, 16))
    assert box[3:] == tuple(b + p for b, p in zip(box[:3], (16, 8, 16)))
    # x: centred at 6 would start at -1.5 -> moved inside, start 0; y: 14 - 3.5 -> 10 (half to even);
    # z: the volume (10) is shorter than the patch (16): covered whole, start in [-6, 0]: 4 - 7.5 -> -4
    assert box[:3] == (0, 10, -4)
    patch = padded_crop(label, box)
    assert patch.sum() == label.sum()
    centred = centred_box(cube((40, 40, 40), (20, 11, 14), 3), (8, 8, 8))   # inside: the centroid centred
    assert centred[:3] == (18, 8, 12)                                             # 17.5, 8.5, 11.5
    assert centred_box(np.zeros((20, 20, 20), np.uint8), (8, 8, 8))[:3] == (6, 6, 6)


def test_aligned_bank_and_query_references():
    """With ref_align the bank holds one centred crop per case and orientation, and the references a query
    is given (mask, label transfer) sit on decoder B's predicted centroid."""
    rng = np.random.default_rng(0)
    corners = {"A": (13, 14, 2), "B": (20, 12, 5), "C": (16, 21, 1), "D": (11, 11, 8)}
    volumes = {c: (rng.normal(size=(40, 36, 14)).astype(np.float32), cube((40, 36, 14), corners[c], 3))
               for c in COT}
    cfg = dataclasses.replace(Config(), patch_size=(16, 16, 16), bank_stride=(16, 16, 16), ref_align=True,
                              ref_mask_detail=True, k_coarse=8, k_fine=2, tau=0.0, max_refs_per_case=99)
    bank = ReferenceBank.build(cfg, volumes, list(COT), COT)
    assert len(bank) == len(COT) * len(ORIENTATIONS)
    for i in range(len(bank)):
        image, label = (orient(v, bank.variants[i]) for v in volumes[bank.case_ids[i]])
        assert tuple(bank.boxes[i]) == centred_box(label, cfg.patch_size)
    bank.refresh(lambda x: torch.nn.functional.avg_pool3d(x, 4), momentum=0.0)
    assert ((bank.centroids[:, :2] - 7.5).abs() == 0.5).all()      # x, y centred to the voxel (z: short axis)
    bank.index_queries({"B": QUERY, "C": QUERY})
    prediction = torch.from_numpy(np.stack([cube((16,) * 3, (9, 2, 4), 3), cube((16,) * 3, (1, 8, 9), 3)]))
    logits_b = torch.stack([~prediction.bool(), prediction.bool()], 1).float()     # (2, 2, 16, 16, 16)
    refs = retrieve.query_references(bank, logits_b, ["B", "C"], cfg)
    assert refs.masks.shape == (2, 2, 16, 16, 16) and refs.features.shape == (2, 2, 1, 4, 4, 4)
    q = mask_centroids(prediction)
    for b in range(2):
        for k in range(2):
            assert torch.equal(mask_centroids(refs.masks[b, k]), q[b])
    transfer = bank.label_transfer(refs.indices, refs.weights, q)
    torch.testing.assert_close(transfer, (refs.weights[:, :, None, None, None] * refs.masks).sum(1))
    plain = retrieve.query_references(bank, logits_b, ["B", "C"], dataclasses.replace(cfg, ref_align=False))
    assert not torch.equal(plain.masks, refs.masks)
    torch.testing.assert_close(plain.masks, bank.masks[refs.indices].float())
    grid_cfg = SimpleNamespace(patch_size=(16, 16, 16), bank_stride=(8, 8, 8), ref_align=False)
    grid = ReferenceBank.build(grid_cfg, volumes, list(COT), COT)
    assert len(grid) > len(bank)


@pytest.mark.parametrize("patch", [(16, 16, 16), (32, 16, 48)])
def test_shift_keeps_features_dtype_and_layout(patch):
    t = torch.randn(2, 3, 4, *[p // 16 for p in patch]).to(torch.bfloat16)
    out = align(t, torch.zeros(2, 3, 3), torch.full((2, 3), 16.0), patch=patch)
    assert out.dtype == torch.bfloat16 and out.shape == t.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_alignment_does_not_synchronise():
    label = cube((40, 36, 20), (12, 10, 4), 5)
    volumes = {c: (label.astype(np.float32), label) for c in COT}
    cfg = dataclasses.replace(Config(), patch_size=(16, 16, 16), ref_align=True)
    bank = ReferenceBank.build(cfg, volumes, list(COT), COT, device="cuda")
    bank.refresh(lambda x: torch.nn.functional.avg_pool3d(x, 4), momentum=0.0)
    indices = torch.tensor([[0, 5], [9, 14]], device="cuda")
    weights = torch.full((2, 2), 0.5, device="cuda")
    prediction = torch.from_numpy(np.stack([cube((16,) * 3, (2, 3, 4), 3), cube((16,) * 3, (9, 8, 7), 5)]))
    prediction = prediction.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        refs = bank.references(indices, weights, masks=True, query_centroids=mask_centroids(prediction))
        transfer = bank.label_transfer(indices, weights, mask_centroids(prediction))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(mask_centroids(refs.masks[1, 0]), mask_centroids(prediction[1]))
    assert transfer.shape == (2, 16, 16, 16)
