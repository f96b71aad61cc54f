"""test.py: the metrics against medpy (the field's oracle) and by hand, the sliding window, evaluate() and its
one-line errors on a tiny trained run, the explanations, and the ablation tables with their bounds."""
import csv
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

import retrieve
import test as T
import train
from config import Config, cli
from conftest import write_la
from data import CASE_DIR, CASE_FILE
from test_train import tiny_cfg, tiny_overrides

try:
    from medpy.metric import binary as medpy
except ImportError:                                   # the oracle is optional; the hand-made answers are not
    medpy = None


def ball(shape, center, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return ((grid - np.reshape(center, (3, 1, 1, 1))) ** 2).sum(0) <= radius ** 2


def test_hand_made_answers_and_empty_masks():
    assert T.__file__.endswith("test.py"), T.__file__          # ours, not the standard library's test package
    a, b = np.zeros((2, 10, 10, 10), bool)
    a[2:6, 2:6, 2:6] = True          # 64 voxels
    b[4:8, 2:6, 2:6] = True          # 64 voxels, 32 shared
    assert T.dice(a, b) == pytest.approx(0.5) and T.jaccard(a, b) == pytest.approx(32 / 96)
    assert T.dice(a, a) == 1.0 and T.hd95(a, a) == 0.0 and T.asd(a, a) == 0.0
    assert 0 < T.hd95(a, b) <= 2.0   # a cube shifted by 2 along x: every surface voxel within 2 of the other
    empty, diagonal = np.zeros_like(a), np.linalg.norm(a.shape)
    assert T.dice(empty, a) == 0.0 and T.jaccard(empty, a) == 0.0
    assert T.hd95(empty, a) == pytest.approx(diagonal) and T.asd(a, empty) == pytest.approx(diagonal)
    assert T.dice(empty, empty) == 1.0 and T.hd95(empty, empty) == 0.0 and T.asd(empty, empty) == 0.0


@pytest.mark.skipif(medpy is None, reason="medpy (the oracle) is not installed")
@pytest.mark.parametrize("seed", [0, 1, 2, 3, "border"])
def test_against_medpy(seed):
    if seed == "border":              # boxes touching three faces of the volume
        pred, gt = np.zeros((12, 12, 8), bool), np.zeros((12, 12, 8), bool)
        pred[0:7, 3:12, 0:4] = gt[0:5, 0:9, 2:8] = True
    else:                             # random balls, the prediction with speckles
        rng, shape = np.random.default_rng(seed), (30 + seed, 27, 19)
        pred = ball(shape, rng.uniform(8, 18, 3), rng.uniform(4, 8)) | (rng.random(shape) > 0.995)
        gt = ball(shape, rng.uniform(8, 18, 3), rng.uniform(4, 8))
    assert T.dice(pred, gt) == pytest.approx(medpy.dc(pred, gt))
    assert T.jaccard(pred, gt) == pytest.approx(medpy.jc(pred, gt))
    assert T.hd95(pred, gt) == pytest.approx(medpy.hd95(pred, gt))
    assert T.asd(pred, gt) == pytest.approx(medpy.asd(pred, gt))
    assert T.asd(gt, pred) == pytest.approx(medpy.asd(gt, pred))   # asd is one-directional, as in medpy


def test_largest_component_and_sliding_window():
    m = np.zeros((20, 20, 20), bool)
    m[1:4, 1:4, 1:4] = True           # 27 voxels
    m[10:16, 10:16, 10:16] = True     # 216 voxels
    m[16, 16, 16] = True              # touches the big cube diagonally: 26-connected
    out = T.largest_component(m)
    assert out.sum() == 217 and not out[2, 2, 2]
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
    """A CERS checkpoint trained on a 2x coarser grid (LA_8_LOW's path: scored there and on the original)."""
    root = tmp_path_factory.mktemp("data")
    cfg = tiny_cfg(write_la(root / "LA"), root / "run", max_iters=2, downsample=2, cache_dir=root / "cache",
                   patch_size="16,16,16")
    return train.train(cfg, progress=False)


def test_evaluate_and_explain_write_and_print(trained, tmp_path, capsys):
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
    assert [again["config"][k] for k in ("window_batch", "stride_xy", "device", "k_fine")] == [2, 8, "cpu", 2]
    assert again["lcc"] is False and not again["sensitivity"]
    assert "largest connected component off" in capsys.readouterr().out
    T.main(["--ckpt", str(trained), "--explain", "CASE06"])          # a test case: decoder B gives its shapes
    out = capsys.readouterr().out
    assert "query 0 (case CASE06" in out and "chosen, weight" in out and "bm25" in out
    assert (trained.parent / "explain_CASE06.png").stat().st_size > 0


def test_data_changed_since_training_and_the_one_line_refusals(trained, tmp_path, capsys):
    """A test case added since training gets its image CoT from the pool (the same text: the same scores);
    other labeled cases in train.list leave the checkpoint's bank; a test case it trained on, a labeled case
    file that no longer fits its bank, a key the checkpoint fixes or a bad value are refused in one line."""
    data_root = shutil.copytree(trained.parent.parent / "LA", tmp_path / "LA")
    ckpt = torch.load(trained, weights_only=True)
    ckpt["config"]["data_root"] = str(data_root)
    added = ckpt["split"]["test"].pop(0)
    del ckpt["pool"]["image"][added]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    ids = (data_root / "train.list").read_text().split()
    (data_root / "train.list").write_text("\n".join(ids[2:] + ids[:2]))       # labeled: CASE02, CASE03
    T.evaluate(trained, out_dir=tmp_path / "before", progress=False, sensitivity=False)
    T.evaluate(tmp_path / "ckpt.pt", out_dir=tmp_path / "after", progress=False, sensitivity=False)
    assert "1 cached, 0 new" in capsys.readouterr().out
    assert (tmp_path / "after" / "per_case.csv").read_text() == (tmp_path / "before/per_case.csv").read_text()
    shutil.copy(data_root / CASE_DIR / "CASE02" / CASE_FILE, data_root / CASE_DIR / ids[0] / CASE_FILE)
    ckpt["split"]["unlabeled"].append(added)
    torch.save(ckpt, tmp_path / "seen.pt")
    for path, flag, words in [(tmp_path / "ckpt.pt", "--lcc", "ckpt.pt: its reference bank does not fit"),
                              (tmp_path / "seen.pt", "--lcc", f"seen.pt: test case {added!r} was trained on"),
                              (trained, "--k_fine=3", "cannot change at test time"),
                              (trained, "--window_batch=0", "window_batch=0"), (trained, "--amp=x", "--amp"),
                              (trained, "--stride_xy=20", "leave gaps"), (trained, "--explain=NOPE", "NOPE")]:
        assert cli(T.main, ["--ckpt", str(path), "--out", str(tmp_path / "x"), flag]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_out_of_memory_is_one_line_that_says_what_to_lower(trained, tmp_path, capsys, monkeypatch):
    def oom(self, x):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(torch.nn.Conv3d, "forward", oom)
    assert cli(T.main, ["--ckpt", str(trained), "--out", str(tmp_path), "--window_batch=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]            # after the progress bar, one line
    assert err.startswith("error: test: out of memory") and all(
        w in err for w in ("window_batch=3", "patch_size=16,16,16", "lower --window_batch")), err
    monkeypatch.setattr(torch.nn.Conv3d, "forward", lambda self, x: torch.ones(2, 3) @ torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="shapes"):                 # any other error stays a bug
        T.main(["--ckpt", str(trained), "--out", str(tmp_path)])


COTS = ("alpha", "bravo", "charlie", "delta")


def test_filter_report_counts_what_the_filter_rejects(tmp_path, tiny_la, capsys):
    """Each query's 12 candidates are the patches of the other three cases; its text names one of them, so at
    tau 0.5 the 8 patches of the other two are hard negatives and one case is left (one patch, the cap)."""
    volumes = {}
    for c, s in zip("ABCD", (4, 6, 12, 14)):            # centred cubes: every orientation is the same patch
        label = np.zeros((16, 16, 16), np.uint8)
        label[(slice((16 - s) // 2, (16 + s) // 2),) * 3] = 1
        volumes[c] = (label.astype(np.float32), label)
    cfg = dataclasses.replace(Config(), patch_size=(16, 16, 16), bank_stride=(16, 16, 16), k_coarse=32,
                              k_fine=2)
    bank = retrieve.ReferenceBank.build(cfg, volumes, list("ABCD"), dict(zip("ABCD", COTS)))
    lines = T.filter_report(bank, dict(zip("ABCD", COTS[::-1])), cfg, (0.0, 0.5))   # each names another
    assert "16 bank entries of 4 labeled cases (4 distinct mask CoTs)" in lines[0]
    assert lines[1] == ("tau 0.00:   0.0 % of candidates rejected,   0.0 % of queries with no survivor, "
                        "2.00 of 2 slots held by survivors, 2.00 distinct cases among the references")
    assert lines[2] == ("tau 0.50:  66.7 % of candidates rejected,   0.0 % of queries with no survivor, "
                        "1.00 of 2 slots held by survivors, 1.00 distinct cases among the references")
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


def test_ablation_table_rows_spread_and_pairs(tmp_path):
    for seed, dice in ((1, 0.70), (2, 0.74), (3, 0.90)):
        write_summary(tmp_path, "supervised_only", seed, dice)
    for seed, dice in ((1, 0.75), (2, 0.73)):                  # seed 3 missing: not paired, not counted
        write_summary(tmp_path, "no_references", seed, dice)
    write_summary(tmp_path, "an_extra_row", 1, 0.5)
    write_summary(tmp_path, "cers", 1, 0.8, dice_a_random={"mean": 0.6}, ref_gain={"mean": -1e-6},
                  run_seconds=90)                             # its baseline (no_references) has seed 1
    table = T.ablation_table(tmp_path, "t").splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[3:]
            if line.startswith("| ")}
    assert list(rows)[:4] == ["no_references", "supervised_only", "cers", "an_extra_row"]   # PAIRS' first
    assert rows["no_references"][1] == "74.00 ± 1.41"                    # sqrt((1² + 1²) / (2 - 1)), not 1.00
    heads = [h.strip() for h in table[1].split("|")[2:-1]]
    picked = ("A, random refs %", "minutes", "A: retrieved - random, points")
    assert [rows["cers"][heads.index(h)] for h in picked] == ["60.00", "1.50", "0.00"]        # not -0.00
    assert rows["supervised_only"][heads.index("A, random refs %")] == "–"
    # +5 and -1: sd 4.2426, t_{0.975, 1} = 12.706, half width 38.12; detectable 11.55 sd at n = 2
    assert rows["no_references − supervised_only"] == ["1: +5.00, 2: -1.00", "+2.00 [-36.12, +40.12]",
                                                       "1 of 2", "49.00"]
    assert rows["cers − no_references"] == ["1: +5.00", "+5.00 —", "1 of 1", "—"]    # one seed: no bounds
    assert [r for r in rows if "−" in r] == ["row − baseline", "no_references − supervised_only",
                                             "cers − no_references"]                   # no pair, no row
    assert T.paired_table({"cers": {1: {"dice": {"mean": 0.8}}}}) == []
