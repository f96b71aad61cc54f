"""How fast CERS is: its training step against the plain mean teacher's, reference selection, inference.

    python bench.py --exp PHANTOM_8              # CPU-sized
    python bench.py --exp LA_8                   # LA patches (synthetic LA-sized volumes without data/LA)
    python bench.py --exp LA_8 --steps 50 --compile=true   # bench options, then any config key

Timed on the same batches at the experiment's settings, train.Run and train.train_step (train.py's step):
(a) CERS, references and MCAM on, (b) the plain step, --references=false. A figure is the median of N calls
between device syncs after warm-up, no timed step refreshing the bank (unless bank_refresh is 1); peak memory
is the GPU's on CUDA, the process's on the CPU."""
import argparse
import dataclasses
import itertools
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import data
import phantom
import retrieve
import test
import train
from config import EXPERIMENTS, ConfigError, cli, fast_paths, get_config, precision, resolve_device


def timed(fn, device, repeat, warmup=0):
    """Median seconds of fn() over `repeat` calls after `warmup`, each between device syncs (queued work)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    seconds = []
    for _ in range(warmup + repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds[warmup:]))


def bench_variant(cfg, split, volumes, batches, device, steps, warmup):
    """Median seconds per train_step over the batches (after an untimed iteration 0, at iterations that do not
    refresh the bank), peak memory, and with references the selection per batch and inference per window."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = train.Run(cfg, split, volumes, device, progress=False)
    train.train_step(run, 0, *batches[0])                          # untimed: iteration 0 fills the bank
    its = (i for i in itertools.count(1) if cfg.bank_refresh == 1 or i % cfg.bank_refresh)   # no refresh
    todo = iter(batches)
    result = {"step_s": timed(lambda: train.train_step(run, next(its), *next(todo)), device, steps, warmup)}
    result["peak_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)     # Linux reports KiB
    if run.bank is None:
        return result
    image, _, ids = batches[0]
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad(), run.autocast():
        logits_b = run.teacher.decoder_b(run.teacher.encoder(image))                  # (B, 2, X, Y, Z)
        result["retrieval_s"] = timed(lambda: retrieve.query_references(run.bank, logits_b, ids, cfg,
                                                                        generator), device, steps, 1)
    windows = image[:1].expand(cfg.window_batch, *image.shape[1:]).contiguous()  # (window_batch, 1, *patch)
    predict = test.predictor(run.student.eval(), cfg, ids[0], run.bank, generator, bf16=run.bf16,
                             channels_last=run.channels_last)
    result["window_s"] = timed(lambda: predict(windows), device, steps, 1) / cfg.window_batch
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="PHANTOM_8", help=f"experiment: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed calls per figure (the median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN, compile)")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"bench: need --steps >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    cfg = get_config(args.exp, overrides)
    source = f"data at {cfg.data_root}"
    if not cfg.phantom and not (Path(cfg.data_root) / "train.list").exists():   # synthetic LA-sized volumes
        shape = tuple(p + m for p, m in zip(cfg.patch_size, (80, 32, 8)))
        cfg = dataclasses.replace(cfg, phantom=True, data_root=f"{tempfile.mkdtemp()}/synthetic",
                                  phantom_shape=shape, phantom_cases=(cfg.num_labeled + 8, 1), val_cases=0)
        source = f"SYNTHETIC phantom volumes {shape} (no data at the experiment's data_root)"
    phantom.ensure_for(cfg)
    split, volumes = data.prepare_data(dataclasses.replace(cfg, references=True))     # the test cases too
    device = resolve_device(cfg)
    sampler = data.BatchSampler(volumes, split.labeled, split.unlabeled, cfg.labeled_bs, cfg.batch_size,
                                cfg.patch_size, device, cfg.seed)
    batches = [sampler.next() for _ in range(args.warmup + args.steps)]     # the same batches for both steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench {cfg.exp} on {device} ({name}), {source}, precision {precision(*fast_paths(cfg, device))}: "
          f"patch {cfg.patch_size}, batch {cfg.labeled_bs} + {cfg.batch_size - cfg.labeled_bs}, "
          f"{args.warmup} warm-up + {args.steps} timed steps")
    plain, cers = (bench_variant(dataclasses.replace(cfg, references=refs), split, volumes, batches, device,
                                 args.steps, args.warmup) for refs in (False, True))
    memory = "GiB peak GPU memory" if device.type == "cuda" else "GiB peak process memory (so far)"
    print(f"(b) plain step {1e3 * plain['step_s']:8.1f} ms, {plain['peak_gib']:.2f} {memory}\n"
          f"(a) CERS step  {1e3 * cers['step_s']:8.1f} ms, {cers['peak_gib']:.2f} {memory}\n"
          f"(a)/(b) {cers['step_s'] / plain['step_s']:.2f}\nreference selection (query_references) "
          f"{1e3 * cers['retrieval_s']:.1f} ms per batch of {cfg.batch_size}\ninference (CERS, "
          f"{cfg.window_batch} windows a forward) {1e3 * cers['window_s']:.1f} ms per window")
    return {"plain": plain, "cers": cers}


if __name__ == "__main__":
    sys.exit(cli(main))
