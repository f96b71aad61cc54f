"""Faults: a full disk (a file-size limit in a child) while saving a checkpoint or writing the phantom, a
folder that cannot be written, a generation killed half way, Ctrl-C, SIGTERM and SIGHUP, memory running out
(a data-size limit), a torchrun process dying. Each ends in one line naming the file or the cause, an exit
status that says what happened, no temp file, the old files intact."""
import shutil
import signal

import pytest

import phantom
import test as T
import train
from checkpoint import read_checkpoint
from config import cli
from conftest import ROOT, finish, spawn, wait_for, write_la
from test_bad_input import snapshot
from test_train import tiny_cfg, tiny_overrides

# python -c WRITE ROOT SEED writes a phantom of 3 cases, 24 x 24 x 16, anew, as a command would
WRITE = ("import sys, phantom\nfrom config import cli\n{before}sys.exit(cli(lambda argv: "
         "phantom.ensure_phantom(sys.argv[1], 2, 1, (24, 24, 16), int(sys.argv[2]), rewrite=True)))\n")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A tiny LA-layout set and a CERS run on it stopped at iteration 2 of 4: (data root, run folder)."""
    base = tmp_path_factory.mktemp("faults")
    root = write_la(base / "LA")
    train.train(tiny_cfg(root, base / "run"), progress=False, stop_at=2)
    return root, base / "run"


def train_args(root, out, *extra, **overrides):
    return [ROOT / "train.py", "--exp", "PHANTOM_8", *tiny_overrides(root, out, **overrides), *extra]


def temps(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".lock")))


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_one(stopped, tmp_path):
    root, run = stopped
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = (out / "ckpt_last.pt").read_bytes()
    child = spawn(train_args(root, out, "--resume"), tmp_path, file_limit=1_000_000)   # a checkpoint: 10 MB
    status, line = finish(child, tmp_path)
    assert status == 2
    assert line.startswith(f"error: {out / 'ckpt_last.pt'}: cannot write it: file too large"), line
    assert (out / "ckpt_last.pt").read_bytes() == before
    assert read_checkpoint(out / "ckpt_last.pt")["iter"] == 2
    assert temps(out) == []


def test_a_full_disk_while_writing_the_phantom_keeps_the_old_one(tmp_path):
    root = phantom.ensure_phantom(tmp_path / "data" / "ph", n_train=2, n_test=1, shape=(24, 24, 16), seed=0)
    before = snapshot(root)
    child = spawn(["-c", WRITE.format(before=""), root, 1], tmp_path, file_limit=20_000)
    status, line = finish(child, tmp_path)                              # a case file: about 40 kB
    assert status == 2 and line.startswith("error: ") and line.count("\n") == 0
    assert "mri_norm2.h5: cannot write it: file too large" in line, line
    assert snapshot(root) == before and sorted(p.name for p in root.parent.iterdir()) == ["ph"]


@pytest.mark.parametrize("which", ["out_dir", "cache_dir"])
def test_a_folder_under_a_file_is_refused_before_the_data(tmp_path, capsys, which):
    (tmp_path / "notes").write_text("a file")
    data = tmp_path / "data"
    folders = {"out_dir": tmp_path / "run", "cache_dir": tmp_path / "cache", which: tmp_path / "notes" / "x"}
    argv = ["--exp", "PHANTOM_8", "--phantom_shape=24,24,16", "--phantom_cases=2,1", f"--data_root={data}",
            "--downsample=2", *[f"--{k}={v}" for k, v in folders.items()]]
    assert cli(train.main, argv) == 2
    err = capsys.readouterr().err
    assert f"error: {folders[which]}: cannot write it: {tmp_path / 'notes'} is a file, not a folder" in err
    assert not data.exists() and not (tmp_path / "run").exists()   # the phantom was neither written nor read


def test_test_py_refuses_an_output_folder_under_a_file_before_the_data(stopped, tmp_path, capsys,
                                                                        monkeypatch):
    _, run = stopped
    (tmp_path / "notes").write_text("a file")
    monkeypatch.setattr(T.data, "load_split", lambda *a: pytest.fail("the data were read"))
    assert cli(T.main, ["--ckpt", str(run / "ckpt_last.pt"), "--out", str(tmp_path / "notes" / "test")]) == 2
    assert f"{tmp_path / 'notes'} is a file, not a folder" in capsys.readouterr().err


HANG_ON_SECOND_CASE = WRITE.format(before="""import time
make = phantom.make_case
def hang(rng, shape, calls=[]):
    calls.append(1)
    if len(calls) == 2:                                # the first case file is written
        print("one case written", flush=True)
        time.sleep(600)
    return make(rng, shape)
phantom.make_case = hang
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_phantom_generation_stopped_half_way_leaves_nothing(tmp_path, sig):
    """SIGTERM: the generation stops with one line and removes its temp folder; kill -9: the temp folder stays
    until the next generation, which removes it."""
    root = tmp_path / "data" / "ph"
    child = spawn(["-c", HANG_ON_SECOND_CASE, root, 0], tmp_path)
    wait_for(child, tmp_path, lambda: "one case written" in (tmp_path / "stdout.txt").read_text())
    partial = list(root.parent.glob(f".ph.{child.pid}.*.tmp"))
    assert len(partial) == 1 and len(list(partial[0].rglob("mri_norm2.h5"))) == 1
    child.send_signal(sig)
    if sig == signal.SIGTERM:
        assert finish(child, tmp_path) == (143, "stopped by SIGTERM")
        assert not root.parent.exists()                                 # made for the phantom, left empty
        return
    child.wait(60)
    assert temps(root.parent) == sorted([".ph.lock", partial[0].name])  # what kill -9 leaves
    phantom.ensure_phantom(root, n_train=2, n_test=1, shape=(24, 24, 16))
    assert sorted(p.name for p in root.parent.iterdir()) == ["ph"]
    assert len((root / "train.list").read_text().split()) == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_sigterm_and_sighup_stop_training_saying_where_the_checkpoint_is(stopped, tmp_path, sig):
    root, _ = stopped
    out = tmp_path / "run"
    child = spawn(train_args(root, out, "--no-test", max_iters=10000), tmp_path)
    wait_for(child, tmp_path, lambda: (out / "ckpt_last.pt").exists())
    child.send_signal(sig)
    status, line = finish(child, tmp_path, timeout=60)
    assert status == 128 + sig
    saved = read_checkpoint(out / "ckpt_last.pt")["iter"]
    assert line == (f"stopped by {sig.name}: the last checkpoint is {out / 'ckpt_last.pt'} (iteration "
                    f"{saved}); continue with --resume")
    assert saved >= 2 and temps(out) == []


def test_running_out_of_memory_is_one_line_naming_the_sizes(tiny_la, tmp_path):
    """Patches far too large for 0.75 GB of data (the tiny run needs under 0.5): one line naming the sizes."""
    out = tmp_path / "run"
    child = spawn(train_args(tiny_la, out, "--no-test", references="false", patch_size="128,128,128",
                             max_iters=2), tmp_path, memory_limit=int(0.75 * 2 ** 30))
    status, line = finish(child, tmp_path)
    assert status == 2 and line.startswith("error: out of memory"), line
    assert all(w in line for w in ("patch_size=128,128,128", "batch_size=4", "--patch_size", "--batch_size"))
    assert temps(out) == []


DIES_AT_3 = """
import os, signal, sys
import train
from config import cli
step = train.train_step
def dies(run, it, *batch):
    if it == 3 and run.world.rank == 1:                # after the checkpoint of iteration 2
        os.kill(os.getpid(), signal.SIGKILL)
    return step(run, it, *batch)
train.train_step = dies
sys.exit(cli(train.main))
"""


def test_a_dead_torchrun_process_stops_the_others_in_one_line(tiny_la, tmp_path):
    """Two CPU processes (gloo); rank 1 is killed at iteration 4: rank 0 ends with one line naming rank 1, the
    intact checkpoint and --resume, and no traceback (torchrun's own report aside)."""
    (tmp_path / "dies.py").write_text(DIES_AT_3)
    out, logs = tmp_path / "run", tmp_path / "logs"
    child = spawn(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"--log-dir={logs}",
                   "--redirects=3", tmp_path / "dies.py", "--exp", "PHANTOM_8", "--no-test",
                   *tiny_overrides(tiny_la, out, references="false", max_iters=6)], tmp_path)
    assert child.wait(120) != 0
    err = next(logs.rglob("attempt_0/0/stderr.log")).read_text()
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert "Traceback" not in err and last.startswith("error: rank 1 of 2 stopped"), err[-2000:]
    assert f"the last checkpoint, {out / 'ckpt_last.pt'}, is intact" in last and "--resume" in last
    assert read_checkpoint(out / "ckpt_last.pt")["iter"] in (2, 4)
