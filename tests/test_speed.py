"""The fast path gives the plain path's losses; several processes (torchrun, gloo on CPU) train one model;
bench.py times the CERS step against the plain one."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import bench
import data
import train
from config import World, cli
from conftest import ROOT
from test_train import TINY, tiny_cfg, tiny_overrides
from train import check_consistent


def first_step_losses(cfg, split, volumes, batch, bf16, channels_last):
    """The losses of the first training step (references on) on a fixed batch, from fresh, seeded weights."""
    run = train.Run(cfg, split, volumes, torch.device("cpu"), fast=False, progress=False)
    run.bf16, run.channels_last = bf16, channels_last
    run.student.to(memory_format=run.memory_format)
    run.teacher.to(memory_format=run.memory_format)
    return {k: float(v) for k, v in train.train_step(run, 0, *batch).items()}


def bf16_autocast_works_on_this_cpu():
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.conv3d(torch.ones(1, 1, 4, 4, 4), torch.ones(2, 1, 3, 3, 3)).dtype == torch.bfloat16
    except RuntimeError:
        return False


def test_fast_path_gives_the_plain_losses(tiny_la, tmp_path):
    cfg = tiny_cfg(tiny_la, tmp_path / "run", consistency=1.0, rampup_iters=0, patch_size="16,16,16")
    split, volumes = data.prepare_data(cfg)
    batch = train.Run(cfg, split, volumes, torch.device("cpu"), progress=False).sampler.next()  # for all
    plain = first_step_losses(cfg, split, volumes, batch, bf16=False, channels_last=False)
    assert plain["cons"] > 0 and plain["sup"] > 0                   # both parts of the loss are in play
    assert first_step_losses(cfg, split, volumes, batch, False, False) == plain   # what follows is not noise
    cl = first_step_losses(cfg, split, volumes, batch, bf16=False, channels_last=True)
    assert cl == pytest.approx(plain, rel=1e-4)                     # fp32: the same sums, reordered
    if not bf16_autocast_works_on_this_cpu():
        pytest.skip("this CPU build has no bf16 autocast for conv3d; channels-last was checked")
    fast = first_step_losses(cfg, split, volumes, batch, bf16=True, channels_last=True)
    assert fast == pytest.approx(plain, rel=3e-2) and fast != plain  # bf16 (8 significant bits) really ran


def consistency_worker(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for agree in (True, False):
        tensor = torch.arange(6.0) + (0 if agree else rank * 1e-6)
        try:
            check_consistent(World(rank, 2), {"teacher.w": tensor, "bank.features": torch.ones(3)})
            results[rank, agree] = "ok"
        except RuntimeError as e:
            results[rank, agree] = str(e)
    dist.destroy_process_group()


def test_check_consistent_compares_the_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(consistency_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    assert results[0, True] == results[1, True] == "ok"
    assert all("disagree on 1 tensors" in results[r, False] and "teacher.w" in results[r, False]
               for r in (0, 1))


def test_torchrun_two_processes_train_one_model(tiny_la, tmp_path):
    """2 CPU processes over gloo: rank 0 alone writes and tests; the checkpoint holds both ranks' sampler
    states; train.py checks at every checkpoint that the teacher and the bank agree on both ranks."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--exp", "PHANTOM_8", *tiny_overrides(tiny_la, out)]
    done = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("trained 4 iterations") == 1            # rank 0 alone reports
    assert done.stdout.count("mean ± std") == 1                        # and tests the last checkpoint
    ckpt = torch.load(out / "ckpt_last.pt", weights_only=False)
    assert ckpt["iter"] == 4 and ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    assert not torch.equal(*(r["sampler"]["gen"] for r in ckpt["ranks"]))   # each rank draws its own batches
    assert ckpt["bank"]["features"] is not None
    assert (out / "log.csv").read_text().count("\n") == 1 + TINY["max_iters"]   # one header, one row per step


def test_bench_times_both_steps_on_the_same_batches(tiny_la, tmp_path, capsys):
    args = tiny_overrides(tiny_la, tmp_path / "run", patch_size="16,16,16")
    result = bench.main(["--exp", "PHANTOM_8", *args, "--steps=1", "--warmup=0"])
    out = capsys.readouterr().out
    assert all(words in out for words in ("(a)/(b)", "ms per batch", "ms per window", "peak process memory"))
    assert result["plain"]["step_s"] > 0 and result["cers"]["step_s"] > 0 and result["cers"]["window_s"] > 0
    assert "retrieval_s" not in result["plain"] and result["cers"]["retrieval_s"] > 0
    assert cli(bench.main, ["--steps=0"]) == 2 and "--steps" in capsys.readouterr().err
