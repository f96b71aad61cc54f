"""The LA loader: real and synthetic files, every bad input's error, augmentation alignment, batches."""
import io

import h5py
import numpy as np
import pytest
import torch

import data


def test_split_and_volumes(tiny_la):
    split = data.load_split(tiny_la, 2)
    assert split.labeled == ["CASE00", "CASE01"]
    assert split.unlabeled == ["CASE02", "CASE03", "CASE04", "CASE05"]
    assert split.test == ["CASE06", "CASE07"]
    vols = data.load_volumes(tiny_la, split.labeled, progress=False)
    image, label = vols["CASE01"]
    assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape


def test_one_real_la_case_and_the_splits(la_root):
    split = data.load_split(la_root, 8)
    assert len(split.labeled) == 8 and len(split.unlabeled) == 72 and len(split.test) == 20
    image, label = data.read_case(data.case_path(la_root, split.labeled[0]))
    assert image.ndim == 3 and image.shape[2] == 88 and 148 <= image.shape[0] <= 244
    assert set(np.unique(label)) == {0, 1}
    val = data.load_split(la_root, 8, val_cases=10)                 # disjoint from test.list
    assert len(val.labeled) == 8 and len(val.unlabeled) == 62 and len(val.test) == 10
    assert not set(split.test) & set(val.labeled + val.unlabeled + val.test)


def rewrite(path, **arrays):
    path.unlink()
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v


def test_bad_inputs_name_the_file_and_the_problem(tiny_la, tmp_path):
    with pytest.raises(data.DataError, match="data root not found"):
        data.load_split(tmp_path / "nowhere", 2)
    with pytest.raises(data.DataError, match="num_labeled=7 but the list has 6"):
        data.load_split(tiny_la, 7)
    case = data.case_path(tiny_la, "CASE03")
    good = data.read_case(case)

    rewrite(case, image=good[0])
    with pytest.raises(data.DataError, match=r"CASE03.*missing dataset 'label'"):
        data.read_case(case)
    rewrite(case, label=good[1])
    with pytest.raises(data.DataError, match="missing dataset 'image'"):
        data.read_case(case)
    rewrite(case, image=good[0], label=good[1][:-1])
    with pytest.raises(data.DataError, match="image shape .* != label shape"):
        data.read_case(case)
    rewrite(case, image=good[0], label=good[1] * 2)
    with pytest.raises(data.DataError, match=r"label values must be in \{0, 1\}"):
        data.read_case(case)
    rewrite(case, image=good[0], label=good[1])
    case.write_bytes(case.read_bytes()[:1000])                      # truncated download
    with pytest.raises(data.DataError, match="CASE03.*unreadable h5"):
        data.read_case(case)
    case.unlink()
    with pytest.raises(data.DataError, match="listed ID 'CASE03' has no h5 file"):
        data.load_split(tiny_la, 2)
    (tiny_la / "test.list").unlink()
    with pytest.raises(data.DataError, match="test.list: list file not found"):
        data.load_split(tiny_la, 2)


def test_rot_flip_keeps_image_and_label_aligned():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 9, 7, 5, generator=gen)
    image[1] = (image[0] > 0.5).float()                             # the label is a function of the image
    for k in range(4):
        for axis in range(2):
            out = data.rot_flip(image, k, axis)
            assert torch.equal(out[1], (out[0] > 0.5).float())
            assert out.shape[-1] == 5 and sorted(out.shape[1:3]) == [7, 9]


def test_batches_are_aligned_padded_labeled_first_and_resume_exactly(tiny_la):
    split = data.load_split(tiny_la, 2)
    vols = data.load_volumes(tiny_la, split.labeled + split.unlabeled, progress=False)
    # the label equals (image > 1) in the tiny data's noise-free version: use a clean copy
    for i, (img, lab) in vols.items():
        vols[i] = (lab.astype(np.float32) * 3 + 1, lab)
    patch = (48, 32, 16)                                            # larger than the volumes in x: padding
    sampler = data.BatchSampler(vols, split.labeled, split.unlabeled, 2, 4, patch, "cpu", seed=0)
    seen = set()
    for _ in range(6):
        image, label, ids = sampler.next()
        assert image.shape == (4, 1, *patch) and label.shape == (2, *patch) and label.dtype == torch.long
        assert set(ids[:2]) <= set(split.labeled) and set(ids[2:]) <= set(split.unlabeled)
        inside = image[:2, 0] > 0                                   # padding is zero, the volume is >= 1
        assert torch.equal(label.bool(), (image[:2, 0] > 2) & inside)
        seen.update(ids[:2])
    assert seen == set(split.labeled)                               # the labeled part cycles over all cases
    resumed = data.BatchSampler(vols, split.labeled, split.unlabeled, 2, 4, patch, "cpu", seed=1)
    saved = io.BytesIO()
    torch.save(sampler.state_dict(), saved)                         # as a checkpoint holds it: data only
    resumed.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    for _ in range(3):
        (ia, la, ida), (ib, lb, idb) = sampler.next(), resumed.next()
        assert ida == idb and torch.equal(ia, ib) and torch.equal(la, lb)


# ----------------------------------------------------------------------------- a coarser grid (LA_8_LOW)

def test_downsample_block_means_and_majority_vote():
    image = np.arange(5 * 4 * 7, dtype=np.float32).reshape(5, 4, 7)
    label = np.zeros((5, 4, 7), np.uint8)
    label[0:2, 0:2, 0:2] = 1                        # a whole block
    label[2, 2, 2] = label[3, 3, 3] = label[2, 3, 2] = label[3, 2, 3] = 1   # half a block: foreground
    label[0, 2, 4] = 1                              # one voxel of eight: background
    low_image, low_label = data.downsample(image, label, 2)
    assert low_image.shape == low_label.shape == (2, 2, 3) and low_image.dtype == np.float32
    assert low_image[1, 0, 2] == pytest.approx(image[2:4, 0:2, 4:6].mean())   # edges (x 4, z 6) are dropped
    assert low_label.tolist() == [[[1, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 1, 0]]]
    assert data.downsample(image, label, 1)[0] is image
    with pytest.raises(data.DataError, match="smaller than"):
        data.downsample(image[:1], label[:1], 2)


def test_upsample_probabilities_returns_to_the_original_grid():
    prob = np.stack([np.full((2, 2, 3), 0.8, np.float32), np.zeros((2, 2, 3), np.float32)])  # (K, x, y, z)
    up = data.upsample_probabilities(prob, 2, (5, 4, 7))
    assert up.shape == (2, 5, 4, 7)
    assert np.allclose(up[0, :4, :4, :6], 0.8) and (up[0, 4] == 0).all() and (up[0, :, :, 6] == 0).all()
    low = np.random.default_rng(0).random((1, 4, 4, 4)).astype(np.float32)
    up = data.upsample_probabilities(low, 3, (12, 13, 14))
    assert np.allclose(up[:, 1:12:3, 1:12:3, 1:12:3], low, atol=1e-6)   # each block's centre keeps its value


def test_low_resolution_real_la(la_root, tmp_path):
    """LA_8_LOW on real scans: 3x coarser volumes keep the atrium's volume within a few percent; the loader,
    the offline pool and one training step run on a subset (8 labeled, 2 unlabeled, 1 test case)."""
    import train
    from config import get_config
    ids = (la_root / "train.list").read_text().split()[:10]
    test_id = (la_root / "test.list").read_text().split()[0]
    root = tmp_path / "LA"
    (root / data.CASE_DIR).mkdir(parents=True)
    for i in ids + [test_id]:
        (root / data.CASE_DIR / i).symlink_to(la_root / data.CASE_DIR / i)
    (root / "train.list").write_text("\n".join(ids) + "\n")
    (root / "test.list").write_text(test_id + "\n")
    for i in ids[:3]:
        image, label = data.read_case(data.case_path(root, i))
        low_image, low_label = data.downsample(image, label, 3)
        assert low_image.shape == tuple(s // 3 for s in image.shape)
        assert abs(27 * low_label.sum() / label.sum() - 1) < 0.05, i
    cfg = get_config("LA_8_LOW", [f"--data_root={root}", f"--out_dir={tmp_path / 'run'}", "--device=cpu"])
    split, volumes = data.prepare_data(cfg)
    assert volumes[ids[0]][0].shape[2] == 29 and len(volumes) == 11
    run = train.Run(cfg, split, volumes, torch.device("cpu"), progress=False)
    assert len(run.cots.mask) == 8 and len(run.cots.image) == 11
    run.student.train()
    losses = train.train_step(run, 0, *run.sampler.next())
    assert all(torch.isfinite(v) for v in losses.values())
