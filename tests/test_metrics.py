"""test.py: the metrics against medpy.metric.binary (the field's oracle) and hand-computed answers, the
sliding window, evaluate() on a tiny trained run with its one-line errors, the explanations, and the ablation
tables with their bounds."""
import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import retrieve
import test as T
import train
from config import Config, cli
from conftest import write_la
from test_train import tiny_cfg, tiny_overrides

try:
    from medpy.metric import binary as medpy
except ImportError:                                   # the oracle is optional; the hand-made answers are not
    medpy = None
oracle = pytest.mark.skipif(medpy is None, reason="medpy (the oracle) is not installed")


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


@oracle
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


@oracle
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


def test_sliding_window_covers_odd_and_small_volumes():
    for size, patch, stride in [(112, 112, 18), (150, 112, 18), (88, 80, 4), (97, 48, 16)]:
        starts = T.window_starts(size, patch, stride)
        assert starts[0] == 0 and starts[-1] == size - patch
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
    for shape in [(37, 29, 21), (20, 50, 9), (32, 32, 16)]:
        image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        # identity "network": the window's own voxels come back, so the average must equal the image
        prob = T.sliding_window(lambda x: x, image, (32, 32, 16), 7, 5, 3, "cpu")
        assert prob.shape == (1, *shape) and np.allclose(prob[0], image, atol=1e-6)


# ----------------------------------------------------------------------------- a tiny trained run

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CERS checkpoint trained for a few iterations on a 2x coarser grid of the tiny data (the LA_8_LOW
    path: scored on that grid and on the original one)."""
    root = tmp_path_factory.mktemp("data")
    write_la(root / "LA")
    cfg = tiny_cfg(root / "LA", root / "run", max_iters=2, downsample=2, cache_dir=root / "cache",
                   patch_size="16,16,16")
    return train.train(cfg, progress=False)


def test_evaluate_writes_and_prints_the_scores(trained, tmp_path, capsys):
    summary = T.evaluate(trained, lcc=True, out_dir=tmp_path / "t", progress=False)
    out = capsys.readouterr().out
    assert "largest connected component ON" in out and "mean ± std" in out and "model's grid" in out
    assert summary["lcc"] is True and summary["iteration"] == 2 and summary["cases"] == 2
    assert summary["sensitivity"] and "reference sensitivity" in out
    assert 0 <= summary["low_dice"]["mean"] <= 1 and 0 <= summary["dice_a_zeroed"]["mean"] <= 1
    rows = list(csv.DictReader(open(tmp_path / "t" / "per_case.csv")))     # the paired gain, per case
    gain = [float(r["dice_a"]) - float(r["dice_a_random"]) for r in rows]
    assert len(rows) == 2 and all(math.isclose(float(r["ref_gain"]), g) for r, g in zip(rows, gain))
    for name in ("per_case.csv", "summary.json", "predictions.png", "references.png"):
        assert (tmp_path / "t" / name).stat().st_size > 0
    # the test-time keys change for any checkpoint; the rest stays the checkpoint's
    T.main(["--ckpt", str(trained), "--out", str(tmp_path / "again"), "--device=cpu", "--window_batch=2",
            "--stride_xy=8", "--no-sensitivity"])
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    used = again["config"]
    assert (used["window_batch"], used["stride_xy"], used["device"], used["k_fine"]) == (2, 8, "cpu", 2)
    assert again["lcc"] is False and not again["sensitivity"]
    assert "largest connected component off" in capsys.readouterr().out


@pytest.mark.parametrize("flag, words", [("--k_fine=3", "cannot change at test time"),
                                         ("--window_batch=0", "window_batch=0"),
                                         ("--stride_xy=20", "leave gaps"), ("--amp=maybe", "--amp")])
def test_test_time_keys_are_checked(trained, tmp_path, capsys, flag, words):
    assert cli(T.main, ["--ckpt", str(trained), "--out", str(tmp_path), flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_out_of_memory_is_one_line_that_says_what_to_lower(trained, tmp_path, capsys, monkeypatch):
    def oom(self, x):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(torch.nn.Conv3d, "forward", oom)
    assert cli(T.main, ["--ckpt", str(trained), "--out", str(tmp_path), "--window_batch=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]            # after the progress bar, one line
    assert err.startswith("error: test: out of memory"), err
    assert all(w in err for w in ("window_batch=3", "patch_size=16,16,16", "lower --window_batch"))

    def bug(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(torch.nn.Conv3d, "forward", bug)
    with pytest.raises(RuntimeError, match="shapes"):                 # any other error stays a bug
        T.main(["--ckpt", str(trained), "--out", str(tmp_path)])


def test_explain_shows_why_a_case_got_its_references(trained, capsys):
    T.main(["--ckpt", str(trained), "--explain", "CASE06"])          # a test case: decoder B gives its shapes
    out = capsys.readouterr().out
    assert "query 0 (case CASE06" in out and "chosen, weight" in out and "bm25" in out
    assert (trained.parent / "explain_CASE06.png").stat().st_size > 0
    assert cli(T.main, ["--ckpt", str(trained), "--explain", "NOPE"]) == 2
    assert "NOPE" in capsys.readouterr().err


SIDES = {"A": 4, "B": 6, "C": 12, "D": 14}   # centred cubes: every orientation is the same patch
MASK_COTS = {"A": "alpha", "B": "bravo", "C": "charlie", "D": "delta"}
IMAGE_COTS = {"A": "delta", "B": "charlie", "C": "alpha", "D": "bravo"}   # each names one other case


def test_filter_report_counts_what_the_filter_rejects():
    """Each query's 12 candidates are the patches of the other three cases; its text names one of them, so at
    tau 0.5 the 8 patches of the other two are hard negatives and one case is left (one patch, the cap)."""
    volumes = {}
    for c, s in SIDES.items():
        label = np.zeros((16, 16, 16), np.uint8)
        label[(slice((16 - s) // 2, (16 + s) // 2),) * 3] = 1
        volumes[c] = (label.astype(np.float32), label)
    cfg = dataclasses.replace(Config(), patch_size=(16, 16, 16), bank_stride=(16, 16, 16), k_coarse=32,
                              k_fine=2)
    bank = retrieve.ReferenceBank.build(cfg, volumes, list(SIDES), MASK_COTS)
    lines = T.filter_report(bank, IMAGE_COTS, cfg, taus=(0.0, 0.5))
    assert "16 bank entries of 4 labeled cases (4 distinct mask CoTs)" in lines[0]
    assert lines[1] == ("tau 0.00:   0.0 % of candidates rejected,   0.0 % of queries with no survivor, "
                        "2.00 of 2 slots held by survivors, 2.00 distinct cases among the references")
    assert lines[2] == ("tau 0.50:  66.7 % of candidates rejected,   0.0 % of queries with no survivor, "
                        "1.00 of 2 slots held by survivors, 1.00 distinct cases among the references")


def test_filter_report_command(tmp_path, tiny_la, capsys):
    T.main(["--exp", "PHANTOM_8", *tiny_overrides(tiny_la, tmp_path / "run"), "--filter-report"])
    out = capsys.readouterr().out
    assert "bank entries of 2 labeled cases" in out and out.count("% of candidates rejected") == 5


# ----------------------------------------------------------------------------- ablation tables

def write_summary(folder, name, seed, dice, **extra):
    path = folder / name / f"seed{seed}" / "test"
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"dice": {"mean": dice}, **extra}))


def test_paired_bounds_by_hand_and_by_simulation():
    mean, lo, hi, above, detect = T.paired_bounds([1, 2, 3, 4, 5])
    half = 2.7764 * 1.5811 / math.sqrt(5)                # t_{0.975, 4} sd / sqrt(n) = 1.9632
    assert (mean, above) == (3, 5) and (lo, hi) == pytest.approx((3 - half, 3 + half), abs=1e-3)
    # the detectable difference: paired t-tests on 5 normal differences with that mean and sd 1.5811 reject
    # 4 times in 5, and clearly less often at 90 % of it
    rng = np.random.default_rng(0)

    def power(delta):
        d = rng.normal(delta, 1.5811, (200_000, 5))
        return np.mean(np.abs(d.mean(1) / (d.std(1, ddof=1) / math.sqrt(5))) > 2.7764)
    assert power(detect) == pytest.approx(0.8, abs=0.006) and power(0.9 * detect) < 0.74
    assert T.detectable_difference(1.0, 10) == pytest.approx(0.996, abs=1e-3)   # tables: dz 1.0 needs n = 10
    assert T.paired_bounds([2.0]) == (2.0, None, None, 1, None)


def test_paired_table_subtracts_the_baseline_seed_by_seed(tmp_path):
    for seed, dice in ((1, 0.70), (2, 0.72), (3, 0.90)):
        write_summary(tmp_path, "supervised_only", seed, dice)
    for seed, dice in ((1, 0.75), (2, 0.71)):                  # seed 3 missing: not paired, not counted
        write_summary(tmp_path, "no_references", seed, dice)
    write_summary(tmp_path, "cers", 1, 0.80)                   # its baseline (no_references) has seed 1
    lines = T.paired_table(tmp_path)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    # +5 and -1: sd 4.2426, t_{0.975, 1} = 12.706, half width 38.12; detectable 11.55 sd at n = 2
    assert rows["no_references − supervised_only"] == ["1: +5.00, 2: -1.00", "+2.00 [-36.12, +40.12]",
                                                       "1 of 2", "49.00"]
    assert rows["cers − no_references"] == ["1: +5.00", "+5.00 —", "1 of 1", "—"]    # one seed: no bounds
    assert len(rows) == 2                                       # no pair, no row
    assert "cers − no_references" in T.ablation_table(tmp_path, "t")
    assert T.paired_table(tmp_path / "supervised_only") == []


def test_ablation_table_rows_and_spread(tmp_path):
    for seed, dice in ((1, 0.70), (2, 0.74)):
        write_summary(tmp_path, "supervised_only", seed, dice)
    write_summary(tmp_path, "an_extra_row", 1, 0.5)
    write_summary(tmp_path, "cers", 1, 0.8, dice_a_random={"mean": 0.6}, ref_gain={"mean": -1e-6},
                  run_seconds=90)
    table = T.ablation_table(tmp_path, "t").splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[3:6]}
    assert list(rows) == ["supervised_only", "cers", "an_extra_row"]       # PAIRS' order, then the others
    assert rows["supervised_only"][1] == "72.00 ± 2.83"         # sqrt((2² + 2²) / (2 - 1)), not 2.00
    heads = [h.strip() for h in table[1].split("|")[2:-1]]
    assert rows["cers"][heads.index("A, random refs %")] == "60.00"
    assert rows["cers"][heads.index("minutes")] == "1.50"
    assert rows["cers"][heads.index("A: retrieved - random, points")] == "0.00"      # not -0.00
    assert rows["supervised_only"][heads.index("A, random refs %")] == "–"
