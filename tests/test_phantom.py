"""The synthetic LA-layout phantom: layout, arrays, determinism, anatomy, labels, difficulty, rewrites."""
import json
from unittest import mock

import h5py
import numpy as np
import pytest
from scipy import ndimage

import data
import phantom
import pool

SHAPE = (32, 32, 24)  # tiny volumes keep the whole file under a few seconds
TINY = dict(n_train=4, n_test=2, shape=SHAPE, seed=3)
SMALL = dict(n_train=2, n_test=1, shape=(24, 24, 16), seed=0)


def ids(root, name="train.list"):
    return (root / name).read_text().split()


def read(root, case_id):
    with h5py.File(data.case_path(root, case_id), "r") as f:
        return f["image"][()], f["label"][()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return phantom.ensure_phantom(tmp_path_factory.mktemp("ph") / "phantom", **TINY)


@pytest.fixture(scope="module")
def cases():
    """Six cases at the PHANTOM_8 size (contrasts and thin walls need it), with their parts."""
    return [phantom.make_case(np.random.default_rng([0, i]), phantom.SHAPE) for i in range(6)]


def test_layout_arrays_and_determinism(tiny, tmp_path):
    train, test = ids(tiny), ids(tiny, "test.list")
    assert len(train) == 4 and len(test) == 2 and len(set(train + test)) == 6
    assert all(len(i) == 20 and i.isalnum() and i == i.upper() for i in train + test)
    split = data.load_split(tiny, 2)                          # the project's reader accepts it as LA data
    assert split.labeled == train[:2] and split.test == test
    params = json.loads((tiny / phantom.PARAMS_FILE).read_text())["params"]
    assert params == {**TINY, "shape": list(SHAPE), "version": phantom.VERSION}
    assert not list(tiny.parent.glob(".phantom.*"))          # no temp folders or lock left beside it
    for case_id in train + test:
        image, label = read(tiny, case_id)
        data.read_case(data.case_path(tiny, case_id))          # validates keys, shapes, label values
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
        assert abs(image.mean()) < 1e-3 and abs(image.std() - 1) < 1e-3       # z-scored over the volume
        assert set(np.unique(label)) == {0, 1} and 0.01 < label.mean() < 0.2
        assert image.shape[2] == SHAPE[2]
        assert all(0.84 * n <= m <= 1.16 * n for m, n in zip(image.shape[:2], SHAPE[:2]))
        assert image[label == 1].mean() > image[label == 0].mean() + 0.75     # blood is bright
    assert len({read(tiny, i)[0].shape for i in train}) > 1   # sizes vary per case, like the real data
    again = phantom.ensure_phantom(tmp_path / "again", **TINY)
    other = phantom.ensure_phantom(tmp_path / "other", **{**TINY, "seed": 4})
    assert all((again / n).read_text() == (tiny / n).read_text() for n in ("train.list", "test.list"))
    for case_id in ids(tiny):
        assert data.case_path(again, case_id).read_bytes() == data.case_path(tiny, case_id).read_bytes()
    assert set(ids(other)).isdisjoint(ids(tiny))              # another seed, other cases


def test_other_blood_pools_look_like_the_target_and_are_unlabeled(cases):
    for image, label, parts in cases:
        assert np.array_equal(label.astype(bool), parts["target"])
        assert not (parts["target"] & ~parts["atrium"]).any()   # the label lies inside the atrium's blood...
        assert parts["target"].sum() > 0.7 * parts["atrium"].sum()  # ...just inside its edge
        assert parts["other"].sum() > 1.5 * label.sum()        # LV, RA, aorta, PA, veins: more blood than LA
        assert not label[parts["other"]].any()
        core = lambda m: ndimage.binary_erosion(m, iterations=2)  # away from the partial-volume edge
        target, other = image[core(parts["target"])], image[core(parts["other"])]
        low, high = np.percentile(target, [5, 95])
        assert ((other > low) & (other < high)).mean() > 0.6   # one intensity distribution (bias field aside)
        assert image[parts["wall"]].mean() < np.median(target) - 1.5      # walls are dark
        # the atrium opens into unlabeled blood (mitral plane, veins): no intensity rule stops at the label
        assert (ndimage.binary_dilation(parts["atrium"]) & parts["other"]).sum() > 20
        components, _ = ndimage.label(parts["atrium"] | parts["other"])
        joined = np.isin(components, np.unique(components[parts["target"]]))
        assert (joined & parts["other"]).sum() > 0.5 * label.sum()


def test_veins_are_labeled_only_near_the_body():
    """The label stops VEIN_LABEL beyond the atrial body; the veins go on, unlabeled, towards the edge."""
    rng = np.random.default_rng([0, 1])
    size = np.array(phantom.SHAPE)
    grid = [g.astype(np.float32) for g in np.ogrid[:size[0], :size[1], :size[2]]]
    q = phantom.heart_frame(rng, grid, size, size[0] / phantom.NOMINAL)   # scaled as make_case does
    pools = phantom.anatomy(rng, q, [np.zeros(size, np.float32)] * 3)
    la, veins = pools["la"][0], pools["veins"][0] <= 0
    near, far = veins & (la > 0) & (la <= phantom.VEIN_LABEL), veins & (la > phantom.VEIN_LABEL + 2)
    assert near.sum() > 50 and far.sum() > near.sum()        # four ostia, and more vein beyond them


def test_contrast_and_offline_cot_texts_vary_between_cases(cases):
    ratios = [(np.median(i[m > 0]) - np.median(i[p["rest"]])) / i[p["rest"]].std() for i, m, p in cases]
    assert max(ratios) > 1.3 * min(ratios)
    stats = [pool.image_stats(image, label) for image, label, _ in cases]
    for kind in ("mask", "image"):
        texts = {pool.write_cot(s, kind, "LGE MRI", "heart", "left atrium") for s in stats}
        assert len(texts) >= 4, kind


def test_threshold_dice_known_answer(tmp_path):
    """Two cases: a bright target beside an equally bright look-alike of the same size gives 2/3."""
    for i, name in enumerate(("train.list", "test.list")):
        image, label = np.zeros((10, 10, 10), np.float32), np.zeros((10, 10, 10), np.uint8)
        label[1:4, 1:4, 1:4] = 1
        image[1:4, 1:4, 1:4] = image[6:9, 6:9, 6:9] = 2.0 + i     # the threshold must fit both cases
        data.case_path(tmp_path, f"C{i}").parent.mkdir(parents=True)
        with h5py.File(data.case_path(tmp_path, f"C{i}"), "w") as f:
            f["image"], f["label"] = image, label
        (tmp_path / name).write_text(f"C{i}\n")
    r = phantom.threshold_dice(tmp_path)
    assert (r["dice"], r["pooled"]) == pytest.approx((2 / 3, 2 / 3)) and 0 <= r["threshold"] < 2


def test_intensity_alone_does_not_find_the_atrium(tmp_path):
    """The best single global threshold (one for all cases, mean per-case Dice) stays far from the label."""
    root = phantom.ensure_phantom(tmp_path / "ph", n_train=6, n_test=2, shape=phantom.SHAPE, seed=0)
    dice = phantom.threshold_dice(root)["dice"]
    assert 0.1 < dice < 0.6
    assert json.loads((root / phantom.PARAMS_FILE).read_text())["summary"]["threshold_dice"] == round(dice, 4)


def test_ensure_rewrites_only_when_needed_and_refuses_other_folders(tmp_path, monkeypatch):
    root = tmp_path / "ph"
    phantom.ensure_phantom(root, **SMALL)
    (root / "marker").write_text("kept while the parameters match")
    stamp = (root / phantom.PARAMS_FILE).stat().st_mtime_ns
    phantom.ensure_phantom(root, **SMALL)
    assert (root / "marker").exists() and (root / phantom.PARAMS_FILE).stat().st_mtime_ns == stamp
    phantom.ensure_phantom(root, **{**SMALL, "n_train": 3})
    assert not (root / "marker").exists() and len(ids(root)) == 3
    assert json.loads((root / phantom.PARAMS_FILE).read_text())["params"]["n_train"] == 3
    (root / "marker").write_text("gone when the generator changes")
    monkeypatch.setattr(phantom, "VERSION", phantom.VERSION + 1)
    phantom.ensure_phantom(root, **{**SMALL, "n_train": 3})
    assert not (root / "marker").exists()
    (root / "marker").write_text("gone: rewrite writes anew")
    phantom.ensure_phantom(root, **{**SMALL, "n_train": 3}, rewrite=True)
    assert not (root / "marker").exists()
    (tmp_path / "notes.txt").write_text("not a phantom")
    with pytest.raises(phantom.NotAPhantom, match="not a phantom"):
        phantom.ensure_phantom(tmp_path, **SMALL)
    for bad in (dict(n_test=0), dict(shape=(24, 24)), dict(shape=(24, 24, 8))):
        with pytest.raises(ValueError, match="phantom: need"):
            phantom.ensure_phantom(tmp_path / "new", **{**SMALL, **bad})


def test_interrupted_write_leaves_the_old_dataset(tmp_path, monkeypatch):
    root = phantom.ensure_phantom(tmp_path / "ph", **SMALL)
    before, first = ids(root), phantom.make_case(np.random.default_rng(0), SMALL["shape"])
    monkeypatch.setattr(phantom, "make_case", mock.Mock(side_effect=[first, KeyboardInterrupt]))  # Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        phantom.ensure_phantom(root, **{**SMALL, "seed": 1})
    assert ids(root) == before                               # the complete old phantom, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ph"]

