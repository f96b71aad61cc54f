"""The LA loader: real and synthetic files, every bad input's error, augmentation alignment, batches."""
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


def test_one_real_la_case(la_root):
    split = data.load_split(la_root, 8)
    assert len(split.labeled) == 8 and len(split.unlabeled) == 72 and len(split.test) == 20
    image, label = data.read_case(data.case_path(la_root, split.labeled[0]))
    assert image.ndim == 3 and image.shape[2] == 88 and 148 <= image.shape[0] <= 244
    assert set(np.unique(label)) == {0, 1}


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


def test_batches_are_aligned_padded_and_labeled_first(tiny_la):
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


def test_sampler_state_resumes_the_same_batches(tiny_la):
    split = data.load_split(tiny_la, 2)
    vols = data.load_volumes(tiny_la, split.labeled + split.unlabeled, progress=False)
    make = lambda: data.BatchSampler(vols, split.labeled, split.unlabeled, 2, 4, (32, 32, 16), "cpu", seed=3)
    a = make()
    for _ in range(3):
        a.next()
    b = make()
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        (ia, la, ida), (ib, lb, idb) = a.next(), b.next()
        assert ida == idb and torch.equal(ia, ib) and torch.equal(la, lb)
