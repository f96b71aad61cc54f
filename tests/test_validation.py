"""The validation split (tuning never reads test.list, never trains on its cases) and the cache of coarser
volumes (used when valid, rebuilt when the source, the factor or the file itself changes)."""
import h5py
import numpy as np
import pytest
import torch

import data
import train
from test_train import tiny_cfg


def test_validation_split_holds_out_the_end_of_train_list_and_never_reads_test_list(tiny_la):
    train_ids = (tiny_la / "train.list").read_text().split()
    test_ids = (tiny_la / "test.list").read_text().split()
    (tiny_la / "test.list").write_text("not an ID list at all / \x00\n")    # unreadable: it must not be read
    split = data.load_split(tiny_la, 2, val_cases=2)
    assert split.test == train_ids[-2:] and split.scored == "validation"
    assert split.labeled == train_ids[:2] and split.unlabeled == train_ids[2:-2]
    assert not set(split.test) & set(split.labeled + split.unlabeled)
    assert not set(test_ids) & set(split.labeled + split.unlabeled + split.test)
    with pytest.raises(data.DataError, match="val_cases=5"):
        data.load_split(tiny_la, 2, val_cases=5)                          # 2 labeled + 5 held out > 6 IDs


def test_validation_cases_are_never_trained_on(tiny_la, tmp_path):
    for references in ("false", "true"):
        cfg = tiny_cfg(tiny_la, tmp_path / "run", val_cases=2, references=references)
        split, volumes = data.prepare_data(cfg)
        run = train.Run(cfg, split, volumes, torch.device("cpu"), progress=False)
        sampled = set(run.sampler.volumes) | {i for ids, _ in run.sampler.parts for i in ids}
        assert sampled == set(split.labeled + split.unlabeled)
        assert not sampled & set(split.test)
        if run.bank is not None:                                     # references come from labeled cases only
            assert set(run.bank.case_ids) <= set(split.labeled)


def load(root, ids, cache, factor=2):
    return data.load_volumes(root, ids, progress=False, factor=factor, cache_dir=cache)


def no_reading(path):
    raise AssertionError(f"{path} was read although its cache entry is valid")


def test_volume_cache_is_used_when_valid(tiny_la, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load(tiny_la, ["CASE00", "CASE01"], cache)
    assert len(list(cache.glob("*.npz"))) == 2 and not list(cache.glob("*.tmp"))
    fresh = data.downsample(*data.read_case(data.case_path(tiny_la, "CASE00")), 2)
    assert all(np.array_equal(a, b) for a, b in zip(first["CASE00"], fresh))
    monkeypatch.setattr(data, "read_case", no_reading)
    again = load(tiny_la, ["CASE00", "CASE01"], cache)
    for i in first:
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(first[i], again[i]))


def test_volume_cache_is_rebuilt_when_the_source_or_the_factor_changes(tiny_la, tmp_path):
    cache = tmp_path / "cache"
    before = load(tiny_la, ["CASE00"], cache)["CASE00"][0]
    path = data.case_path(tiny_la, "CASE00")
    with h5py.File(path, "r+") as f:
        f["image"][...] = f["image"][()] + 1.0
    after = load(tiny_la, ["CASE00"], cache)["CASE00"][0]
    np.testing.assert_allclose(after, before + 1.0, rtol=1e-6)            # the new content, not the old entry
    coarser = load(tiny_la, ["CASE00"], cache, factor=3)["CASE00"][0]
    assert coarser.shape == tuple(s // 3 for s in h5py.File(path, "r")["image"].shape)
    assert len(list(cache.glob("*.npz"))) == 3                            # old source x2, new source x2, x3


@pytest.mark.parametrize("damage", ["truncate", "foreign"])
def test_damaged_volume_cache_entry_is_rebuilt(tiny_la, tmp_path, damage, capsys, monkeypatch):
    cache = tmp_path / "cache"
    good = load(tiny_la, ["CASE01"], cache)["CASE01"]
    (entry,) = cache.glob("*.npz")
    if damage == "truncate":                                              # a write cut short
        entry.write_bytes(entry.read_bytes()[:200])
    else:                                                                 # whole, but made from another file
        np.savez(entry, image=np.zeros((2, 2, 2), np.float32), label=np.zeros((2, 2, 2), np.uint8),
                 source="0" * 40, factor=2)
    capsys.readouterr()
    assert all(np.array_equal(a, b) for a, b in zip(good, load(tiny_la, ["CASE01"], cache)["CASE01"]))
    assert ("damaged volume cache entry" in capsys.readouterr().err) == (damage == "truncate")
    monkeypatch.setattr(data, "read_case", no_reading)                   # the rebuilt entry is valid
    assert all(np.array_equal(a, b) for a, b in zip(good, load(tiny_la, ["CASE01"], cache)["CASE01"]))
