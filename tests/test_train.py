"""train.py: the schedules and the EMA, the loop (loss goes down, references on every step, exact resume of
the weights, the bank and the log, also after a kill), the record of a run, the dry run (--check), out of
memory in one line, and the ablation rows."""
import csv
import dataclasses
import json
import math
import os
import shutil

import pytest
import torch

import config
import train
from config import CersError, ConfigError, World, cli, get_config
from conftest import spawn, wait_for

# a seconds-long CERS run on the tiny data: the bank refreshed every 2 iterations, a checkpoint every 2
TINY = {"phantom": "false", "num_labeled": 2, "patch_size": "32,32,16", "base_filters": 4, "max_iters": 4,
        "log_every": 1, "ckpt_every": 2, "rampup_iters": 2, "stride_xy": 16, "stride_z": 8, "window_batch": 4,
        "device": "cpu", "bank_refresh": 2, "k_coarse": 4, "k_fine": 2}


def tiny_overrides(root, out, **extra):
    return [f"--{k}={v}" for k, v in {**TINY, "data_root": root, "out_dir": out, **extra}.items()]


def tiny_cfg(root, out, **extra):
    return get_config("PHANTOM_8", tiny_overrides(root, out, **extra))


def read_log(path, drop=("seconds",)):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def same_weights(a, b):
    a, b = (torch.load(p, weights_only=True) for p in (a, b))
    assert a["iter"] == b["iter"]
    for key in ("student", "teacher"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert (a["bank"] is None) == (b["bank"] is None)
    assert a["bank"] is None or torch.equal(a["bank"]["features"], b["bank"]["features"])
    return a


def test_schedules():
    cfg = dataclasses.replace(get_config("LA_8"), consistency=0.5)
    assert train.lr_at(0, cfg) == cfg.lr and train.lr_at(cfg.max_iters, cfg) == 0.0
    assert train.lr_at(7500, cfg) == pytest.approx(0.01 * 0.5 ** 0.9)
    weight = [train.consistency_weight(it, dataclasses.replace(cfg, rampup_iters=n))
              for it, n in [(0, 6000), (3000, 6000), (6000, 6000), (9000, 6000), (0, 0)]]
    assert weight[:2] == pytest.approx([0.5 * math.exp(-5), 0.5 * math.exp(-5 * 0.25)])
    assert weight[2:] == [0.5] * 3


def test_ema_update_moves_the_teacher():
    student, teacher = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        student.weight += torch.tensor([3.0, 4.0])
    student.running_mean += 1.0
    student.num_batches_tracked += 7
    before = teacher.weight.clone()
    train.ema_update(teacher, student, 0.99, it=100)
    assert torch.allclose(teacher.weight, 0.99 * before + 0.01 * student.weight)
    assert torch.allclose(teacher.running_mean, 0.01 * student.running_mean)       # float buffers follow
    assert teacher.num_batches_tracked == 7                                          # the others are copied
    train.ema_update(teacher, student, 0.99, it=0)                   # the first step copies the student
    assert torch.allclose(teacher.weight, student.weight)


def test_a_few_iterations_lower_the_supervised_loss_and_record_the_run(tiny_la, tmp_path, capsys):
    """Overfitting a few labeled patches; config.json has the provenance the header prints, and log.csv a row
    per iteration with decoder A's use of its references."""
    torch.manual_seed(0)
    out = tmp_path / "run"
    train.train(tiny_cfg(tiny_la, out, max_iters=30, lr=0.05, dropout=0.0, consistency=0.0, log_every=5,
                         bank_refresh=10), progress=False)
    rows = read_log(out / "log.csv")
    assert [int(r["iter"]) for r in rows] == list(range(5, 31, 5))
    sup = [float(r["sup"]) for r in rows]
    assert sup[-1] < 0.7 * sup[0], sup
    assert all(float(r["ref_delta"]) >= 0 and float(r["context_ratio"]) > 0 for r in rows)
    record = json.loads((out / "config.json").read_text())
    prov = record.pop("provenance")
    assert record["max_iters"] == 30 and prov["labeled"] == ["CASE00", "CASE01"]
    assert prov["torch"] == torch.__version__ and prov["processes"] == 1 and prov["global_batch"] == 4
    assert set(prov) >= {"cuda", "cudnn", "device", "git_commit", "git_changes", "command"}
    assert prov["git_commit"] == "unknown" or len(prov["git_commit"]) == 40
    header = capsys.readouterr().out.split("PHANTOM_8: ")[1].split("trained 30 iterations")[0]
    assert len(header.strip().splitlines()) <= 10 and (out / "curves.png").stat().st_size > 0
    header = " ".join(header.split())
    assert "max_iters=30" in header and "labeled: CASE00, CASE01;" in header
    assert f"git_commit: {prov['git_commit']}" in header


def test_every_step_uses_references_that_are_never_the_query_s_own_case(tiny_la, tmp_path, monkeypatch):
    seen, query = [], train.query_references

    def spy(bank, logits_b, case_ids, cfg, generator=None, mode=None):
        refs = query(bank, logits_b, case_ids, cfg, generator, mode)
        seen.append((case_ids, [[bank.case_ids[j] for j in row] for row in refs.indices.tolist()], refs))
        return refs

    monkeypatch.setattr(train, "query_references", spy)
    ckpt = train.train(tiny_cfg(tiny_la, tmp_path / "run", log_every=10), progress=False)
    assert len(seen) == 4 + 1                                         # one a step, from the first; the log's
    for case_ids, chosen, refs in seen:
        assert refs.features.shape[:3] == (4, 2, 16 * 4)              # (B, k_fine, 16f, ...)
        assert all(own not in picked for own, picked in zip(case_ids, chosen))
    saved = torch.load(ckpt, weights_only=True)
    assert set(saved["pool"]["image"]) >= {i for ids, _, _ in seen for i in ids}


KILLED_IN_SECOND_SAVE = """
import sys, time
import config, train
from config import cli
save = train.save_checkpoint
def hang_in_second_save(path, **state):
    if state["iter"] > 2:                              # the second checkpoint: half its temp file written
        with config.replacing(path) as tmp:
            tmp.write_bytes(b"half a checkpoint")
            print("saving", flush=True)
            time.sleep(600)
    save(path, **state)
train.save_checkpoint = hang_in_second_save
sys.exit(cli(train.main))
"""


@pytest.mark.parametrize("references", ["true", "false"])
def test_a_resumed_run_is_the_uninterrupted_one(tiny_la, tmp_path, capsys, references):
    """Killed (kill -9) in the middle of its second checkpoint's write, or stopped after iteration 3, and
    resumed: the same weights, bank and log as 5 iterations in one go. After the kill the first checkpoint is
    intact; --resume takes over the dead run's lock and removes its temp file."""
    cfg, out = tiny_cfg(tiny_la, tmp_path / "half", max_iters=5, references=references), tmp_path / "half"
    full = train.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "full")), progress=False)
    if references == "true":
        child = spawn(["-c", KILLED_IN_SECOND_SAVE, "--exp", "PHANTOM_8", "--no-test",
                       *tiny_overrides(tiny_la, out, max_iters=5)], tmp_path)
        wait_for(child, tmp_path, lambda: "saving" in (tmp_path / "stdout.txt").read_text())
        child.kill()
        assert child.wait(60) == -9
        assert list(out.glob(".ckpt_last.pt.*.tmp")) != [] and (out / "run.lock").exists()
    else:
        train.train(cfg, progress=False, stop_at=3)
    capsys.readouterr()
    resumed = train.train(cfg, resume=True, progress=False)
    seen, at = capsys.readouterr(), 2 if references == "true" else 3
    assert f"rank 0: resumed {out / 'ckpt_last.pt'} at iteration {at}" in seen.out
    if references == "true":
        assert f"held by process {child.pid}, which ended without releasing it; taken over" in seen.err
    assert same_weights(full, resumed)["iter"] == 5
    assert read_log(out / "log.csv") == read_log(tmp_path / "full" / "log.csv")
    assert [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".lock"] == []


def test_the_log_drops_the_rows_after_the_checkpoint_atomically(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    train.start_log(path)
    with open(path, "a", newline="") as f:                            # rows as the loop writes them (\r\n)
        csv.writer(f).writerows([it, 0.01, 1.5, 0.5, 0.25, 0.1, 1.0, "nan", 0.5, 2 * it] for it in (2, 4, 6))
    whole = path.read_bytes()
    with open(path, "a", newline="") as f:
        f.write("8,0.01,1.5\r\n10,0.0")                       # a row after the checkpoint, one cut short
    cut = path.read_bytes()
    monkeypatch.setattr(config.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(config.WriteError, match="log.csv"):
        train.start_log(path, resume_at=6)
    assert path.read_bytes() == cut and os.listdir(tmp_path) == ["log.csv"]   # as it was, no temp file
    monkeypatch.undo()
    train.start_log(path, resume_at=6)
    assert path.read_bytes() == whole and [r["iter"] for r in read_log(path)] == ["2", "4", "6"]
    train.start_log(path)                                             # a new run: the header alone
    assert path.read_text() == ",".join(train.COLUMNS) + "\n"


def test_test_cases_never_change_training(tmp_path):
    """Training reads the labeled and unlabeled cases only: a phantom with more test cases (the train cases
    are the same files) gives bit-identical weights, so a run can be re-scored on a larger test set."""
    ckpts = [train.train(tiny_cfg(tmp_path / f"data{n}", tmp_path / f"run{n}", phantom="true", max_iters=2,
                                  phantom_cases=f"6,{n}", phantom_shape="32,32,16"), progress=False)
             for n in (1, 3)]
    more = torch.load(ckpts[1], weights_only=True)["split"]["test"]
    assert same_weights(*ckpts)["split"]["test"] == more[:1]


def test_out_of_memory_is_one_line_and_keeps_the_checkpoint(tiny_la, tmp_path, monkeypatch):
    step = train.train_step

    def oom_at_3(run, it, *batch):
        if it == 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory")
        return step(run, it, *batch)

    monkeypatch.setattr(train, "train_step", oom_at_3)
    cfg = tiny_cfg(tiny_la, tmp_path / "run")
    with pytest.raises(CersError) as e:
        train.train(cfg, progress=False)
    ckpt = tmp_path / "run" / "ckpt_last.pt"
    assert all(w in str(e.value) for w in ("out of memory", "patch_size=32,32,16", "batch_size=4",
                                           "base_filters=4", "--patch_size", "--batch_size", str(ckpt)))
    assert torch.load(ckpt, weights_only=True)["iter"] == 2 and not (tmp_path / "run" / "run.lock").exists()
    monkeypatch.setattr(train, "train_step", lambda *a: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):                  # any other error stays a bug
        train.train(cfg, progress=False, resume=True)


def test_a_folder_with_only_the_record_takes_the_same_config_again(tiny_la, tmp_path):
    """config.json (with its provenance) but no checkpoint, as a run stopped before its first one leaves: the
    same config trains there again, another is refused without --force."""
    cfg = tiny_cfg(tiny_la, tmp_path / "run", references="false", max_iters=1)
    (train.train(cfg, progress=False)).unlink()
    assert "provenance" in json.loads((tmp_path / "run" / "config.json").read_text())
    assert train.train(cfg, progress=False).exists()
    (tmp_path / "run" / "ckpt_last.pt").unlink()
    with pytest.raises(ConfigError, match="lr=0.03 there, 0.02 here"):
        train.train(dataclasses.replace(cfg, lr=0.02), progress=False)


# ----------------------------------------------------------------------------- the checks before a run
def test_check_says_what_would_run_and_leaves_nothing(tiny_la, tmp_path, capsys):
    before = sorted(p.name for p in tiny_la.iterdir())
    out = tmp_path / "runs" / "run"
    assert cli(train.main, ["--exp", "PHANTOM_8", "--check", *tiny_overrides(tiny_la, out)]) == 0
    said = capsys.readouterr().out
    assert "check passed: iterations 1 to 4 would run with descriptors CoT texts" in said
    assert "labeled: CASE00, CASE01;" in said and "fp32 + channels-last 3D" in said and "device: " in said
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in tiny_la.iterdir()) == before
    data = tmp_path / "phantom"                                       # not generated: only said
    assert cli(train.main, ["--exp", "PHANTOM_8", "--check", f"--data_root={data}", f"--out_dir={out}"]) == 0
    assert f"once a phantom is written to {data}" in capsys.readouterr().out and not data.exists()


def test_check_and_a_run_refuse_in_one_line_before_anything_else(tiny_la, tmp_path, capfd, monkeypatch):
    """--check refuses what the run would refuse; a run refused says so in one line and nothing else (no
    config printed first), before a phantom is written."""
    def refused(*words, check=("--check",), **overrides):
        argv = ["--exp", "PHANTOM_8", *check, *tiny_overrides(tiny_la, out, **overrides)]
        assert cli(train.main, argv) == 2
        seen = capfd.readouterr()
        assert seen.out == "" and seen.err.count("\n") == 1 and all(w in seen.err for w in words), seen.err

    out = tmp_path / "run"
    for check in (("--check",), ()):
        refused("error: ", "no_data", "data root not found", check=check, data_root=tmp_path / "no_data")
    with pytest.raises(ConfigError, match="labeled_bs=1 must divide among 2 processes"):
        train.check_run(tiny_cfg(tiny_la, out, labeled_bs=1), World(0, 2))
    busy = (f"error: {out}: another run (PID {os.getpid()}) is training in this folder; wait for it to end, "
            "or train elsewhere with --out_dir=...\n")
    with config.Lock(out / "run.lock"):                               # another run trains there
        for check in (("--check",), ()):
            refused(busy, check=check, phantom="true", data_root=tmp_path / "ph")
    assert not (tmp_path / "ph").exists()                            # no phantom written
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 2 ** 20))
    refused("1 MB free", "checkpoints need")
    assert not out.exists()


# ----------------------------------------------------------------------------- the ablation rows
def test_the_ablation_runner_trains_and_tests_each_row_and_seed(tiny_la, tmp_path, monkeypatch, capsys):
    """Each row: the experiment, the paper's keys as in PAPER, its control changed; each seed; the table."""
    trained = {}

    def fake_train(cfg, force=False):
        trained[os.path.relpath(cfg.out_dir, out)] = cfg
        config.make_folder(os.path.join(cfg.out_dir, "test"))          # where test.evaluate writes
        return "ckpt"

    monkeypatch.setattr(train, "train", fake_train)
    monkeypatch.setattr(train.test, "evaluate", lambda ckpt: {"dice": {"mean": 0.5}})
    out = tmp_path / "abl"
    args = ["--exp", "PHANTOM_8", *tiny_overrides(tiny_la, out, val_cases=2, retrieval="morph",
                                                   mcam_gates="false")]
    assert cli(train.main, [*args, "--ablation", "all"]) == 0
    paper = {"references": True, "retrieval": "both", "mcam_gates": True, "consistency": 1.0,
             "num_labeled": 2, "labeled_bs": 2}
    rows = {name.split("/")[1]: {k: getattr(cfg, k) for k in paper} for name, cfg in trained.items()}
    assert sorted(trained) == sorted(f"ablation/{name}/seed1337" for name in train.ABLATIONS)
    for name, change in [("cers", {}), ("no_cot_filter", {"retrieval": "morph"}),
                         ("no_mcam", {"mcam_gates": False}), ("random_retrieval", {"retrieval": "random"})]:
        assert rows[name] == {**paper, **change}, name
    assert rows["no_references"]["references"] is False and rows["supervised_only"]["consistency"] == 0.0
    assert rows["supervised_all"] == {**rows["supervised_only"], "num_labeled": 4, "labeled_bs": 4}   # 6 - 2
    trained.clear()
    assert cli(train.main, [*args, "--ablation", "cers,random_retrieval", "--seeds", "2"]) == 0
    assert sorted(trained) == [f"ablation/{n}/seed{s}" for n in ("cers", "random_retrieval")
                               for s in (1337, 1338)]
    summary = json.loads((out / "ablation" / "cers" / "seed1338" / "test" / "summary.json").read_text())
    assert summary["dice"] == {"mean": 0.5} and summary["run_seconds"] >= 0
    table = (out / "ablation" / "table.md").read_text()
    assert "| cers | 2 | 50.00 ± 0.00" in table and "cers − random_retrieval" in table
    assert table in capsys.readouterr().out + "\n"
    assert cli(train.main, ["--exp", "PHANTOM_8", "--ablation", "cers,paper"]) == 2
    assert "unknown ['paper']" in capsys.readouterr().err
