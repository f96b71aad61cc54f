"""How fast one training step is: full CERS against the plain dual-decoder mean teacher.

    python bench.py --exp PHANTOM_8              # CPU-sized
    python bench.py --exp LA_8                   # real LA patches when data/LA is there, else synthetic ones
    python bench.py --exp LA_8 --steps 50 --compile=true   # bench options, then any config key
    python bench.py --retrieval                  # reference selection alone, on synthetic banks of 10^2..10^5

In one process, at the experiment's settings, it times train.train_step (the very step train.py runs)
for (a) CERS, references and MCAM on and past the warm-up, and (b) the plain step, the same network
without references. Every step is timed between two device synchronisations, after warm-up steps.
It prints the median ms per step, iterations per second, peak memory, the ratio (a)/(b), the share of
the CERS step spent in reference selection, the bank refresh (amortised over bank_refresh steps), the
sliding-window inference time per volume and the projected time of cfg.max_iters iterations.
The figures are also written to <out_dir>/bench.json.
"""
import argparse
import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import data
import files
import phantom
import retrieve
import test
import train
from bank import ReferenceBank
from config import EXPERIMENTS, Config, ConfigError, cli, fast_paths, get_config, precision, resolve_device


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat, warmup=0):
    """Median wall and process-CPU seconds of fn() over `repeat` calls after `warmup` untimed ones, each call
    between two device synchronisations so that queued device work is counted. The CPU time is the one to
    trust when other load on the machine inflates wall time (torch's CPU threads suffer most from it)."""
    wall, cpu = [], []
    for _ in range(warmup + repeat):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0), cpu.append(time.process_time() - c0)
    return float(np.median(wall[warmup:])), float(np.median(cpu[warmup:]))


def peak_memory(device):
    """Peak device memory (GiB) since the last reset on CUDA; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # Linux reports KiB


def bench_data(cfg, n_unlabeled):
    """The labeled cases, `n_unlabeled` unlabeled ones and one test case, and where they come from.

    The experiment's data when it is there (the phantom is written when the config asks for it);
    otherwise synthetic phantom volumes of LA-like size in a temporary folder, and the source says so."""
    phantom.ensure_for(cfg)
    if (Path(cfg.data_root) / "train.list").exists():
        source = f"{'phantom' if cfg.phantom else 'real'} data at {cfg.data_root}"
    else:
        shape = tuple(p + m for p, m in zip(cfg.patch_size, (80, 32, 8)))     # about an LA volume's size
        cfg.data_root = phantom.write_phantom(Path(tempfile.mkdtemp()) / "synthetic",
                                              cfg.num_labeled + n_unlabeled, 1, shape, seed=0)
        source = f"SYNTHETIC phantom volumes {shape} (no data at the experiment's data_root)"
    split = data.load_split(cfg.data_root, cfg.num_labeled, cfg.val_cases)
    split.unlabeled, split.test = split.unlabeled[:n_unlabeled], split.test[:1]
    volumes = data.load_volumes(cfg.data_root, split.labeled + split.unlabeled + split.test, progress=False,
                                 factor=cfg.downsample)
    return split, volumes, source


def bench_variant(cfg, split, volumes, device, steps, warmup):
    """Median seconds per train_step, peak memory, and for CERS the retrieval, refresh and inference times."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = train.setup(cfg, split, volumes, device, progress=False)
    run.student.train()
    run.teacher.eval()
    result = {}
    it = cfg.ref_warmup + 1 if cfg.references else 0            # past the warm-up: every step uses references
    if run.bank is not None:
        encode = lambda x: run.teacher.encoder(x.contiguous(memory_format=run.memory_format))[-1]
        refresh = lambda: run.bank.refresh(encode, cfg.bank_momentum)
        with torch.no_grad(), run.autocast():
            result["refresh_s"], _ = timed(refresh, device, 3)

    def step():
        nonlocal it
        image, label, ids = run.sampler.next()
        train.train_step(run, it, image, label, ids)
        it += 1
    result["step_s"], _ = timed(step, device, steps, warmup)
    result["peak_memory_gib"] = peak_memory(device)

    if run.bank is not None:                                          # reference selection alone, on a batch
        image, _, ids = run.sampler.next()
        with torch.no_grad(), run.autocast():
            feats = run.teacher.encoder(image.contiguous(memory_format=run.memory_format))
            logits_b = run.teacher.decoder_b(feats)
            query = lambda: retrieve.query_references(run.bank, logits_b, ids, cfg, run.ref_gen)
            result["retrieval_s"], _ = timed(query, device, steps)
        result["ref_delta"] = train.reference_delta(run, image, ids, it)
        run.student.eval()
        case_id = split.test[0]
        image = volumes[case_id][0]
        model = run.student
        predict = test.predictor(model, cfg, case_id, run.bank, run.bf16, channels_last=run.channels_last)
        infer = lambda: test.sliding_window(predict, image, cfg.patch_size, cfg.stride_xy, cfg.stride_z,
                                            cfg.window_batch, device)
        result["inference_s"], _ = timed(infer, device, 3)
        result["volume"] = list(image.shape)
    return result


# ----------------------------------------------------------------------------- reference selection alone

def synthetic_bank(n, patches_per_case=8, morph_dim=13, seed=0, device="cpu"):
    """A bank of n entries without images: cases are clusters in morphology space, each with its own text
    of 4 fields x 12 words from a 2000-word vocabulary (Zipf-like use), shared by the case's patches."""
    rng = np.random.default_rng(seed)
    vocab = ["".join(rng.choice(list("bcdfghklmnprstv"), 3))
             + rng.choice(["al", "ic", "ous", "ing", "ed", "ar"]) for _ in range(2000)]
    cdf = np.cumsum(1 / np.arange(1, len(vocab) + 1))

    def text():
        words = [vocab[j] for j in np.searchsorted(cdf, rng.uniform(0, cdf[-1], 48))]
        return " ".join(f"{f}: {' '.join(words[12 * i:12 * i + 12])}."
                        for i, f in enumerate(("Texture", "Boundary", "Context", "Summary")))
    n_cases = -(-n // patches_per_case)
    centres, texts = rng.normal(size=(n_cases, morph_dim)), [text() for _ in range(n_cases)]
    case = np.arange(n) // patches_per_case
    morph = centres[case] + 0.3 * rng.normal(size=(n, morph_dim))
    bank = ReferenceBank([f"case{c}" for c in case], np.zeros((n, 6)), morph, [texts[c] for c in case],
                         device=device)
    return bank, text


def retrieval_benchmark(sizes=(100, 10_000, 100_000), batch=4, runs=200, warmup=20, seed=0):
    """Median wall time of one selection for `batch` queries (half labeled, half not) per bank size: select()
    (numpy, on the host) and select_device() with its query_rows() lookup (on CUDA when available, else on
    the CPU), with the process's CPU time beside each (see timed).
    Returns {size: {"select": seconds, "select_device": seconds}}."""
    cfg = Config(k_coarse=16, k_fine=4, seed=seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {}
    for n in sizes:
        bank, text = synthetic_bank(n, seed=seed, device=device)
        rng = np.random.default_rng(seed + 1)
        morph = bank.morph[rng.integers(0, n, batch)] + 0.1 * rng.normal(size=(batch, bank.morph.shape[1]))
        ids = [bank.case_ids[int(rng.integers(0, n))] if i % 2 == 0 else f"unlabeled{i}"
               for i in range(batch)]
        case_texts = {c: text() for c in ids}
        texts = [case_texts[c] for c in ids]
        bank.index_queries(case_texts)
        own = [c if c in bank.code_of else None for c in ids]
        numpy_s, cpu_s = timed(lambda: retrieve.select(bank, morph, texts, own, cfg), device, runs, warmup)
        morph_dev = torch.as_tensor(morph, dtype=torch.float32, device=device)  # (B, M)
        on_device = lambda: retrieve.select_device(bank, morph_dev, bank.query_rows(ids), cfg)
        device_s, device_cpu_s = timed(on_device, device, runs, warmup)
        result[n] = {"select": numpy_s, "select_device": device_s}
        print(f"bank {n:>7} entries ({len(bank.cot.texts)} distinct texts), {batch} queries: select "
              f"{1e3 * numpy_s:.2f} ms wall ({1e3 * cpu_s:.2f} ms CPU), select_device on {device.type} "
              f"{1e3 * device_s:.2f} ms wall ({1e3 * device_cpu_s:.2f} ms CPU) (medians of {runs})")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="LA_8", help=f"experiment: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per variant (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first (cuDNN autotuning, compilation)")
    parser.add_argument("--unlabeled", type=int, default=8,
                        help="unlabeled cases to load (they do not change the step)")
    parser.add_argument("--retrieval", action="store_true",
                        help="time reference selection on synthetic banks and exit")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.unlabeled < 0:
        raise ConfigError(f"bench: need --steps >= 1, --warmup >= 0 and --unlabeled >= 0, got {args.steps}, "
                          f"{args.warmup} and {args.unlabeled}")
    if args.retrieval:
        return retrieval_benchmark()
    cfg = get_config(args.exp, overrides)
    device = resolve_device(cfg)
    split, volumes, source = bench_data(cfg, args.unlabeled)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench {cfg.exp} on {device} ({name}), {source}: {len(split.labeled)} labeled + "
          f"{len(split.unlabeled)} unlabeled cases, patch {cfg.patch_size}, batch {cfg.labeled_bs} + "
          f"{cfg.batch_size - cfg.labeled_bs}, "
          f"{args.warmup} warm-up + {args.steps} timed steps per variant")

    variant = lambda refs: bench_variant(dataclasses.replace(cfg, references=refs), split, volumes, device,
                                         args.steps, args.warmup)
    plain, cers = variant(False), variant(True)
    bf16, channels_last = fast_paths(cfg, device)
    memory = "peak GPU memory" if device.type == "cuda" else "process peak RSS so far"
    per_iter = cers["step_s"] + cers["refresh_s"] / cfg.bank_refresh   # the refresh, amortised
    lines = [f"precision: {precision(bf16, channels_last)}"
             f"{', torch.compile' if cfg.compile else ''}",
             f"{'step':28s} {'ms':>8s} {'it/s':>7s} {memory:>24s}",
             f"{'(b) plain dual-decoder MT':28s} {1e3 * plain['step_s']:8.1f} {1 / plain['step_s']:7.2f} "
             f"{plain['peak_memory_gib']:21.2f} GiB",
             f"{'(a) CERS':28s} {1e3 * cers['step_s']:8.1f} {1 / cers['step_s']:7.2f} "
             f"{cers['peak_memory_gib']:21.2f} GiB",
             f"(a)/(b): {cers['step_s'] / plain['step_s']:.2f}",
             f"reference selection: {1e3 * cers['retrieval_s']:.1f} ms per batch, "
             f"{100 * cers['retrieval_s'] / cers['step_s']:.1f} % of the CERS step",
             f"bank refresh ({len(split.labeled)} labeled volumes): {1e3 * cers['refresh_s']:.0f} ms, every "
             f"{cfg.bank_refresh} steps = {1e3 * cers['refresh_s'] / cfg.bank_refresh:.1f} ms per step",
             f"decoder A's reference sensitivity after {args.warmup + args.steps} steps from scratch: mean "
             f"|change| of its foreground probability, retrieved vs random references, "
             f"{cers['ref_delta']:.2e}",
             f"sliding-window inference (CERS, volume {tuple(cers['volume'])}, stride "
             f"{cfg.stride_xy}/{cfg.stride_z}, {cfg.window_batch} windows per batch): "
             f"{cers['inference_s']:.2f} s per volume",
             f"projected {cfg.max_iters} iterations: CERS {per_iter * cfg.max_iters / 60:.1f} min, "
             f"plain {plain['step_s'] * cfg.max_iters / 60:.1f} min (steps only: no data loading, pool, "
             "tests)"]
    print("\n".join(lines))
    out = files.make_folder(cfg.out_dir)
    files.write_text(out / "bench.json", json.dumps(
        {"device": str(device), "source": source, "steps": args.steps, "warmup": args.warmup, "bf16": bf16,
         "channels_last": channels_last,
         "compile": cfg.compile, "plain": plain, "cers": cers, "ratio": cers["step_s"] / plain["step_s"],
         "projected_s": per_iter * cfg.max_iters}, indent=1))
    return {"plain": plain, "cers": cers}


if __name__ == "__main__":
    sys.exit(cli(main))
