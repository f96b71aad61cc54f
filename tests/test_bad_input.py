"""The bad-input corpus (issue: every refusal clear and early, nothing overwritten, resume that checks what it
resumes). Each case runs an entry point as a user would (config.cli around its main) on a tiny LA-layout set
next to a finished run, and checks the exit status, that the one-line message names the problem, and that
the finished run's folder is byte for byte what it was."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import pool
import test as T
import train
from config import cli
from conftest import ROOT, write_la
from test_checkpoint import Marker, write
from test_train import tiny_overrides


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny LA-layout set and a finished CERS run on it (4 iterations): (data root, run folder)."""
    base = tmp_path_factory.mktemp("bad")
    root = write_la(base / "LA")
    out = base / "run"
    assert cli(train.main, ["--exp", "PHANTOM_8", *tiny_overrides(root, out)]) == 0
    return root, out


def snapshot(folder):
    """{relative path: sha256} of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, main, argv, *words, keep=None):
    """Run main(argv) as the command line does: exit status 2, and the message on stderr is one line (after
    any progress bars) naming every word, with no traceback; the folder `keep` byte for byte as it was."""
    before = snapshot(keep) if keep else None
    capsys.readouterr()
    assert cli(main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    message = err[err.index("error: "):].split("\r")[0]
    assert message.rstrip("\n").count("\n") == 0, message
    for word in words:
        assert word in message, (word, message)
    assert keep is None or snapshot(keep) == before
    return message


def run_args(root, out, *extra, **overrides):
    return ["--exp", "PHANTOM_8", *tiny_overrides(root, out, **overrides), *extra]


@pytest.mark.parametrize("key,value", [
    ("max_iters", "0"), ("max_iters", "-5"), ("log_every", "0"), ("sharpen_t", "0"), ("patch_size", "0,0,0"),
    ("window_batch", "0"), ("dropout", "1.5"), ("device", "gpu"), ("lr", "nan"), ("lr", "inf"),
    ("k_fine", "0"), ("max_refs_per_case", "0"), ("downsample", "0"), ("tau", "1.5")])
def test_config_values_are_checked_before_anything_is_written(finished, capsys, key, value):
    root, out = finished
    refused(capsys, train.main, run_args(root, out, **{key: value}), f"{key}={value}", keep=out)


def test_abbreviations_and_unknown_flags_are_refused(finished, capsys):
    root, out = finished
    refused(capsys, train.main, run_args(root, out, "--resum"), "--resum", "never abbreviated", keep=out)


def test_a_finished_run_is_not_replaced_by_another_config(finished, capsys, tmp_path):
    root, out = finished
    refused(capsys, train.main, run_args(root, out, lr="0.5"), "lr=", "--force", keep=out)
    copy = tmp_path / "copy"                        # with --force it is replaced (on a copy of the run)
    shutil.copytree(out, copy)
    assert cli(train.main, run_args(root, copy, "--force", "--no-test", lr="0.5")) == 0
    assert '"lr": 0.5' in (copy / "config.json").read_text()


@pytest.mark.parametrize("key,value", [("patch_size", "48,32,16"), ("base_filters", "8"),
                                       ("references", "false"), ("max_iters", "4")])
def test_resume_compares_the_config_key_by_key_and_needs_iterations_left(finished, capsys, key, value):
    root, out = finished
    words = ("nothing to train",) if key == "max_iters" else (key, "--resume")
    argv = run_args(root, out, "--resume", **{"max_iters": "6", key: value})
    refused(capsys, train.main, argv, *words, keep=out)


@pytest.mark.parametrize("damage,word", [("truncate", "truncated"), ("code", "refused")])
def test_a_damaged_checkpoint_is_refused_by_every_entry_point(finished, capsys, tmp_path, damage, word):
    """test.py --ckpt, train.py --resume and a new run into its folder (the run-folder check) each refuse a
    truncated checkpoint or one that would run code in one line; the code it carries never runs."""
    root, out = finished
    copy, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(out, copy)
    ckpt = copy / "ckpt_last.pt"
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[:5000])
    else:
        write(ckpt, {**torch.load(out / "ckpt_last.pt", weights_only=True), "student": Marker(marker)})
    for main, argv in [(T.main, ["--ckpt", str(ckpt)]), (train.main, run_args(root, copy)),
                       (train.main, run_args(root, copy, "--resume", max_iters="6"))]:
        refused(capsys, main, argv, "ckpt_last.pt", word, keep=copy)
    assert not marker.exists()


def test_a_hangup_stops_like_sigterm(capsys):
    """SIGHUP (the terminal closed) ends an entry point in one line with 128 + its number."""
    assert cli(lambda argv: (os.kill(os.getpid(), signal.SIGHUP), signal.pause())) == 128 + signal.SIGHUP
    assert capsys.readouterr().err == "stopped by SIGHUP\n"


@pytest.mark.parametrize("damage", ["leak", "broken_test_file", "bad_label"])
def test_bad_data_is_refused_before_training(finished, capsys, tmp_path, damage):
    root, out = finished
    data_copy = tmp_path / "LA"
    shutil.copytree(root, data_copy)
    test_ids = (data_copy / "test.list").read_text().split()
    if damage == "leak":                            # a test ID also in train.list
        with open(data_copy / "train.list", "a") as f:
            f.write(test_ids[0] + "\n")
        words = (test_ids[0], "also in train.list")
    elif damage == "broken_test_file":              # found now, not after training
        (data_copy / "2018LA_Seg_Training Set" / test_ids[1] / "mri_norm2.h5").write_bytes(b"not hdf5")
        words = (test_ids[1], "unreadable h5")
    else:
        with h5py.File(data_copy / "2018LA_Seg_Training Set" / test_ids[1] / "mri_norm2.h5", "r+") as f:
            f["label"][0, 0, 0] = 7
        words = (test_ids[1], "label values")
    # even --force writes nothing before the data is checked
    refused(capsys, train.main, run_args(data_copy, out, "--force"), *words, keep=out)


def test_every_case_labeled_needs_an_all_labeled_batch(finished, capsys, tmp_path):
    root, out = finished
    n = len((root / "train.list").read_text().split())
    refused(capsys, train.main, run_args(root, out, "--force", num_labeled=str(n)), f"num_labeled={n}",
            "labeled_bs", keep=out)
    assert cli(train.main, run_args(root, tmp_path / "run", "--no-test", num_labeled=str(n), labeled_bs="2",
                                    batch_size="2", max_iters="2", references="false", consistency="0")) == 0


def test_lists_with_a_byte_order_mark_and_crlf_are_read(finished, tmp_path):
    root, _ = finished
    data_copy = tmp_path / "LA"
    shutil.copytree(root, data_copy)
    for name in ("train.list", "test.list"):
        ids = (data_copy / name).read_text().split()
        (data_copy / name).write_bytes("\ufeff".encode() + "\r\n".join(ids).encode() + b"\r\n")
    assert cli(train.main, run_args(data_copy, tmp_path / "run", "--no-test", max_iters="2")) == 0


def test_a_loss_that_stops_being_finite_stops_the_run(finished, capsys, tmp_path):
    root, _ = finished
    err = refused(capsys, train.main, run_args(root, tmp_path / "run", "--no-test", lr="1e30", max_iters="8",
                                                 ckpt_every="1"),
                  "not finite", "good checkpoint")
    assert "iteration" in err


def test_a_changed_case_file_gets_new_cot_texts(tmp_path):
    root = write_la(tmp_path / "LA")
    args = ["--exp", "PHANTOM_8", f"--data_root={root}", "--phantom=false", "--num_labeled=2"]
    case = (root / "train.list").read_text().split()[0]
    assert cli(pool.main, args) == 0
    first = pool.CotCache(root / "cot_cache.jsonl")
    path = root / "2018LA_Seg_Training Set" / case / "mri_norm2.h5"
    with h5py.File(path, "r+") as f:
        f["image"][...] = np.flip(f["image"][()], 0) * 3.0
    assert cli(pool.main, args) == 0
    again = pool.CotCache(root / "cot_cache.jsonl")
    new = {k for k in again.records if k not in first.records}
    assert {k[0] for k in new} == {case} and {k[1] for k in new} == {"mask", "image"}


def test_the_user_sees_one_line_and_no_traceback(tmp_path):
    """The command line itself: a project error is one line on stderr and exit status 2."""
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--exp", "PHANTOM_8", "--dropout=1.5",
                           f"--out_dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "dropout=1.5" in done.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_an_error_under_a_progress_bar_starts_its_own_line(tmp_path):
    """A case file refused while the cases are read, with the progress bar open: the bar is closed first, so
    the error starts at column 0 of its own line and nothing of the bar follows it."""
    root = write_la(tmp_path / "LA")
    case = (root / "train.list").read_text().split()[3]
    with h5py.File(root / "2018LA_Seg_Training Set" / case / "mri_norm2.h5", "r+") as f:
        f["label"][0, 0, 0] = 7
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--exp", "PHANTOM_8",
                           f"--data_root={root}", "--phantom=false", "--num_labeled=2", "--device=cpu",
                           f"--out_dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, timeout=120)
    err = done.stderr.decode()           # bytes as written: a bar redraws its line after a carriage return
    *before, last, end = err.split("\n")
    assert done.returncode == 2 and "reading cases" in err and end == "", err
    assert last.startswith(f"error: {root}") and "\r" not in last and "label values" in last, err
