"""The synthetic LA-layout phantom: layout, arrays, determinism, unlabeled look-alikes, rewrite rules."""
import json

import h5py
import numpy as np
import pytest

import data
import phantom

SHAPE = (32, 32, 24)  # tiny volumes keep the whole file under a few seconds


def read(root, case_id):
    with h5py.File(data.case_path(root, case_id), "r") as f:
        return f["image"][()], f["label"][()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return phantom.write_phantom(tmp_path_factory.mktemp("ph") / "phantom", n_train=4, n_test=2, shape=SHAPE, seed=3)


def test_layout_and_lists(tiny):
    train = (tiny / "train.list").read_text().splitlines()
    test = (tiny / "test.list").read_text().splitlines()
    assert len(train) == 4 and len(test) == 2 and len(set(train + test)) == 6
    for case_id in train + test:
        assert len(case_id) == 20 and case_id.isalnum() and case_id == case_id.upper()
    split = data.load_split(tiny, 2)                          # the project's reader accepts it as LA data
    assert split.labeled == train[:2] and split.test == test
    assert json.loads((tiny / phantom.PARAMS_FILE).read_text())["params"] == phantom.phantom_params(4, 2, SHAPE, 3)
    assert not list(tiny.parent.glob(".phantom.*"))          # no temp folders left beside it


def test_arrays(tiny):
    sizes = set()
    for case_id in (tiny / "train.list").read_text().split() + (tiny / "test.list").read_text().split():
        image, label = read(tiny, case_id)
        data.read_case(data.case_path(tiny, case_id))          # validates keys, shapes, label values
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
        assert abs(image.mean()) < 1e-3 and abs(image.std() - 1) < 1e-3       # z-scored over the volume
        assert set(np.unique(label)) == {0, 1} and 0.01 < label.mean() < 0.2
        assert image.shape[2] == SHAPE[2]
        assert all(0.84 * n <= m <= 1.16 * n for m, n in zip(image.shape[:2], SHAPE[:2]))
        assert image[label == 1].mean() > image[label == 0].mean() + 1        # blood pools are bright
        sizes.add(image.shape)
    assert len(sizes) > 1                                     # sizes vary per case, like the real data


def test_deterministic(tmp_path, tiny):
    again = phantom.write_phantom(tmp_path / "again", n_train=4, n_test=2, shape=SHAPE, seed=3)
    other = phantom.write_phantom(tmp_path / "other", n_train=4, n_test=2, shape=SHAPE, seed=4)
    ids = (tiny / "train.list").read_text()
    for name in ("train.list", "test.list"):
        assert (again / name).read_text() == (tiny / name).read_text()
    for case_id in ids.split():
        for a, b in zip(read(tiny, case_id), read(again, case_id)):
            assert a.tobytes() == b.tobytes()
    assert set((other / "train.list").read_text().split()).isdisjoint(ids.split())
    a, b = read(tiny, ids.split()[0])[0], read(other, (other / "train.list").read_text().split()[0])[0]
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_distractors_are_bright_but_unlabeled():
    means = []
    for i in range(6):
        rng = np.random.default_rng([0, i])
        image, label, parts = phantom.make_case(rng, (64, 64, 48))  # big enough for blur to leave contrasts
        assert np.array_equal(label.astype(bool), parts["target"])
        assert parts["distractor"].sum() > 0.1 * label.sum()  # a look-alike in every case...
        assert not label[parts["distractor"]].any()           # ...never labeled
        rest = ~(parts["target"] | parts["distractor"] | parts["wall"])
        means.append([image[m].mean() for m in (parts["target"], parts["distractor"], parts["wall"], rest)])
        assert means[-1][1] > means[-1][3] + 1                # as bright as a blood pool, far above background
    target, distractor, wall, rest = np.mean(means, axis=0)
    assert 0.7 < distractor / target < 1.3 and wall < rest   # look-alikes; the wall is darker than background


def test_ensure_rewrites_only_when_needed(tmp_path, monkeypatch):
    root = tmp_path / "ph"
    args = dict(n_train=2, n_test=1, shape=(24, 24, 16), seed=0)
    phantom.ensure_phantom(root, **args)
    (root / "marker").write_text("kept while the parameters match")
    stamp = (root / phantom.PARAMS_FILE).stat().st_mtime_ns
    phantom.ensure_phantom(root, **args)
    assert (root / "marker").exists() and (root / phantom.PARAMS_FILE).stat().st_mtime_ns == stamp
    phantom.ensure_phantom(root, **{**args, "n_train": 3})
    assert not (root / "marker").exists()
    assert len((root / "train.list").read_text().split()) == 3
    assert json.loads((root / phantom.PARAMS_FILE).read_text())["params"]["n_train"] == 3
    (root / "marker").write_text("gone when the generator changes")
    monkeypatch.setattr(phantom, "VERSION", phantom.VERSION + 1)
    phantom.ensure_phantom(root, **{**args, "n_train": 3})
    assert not (root / "marker").exists()


def test_interrupted_write_leaves_the_old_dataset(tmp_path, monkeypatch):
    root = phantom.write_phantom(tmp_path / "ph", n_train=2, n_test=1, shape=(24, 24, 16), seed=0)
    before = (root / "train.list").read_text()
    calls = []

    def crash(rng, shape):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return make_case(rng, shape)

    make_case = phantom.make_case
    monkeypatch.setattr(phantom, "make_case", crash)
    with pytest.raises(KeyboardInterrupt):
        phantom.ensure_phantom(root, n_train=2, n_test=1, shape=(24, 24, 16), seed=1)
    assert (root / "train.list").read_text() == before    # the complete old phantom, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ph"]


def test_refuses_other_folders_and_bad_parameters(tmp_path):
    (tmp_path / "notes.txt").write_text("not a phantom")
    with pytest.raises(FileExistsError, match="not a phantom"):
        phantom.write_phantom(tmp_path, n_train=1, n_test=1, shape=(24, 24, 16))
    for bad in (dict(n_test=0), dict(shape=(24, 24)), dict(shape=(24, 24, 8))):
        with pytest.raises(ValueError, match="phantom: need"):
            phantom.ensure_phantom(tmp_path / "new", **{"n_train": 1, "n_test": 1, "shape": (24, 24, 16), **bad})


def test_cli_writes_and_previews(tmp_path, capsys):
    png = tmp_path / "preview.png"
    phantom.main(["--out", str(tmp_path / "ph"), "--n-train", "2", "--n-test", "1", "--shape", "24", "24", "16",
                  "--preview", str(png)])
    out = capsys.readouterr().out
    assert "foreground fraction" in out and png.stat().st_size > 1000
