"""Config, schedules, losses, extensions, the training loop (loss goes down, exact resume), ablation tables
and test.py end to end."""
import csv
import json
import math

import pytest
import torch

import ablate
import extensions
import losses
import test as T
import train
from checkpoint import CheckpointError
from config import ConfigError, get_config
from conftest import spawn, wait_for


# a seconds-long CERS run on the tiny data: references from iteration 2, bank refreshed every 2
TINY = {"phantom": "false", "num_labeled": 2, "patch_size": "32,32,16", "base_filters": 4, "max_iters": 4,
        "log_every": 1, "ckpt_every": 2, "rampup_iters": 2, "stride_xy": 16, "stride_z": 8, "window_batch": 4,
        "device": "cpu", "ref_warmup": 2, "bank_refresh": 2, "k_coarse": 4, "k_fine": 2}


def tiny_overrides(root, out, **extra):
    return [f"--{k}={v}" for k, v in {**TINY, "data_root": root, "out_dir": out, **extra}.items()]


def tiny_cfg(root, out, **extra):
    return get_config("PHANTOM_8", tiny_overrides(root, out, **extra))


def test_overrides_are_checked_by_type():
    cfg = get_config("LA_8", ["--max_iters=10", "--lr=0.5", "--patch_size=96,96,64", "--amp=false"])
    assert (cfg.max_iters, cfg.lr, cfg.patch_size, cfg.amp) == (10, 0.5, (96, 96, 64), False)
    assert cfg.num_labeled == 8 and cfg.out_dir == "runs/LA_8" and cfg.bank_stride == (96, 96, 64)
    for bad in (["--max_iters=ten"], ["--no_such_key=1"], ["--amp=maybe"], ["--patch_size=100,96,64"],
                ["max_iters"]):
        with pytest.raises(ConfigError):
            get_config("LA_8", bad)
    with pytest.raises(ConfigError, match="unknown experiment"):
        get_config("LA_9")


def test_la_protocol_settings():
    cfg = get_config("LA_16")
    assert cfg.num_labeled == 16 and cfg.patch_size == (112, 112, 80)
    assert (cfg.batch_size, cfg.labeled_bs) == (4, 2)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.ema_decay) == (0.01, 0.9, 1e-4, 0.99)
    assert cfg.max_iters == 15000
    assert (cfg.stride_xy, cfg.stride_z, cfg.base_filters) == (18, 4, 16)


def test_schedules():
    cfg = get_config("LA_8")
    assert train.lr_at(0, cfg) == cfg.lr and train.lr_at(cfg.max_iters, cfg) == 0.0
    assert train.lr_at(7500, cfg) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert train.sigmoid_rampup(0, 6000) == pytest.approx(math.exp(-5))
    assert train.sigmoid_rampup(6000, 6000) == 1.0 == train.sigmoid_rampup(9000, 6000)
    assert train.consistency_weight(3000, cfg) == pytest.approx(cfg.consistency * math.exp(-5 * 0.25))


def test_losses_known_answers():
    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    label[0, :2] = 1
    perfect = torch.stack([1 - label, label], 1).float() * 40 - 20     # confident and right
    assert losses.supervised_loss(perfect, label) < 1e-6
    assert losses.dice_loss(torch.zeros(1, 4, 4, 4), label.float()) == pytest.approx(1.0, abs=1e-4)
    p = torch.tensor([0.2, 0.5, 0.9])
    assert torch.allclose(losses.sharpen(p, 1.0), p)
    s = losses.sharpen(p, 0.1)
    assert s[0] < 1e-5 and s[1] == 0.5 and s[2] > 0.99999
    assert losses.mse(torch.zeros(0), torch.zeros(0)) == 0.0                # no unlabeled patches: 0, not NaN


def test_extensions_switched_off_change_nothing():
    """Each extension hands back what it was given when its switch is off, and acts when it is on."""
    torch.manual_seed(0)
    image, target = torch.rand(4, 1, 16, 16, 16), torch.rand(2, 16, 16, 16)        # 2 labeled + 2 unlabeled
    label = (torch.rand(2, 16, 16, 16) > 0.5).long()
    logits_a, logits_b = torch.randn(2, 2, 16, 16, 16), torch.randn(2, 2, 16, 16, 16)     # unlabeled part
    loss_mt = torch.tensor(0.3)
    off = get_config("LA_8")                                         # the LA protocol: every extension off
    assert extensions.strong_labeled_view(image, 2, off) is image
    assert extensions.strong_unlabeled_view(image, 2, off) is image
    assert all(a is b for a, b in zip(extensions.mixed(image, target, label, 2, off), (image, target)))
    assert extensions.copy_paste_loss(loss_mt, logits_a, logits_b, target, off) is loss_mt
    assert extensions.transfer_loss(None, label, target, 2, 1.0, off) == 0.0
    on = get_config("LA_8", ["--strong_labeled=true", "--strong_view=true", "--mix_labeled=true"])
    labeled_view = extensions.strong_labeled_view(image, 2, on)
    assert not torch.equal(labeled_view[:2], image[:2]) and torch.equal(labeled_view[2:], image[2:])
    unlabeled_view = extensions.strong_unlabeled_view(image, 2, on)
    assert torch.equal(unlabeled_view[:2], image[:2]) and not torch.equal(unlabeled_view[2:], image[2:])
    mixed, mixed_target = extensions.mixed(image, target, label, 2, on)   # each in part from a labeled one
    assert torch.equal(mixed[:2], image[:2]) and not torch.equal(mixed_target, target)
    hard = (target > 0.5).long()
    assert extensions.copy_paste_loss(loss_mt, logits_a, logits_b, target, on) == pytest.approx(
        float(losses.supervised_loss(logits_a, hard) + losses.supervised_loss(logits_b, hard)))


def test_the_transfer_loss_compares_with_the_foreground_share():
    """ref_masks: the transferred labels (B, H, d, h, w) against each patch's foreground share on their grid,
    the unlabeled part weighted by the consistency weight."""
    cfg = get_config("LA_8", ["--transfer_weight=2.0"])
    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    label[0, :2] = 1                                                 # share 1 in the first half of x, 0 after
    target = torch.full((1, 4, 4, 4), 0.5)
    share = torch.stack([label[0].float(), target[0]])[:, None, ::2, ::2, ::2]     # (2, 1, 2, 2, 2)
    exact = share.expand(2, 3, 2, 2, 2)                             # three heads, each transferring the share
    assert extensions.transfer_loss(exact, label, target, 1, 0.5, cfg) == 0.0
    off_by = exact + torch.tensor([0.1, 0.2]).view(2, 1, 1, 1, 1)  # labeled off by 0.1, unlabeled by 0.2
    assert float(extensions.transfer_loss(off_by, label, target, 1, 0.5, cfg)) == pytest.approx(
        2.0 * (0.1 ** 2 + 0.5 * 0.2 ** 2))


def test_ema_update_moves_the_teacher():
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = teacher.weight.clone()
    train.ema_update(teacher, student, 0.99, it=100)
    assert torch.allclose(teacher.weight, 0.99 * before + 0.01 * student.weight)
    train.ema_update(teacher, student, 0.99, it=0)                   # first step copies the student
    assert torch.allclose(teacher.weight, student.weight)


def test_a_few_iterations_lower_the_supervised_loss(tiny_la, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(tiny_la, tmp_path / "run", max_iters=30, lr=0.05, dropout=0.0, consistency=0.0,
                   log_every=5)
    train.train(cfg, progress=False)
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]
    sup = [float(r.split(",")[3]) for r in rows]
    assert sup[-1] < 0.7 * sup[0], sup


@pytest.mark.parametrize("mix", [{"unlabeled_mix": "false"}, {"unlabeled_mix": "true"},
                                 {"mix_labeled": "true"}, {"unlabeled_mix": "true", "strong_view": "true"},
                                 {"ref_masks": "true", "ref_counterfactual": 0.7, "ref_proto_weight": 1.0}])
def test_resume_gives_the_same_weights_and_bank(tiny_la, tmp_path, mix):
    full = train.train(tiny_cfg(tiny_la, tmp_path / "full", max_iters=5, **mix), progress=False)
    half = tiny_cfg(tiny_la, tmp_path / "half", max_iters=5, **mix)
    train.train(half, progress=False, stop_at=3)                     # interrupted after the bank's first fill
    resumed = train.train(half, resume=True, progress=False)
    a, b = torch.load(full, weights_only=False), torch.load(resumed, weights_only=False)
    assert a["iter"] == b["iter"] == 5
    for key in ("student", "teacher"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert a["bank"]["features"] is not None and torch.equal(a["bank"]["features"], b["bank"]["features"])
    assert (tmp_path / "half" / "log.csv").read_text().count("\n") == 6  # header + 5 rows, none lost


KILLED_IN_SECOND_SAVE = """
import sys, time
import files, train
from config import cli
save = train.save_checkpoint
def hang_in_second_save(path, **state):
    if state["iter"] > 2:                              # the second checkpoint: half its temp file written
        with files.replacing(path) as tmp:
            tmp.write_bytes(b"half a checkpoint")
            print("saving", flush=True)
            time.sleep(600)
    save(path, **state)
train.save_checkpoint = hang_in_second_save
sys.exit(cli(train.main))
"""


@pytest.fixture
def one_thread():
    """Train in this process on one thread, as the children do: bit-identical sums need the same count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_killed_run_resumes_to_the_same_weights(tiny_la, tmp_path, capsys, one_thread):
    """kill -9 in the middle of the second checkpoint's write: the first checkpoint is intact, --resume takes
    over the dead run's lock, removes its temp file and ends with the uninterrupted run's weights."""
    full = train.train(tiny_cfg(tiny_la, tmp_path / "full", max_iters=5), progress=False)
    half = tiny_cfg(tiny_la, tmp_path / "half", max_iters=5)
    child = spawn(["-c", KILLED_IN_SECOND_SAVE, "--exp", "PHANTOM_8", "--no-test",
                   *tiny_overrides(tiny_la, half.out_dir, max_iters=5)], tmp_path)
    wait_for(child, tmp_path, lambda: "saving" in (tmp_path / "stdout.txt").read_text())
    child.kill()
    assert child.wait(60) == -9
    out = tmp_path / "half"
    assert sorted(p.name for p in out.glob(".ckpt_last.pt.*.tmp")) != [] and (out / "run.lock").exists()
    capsys.readouterr()
    resumed = train.train(half, resume=True, progress=False)
    seen = capsys.readouterr()
    assert f"rank 0: resumed {out / 'ckpt_last.pt'} at iteration 2" in seen.out
    assert f"held by process {child.pid}, which ended without releasing it; taken over" in seen.err
    a, b = torch.load(full, weights_only=False), torch.load(resumed, weights_only=False)
    assert a["iter"] == b["iter"] == 5
    for key in ("student", "teacher"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert torch.equal(a["bank"]["features"], b["bank"]["features"])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".lock") == []


def test_test_cases_never_change_training(tmp_path):
    """Training reads the labeled and unlabeled cases only: a phantom with more test cases (the train cases
    are the same files) gives bit-identical weights, so a run can be re-scored on a larger test set."""
    ckpts = []
    for n_test in (1, 3):
        extra = dict(phantom="true", phantom_cases=f"6,{n_test}", phantom_shape="32,32,16", max_iters=3)
        ckpts.append(train.train(tiny_cfg(tmp_path / f"data{n_test}", tmp_path / f"run{n_test}", **extra),
                                 progress=False))
    a, b = (torch.load(c, weights_only=False) for c in ckpts)
    assert len(a["split"]["test"]) == 1 and len(b["split"]["test"]) == 3
    assert a["split"]["test"] == b["split"]["test"][:1]
    for key in ("student", "teacher"):
        assert all(torch.equal(t, b[key][name]) for name, t in a[key].items()), key
    assert torch.equal(a["bank"]["features"], b["bank"]["features"])


def test_training_steps_use_the_references(tiny_la, tmp_path, monkeypatch):
    """After the warm-up every step queries the bank; labeled queries never get their own case back."""
    seen = []
    query = train.query_references

    def spy(bank, logits_b, case_ids, cfg, generator=None, mode=None):
        refs = query(bank, logits_b, case_ids, cfg, generator, mode)
        chosen = [[bank.case_ids[j] for j in row] for row in refs.indices.tolist()]
        seen.append((case_ids, chosen, refs.features.shape))
        return refs

    monkeypatch.setattr(train, "query_references", spy)
    ckpt = train.train(tiny_cfg(tiny_la, tmp_path / "run"), progress=False)
    assert len(seen) == 2                                             # iterations 3 and 4
    for case_ids, chosen, shape in seen:
        assert shape[:2] == (4, 2) and shape[2] == 4 * 16             # (B, k_fine, 16f, ...)
        for own, refs in zip(case_ids, chosen):
            assert own not in refs
    saved = torch.load(ckpt, weights_only=False)
    assert set(saved["pool"]["image"]) >= set(case_ids) and saved["bank"]["features"].shape[1] == 64


@pytest.mark.parametrize("flags, sizes", [({"strong_view": "false"}, []), ({"strong_view": "true"}, [2]),
                                           ({"strong_view": "true", "strong_labeled": "true"}, [2, 2]),
                                           ({"strong_view": "false", "strong_labeled": "true"}, [2])])
def test_strong_view_goes_to_the_patches_asked_for(tiny_la, tmp_path, monkeypatch, flags, sizes):
    """strong_view changes the unlabeled patches, strong_labeled the labeled ones, each once a step; the batch
    here is 2 labeled + 2 unlabeled, and a batch-sized call (4) would mean both parts at once."""
    seen = []
    view = extensions.data.strong_view

    def spy(x):
        seen.append(len(x))
        return view(x)

    monkeypatch.setattr(extensions.data, "strong_view", spy)
    train.train(tiny_cfg(tiny_la, tmp_path / "run", references="false", max_iters=2, **flags), progress=False)
    assert seen == sizes * 2                                          # the same calls in each of 2 iterations


def test_test_py_end_to_end(tiny_la, tmp_path, capsys):
    ckpt = train.train(tiny_cfg(tiny_la, tmp_path / "run"), progress=False)
    summary = T.evaluate(ckpt, lcc=True, progress=False)
    out = capsys.readouterr().out
    assert "largest connected component ON" in out and "mean ± std" in out
    assert summary["cases"] == 2 and 0.0 <= summary["dice"]["mean"] <= 1.0
    assert summary["sensitivity"]
    assert all(0.0 <= summary[k]["mean"] <= 1.0 for k in ("transfer", "transfer_random"))
    assert "label transfer" in out and "case by case" in out
    rows = list(csv.DictReader(open(tmp_path / "run" / "test" / "per_case.csv")))  # the paired gain, per case
    assert all(math.isclose(float(r["ref_gain"]), float(r["dice_a"]) - float(r["dice_a_random"]))
               for r in rows)
    for name in ("per_case.csv", "summary.json", "predictions.png", "references.png"):
        assert (tmp_path / "run" / "test" / name).stat().st_size > 0
    T.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "again"), "--device", "cpu"])
    assert "largest connected component off" in capsys.readouterr().out


def test_sliding_window_handles_odd_and_small_volumes():
    import numpy as np
    for shape in [(37, 29, 21), (20, 50, 9), (32, 32, 16)]:
        image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        # identity "network": the window's own voxels come back, so the average must equal the image
        prob = T.sliding_window(lambda x: x, image, (32, 32, 16), 7, 5, 3, "cpu")
        assert prob.shape == (1, *shape) and np.allclose(prob[0], image, atol=1e-6)


def test_retrieve_explain_queries_with_the_checkpoint(tiny_la, tmp_path, capsys):
    """explain.py --explain: a test case needs a trained decoder B for its query; then it explains and
    draws."""
    import explain
    out = tmp_path / "run"
    args = ["--exp", "PHANTOM_8", f"--data_root={tiny_la}", "--phantom=false", "--num_labeled=2",
            "--patch_size=32,32,16", f"--out_dir={out}", "--k_coarse=4", "--k_fine=2", "--explain", "CASE06"]
    with pytest.raises(CheckpointError, match="no checkpoint"):
        explain.main(args)                                            # a test mask is never read instead
    train.train(tiny_cfg(tiny_la, out), progress=False)
    explain.main(args)
    assert "CASE06" in capsys.readouterr().out
    assert (out / "explain_CASE06.png").stat().st_size > 0


@pytest.mark.parametrize("ref_masks", [False, True])
def test_references_switch_in_without_a_jump_then_matter(tiny_la, tmp_path, monkeypatch, ref_masks):
    """At the first iteration with references, decoder A with them is decoder A without them, bit for bit (the
    reference path starts as the identity); with the references' masks, a few iterations later decoder A's
    output depends on which references it gets: the log's retrieved-vs-random change is clearly above zero.
    (Without masks it stays near zero on this data: docs/results.md §2.3.)"""
    import model
    first = []
    forward = model.DualDecoderVNet.forward

    def spy(self, x, refs=None, **options):
        a, b, transferred = forward(self, x, refs, **options)
        if refs is not None and not first:              # the switch: compare with no references
            with torch.no_grad():
                first.append(torch.equal(a, self.decode_a(self.encoder(x))))
        return a, b, transferred

    monkeypatch.setattr(model.DualDecoderVNet, "forward", spy)
    cfg = tiny_cfg(tiny_la, tmp_path / "run", max_iters=14, ref_warmup=4, dropout=0.0, lr=0.05,
                   ref_masks=str(ref_masks).lower())
    train.train(cfg, progress=False)
    assert first == [True]
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    before = [float(r["ref_delta"]) for r in rows if int(r["iter"]) <= 4]
    after = [float(r["ref_delta"]) for r in rows if int(r["iter"]) > 4]
    assert all(math.isnan(v) for v in before) and all(math.isfinite(float(r["sup_a"])) for r in rows)
    assert all(v >= 0 for v in after)
    if ref_masks:                                                   # decoder A reads its references' labels
        assert after[-1] > 1e-3, after


def test_ablation_table_aggregates_seeds(tmp_path):
    """Each row is the mean ± std (n - 1) over the seeds of each run's mean; sensitivity columns only where
    measured."""
    for seed, dice, delta in ((1, 0.80, 0.002), (2, 0.90, 0.004)):
        folder = tmp_path / "ref_masks" / f"seed{seed}" / "test"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({
            "dice": {"mean": dice}, "jaccard": {"mean": 0.7}, "hd95": {"mean": 5.0}, "asd": {"mean": 1.0},
            "dice_a": {"mean": dice}, "dice_b": {"mean": dice}, "ref_delta": {"mean": delta},
            "run_seconds": 60.0, "ref_gain": {"mean": delta * 10}}))
    table = ablate.ablation_table(tmp_path, "t").splitlines()
    row = [c.strip() for c in table[3].split("|")[1:-1]]
    column = lambda head: row[table[1].split("|").index(f" {head} ") - 1]
    assert row[:3] == ["ref_masks", "2", "85.00 ± 7.07"] and row[-1] == "1.00 ± 0.00"
    assert column("mean abs dp(A) x1e-3") == "3.00 ± 1.41" and len(table) == 4
    assert column("A: retrieved - random, points") == "3.00 ± 1.41"
    assert column("A, random refs %") == "–" and column("transfer %") == "–"


def test_ablation_table_writes_no_negative_zero(tmp_path):
    """A mean that rounds to zero from below reads 0.00, not -0.00 (retrieved = random to 1e-6)."""
    folder = tmp_path / "cers" / "seed1" / "test"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"dice": {"mean": 0.5}, "ref_gain": {"mean": -1e-6}}))
    table = ablate.ablation_table(tmp_path, "t").splitlines()
    row = [c.strip() for c in table[3].split("|")[1:-1]]
    assert row[table[1].split("|").index(" A: retrieved - random, points ") - 1] == "0.00"  # one seed
