"""The dual-decoder mean-teacher training loop with CERS references (docs/design.md §9), and its ablations:
python train.py --exp PHANTOM_8 [--check] [--resume | --force] [--max_iters=2000 ...] [--ablation all], or
torchrun --nproc_per_node=2 train.py --exp LA_8 (a process per GPU, each its share of the global batch)."""
import argparse
import contextlib
import copy
import csv
import dataclasses
import functools
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import phantom
import pool
import test
from checkpoint import (CheckpointError, check_run_folder, read_checkpoint, rng_state, save_checkpoint,
                        seed_everything, set_rng_state)
from config import (EXPERIMENTS, CersError, ConfigError, Lock, Stop, World, WriteError, appending,
                    check_config, cli, fast_paths, get_config, init_world, main_first, main_process,
                    precision, save_figure, show, write_text)
from model import build_model, mse, sharpen, supervised_loss
from retrieve import ReferenceBank, decoder_a_probabilities, query_references

COLUMNS = ["iter", "lr", "loss", "sup", "sup_a", "cons", "cons_w", "ref_delta", "context_ratio", "seconds"]
PAPER = {"references": True, "retrieval": "both", "mcam_gates": True}   # CERS as the paper has it
SUPERVISED = {"references": False, "consistency": 0.0}
ABLATIONS = {                                          # each row: the experiment with these keys changed
    "cers": PAPER, "no_references": {"references": False},          # the plain dual-decoder mean teacher
    "supervised_only": SUPERVISED,                     # the labeled patches alone
    "supervised_all": SUPERVISED,                      # every training case labeled (run_ablation): the room
    "no_cot_filter": {**PAPER, "retrieval": "morph"},  # references by morphology alone
    "no_mcam": {**PAPER, "mcam_gates": False},         # context added without coordinate-attention gates
    "random_retrieval": {**PAPER, "retrieval": "random"}}   # references drawn at random


def lr_at(it, cfg):
    """Poly decay: lr * (1 - it / max_iters) ** 0.9."""
    return cfg.lr * (1.0 - it / cfg.max_iters) ** 0.9


def consistency_weight(it, cfg):
    """consistency * exp(-5 (1 - t)^2), t = it / rampup_iters up to 1: the sigmoid ramp-up (Laine & Aila)."""
    t = min(it / cfg.rampup_iters, 1.0) if cfg.rampup_iters else 1.0
    return cfg.consistency * math.exp(-5.0 * (1.0 - t) ** 2)


@torch.no_grad()
def ema_update(teacher, student, decay, it):
    """teacher = decay * teacher + (1 - decay) * student (fused) over parameters and float buffers (BN stats);
    early on the decay is 1 - 1/(it+1), so the teacher leaves the random init."""
    decay = min(1.0 - 1.0 / (it + 1), decay)
    pairs = list(zip(teacher.state_dict().values(), student.state_dict().values()))
    floats = [(t, s.detach()) for t, s in pairs if t.dtype.is_floating_point]
    torch._foreach_lerp_([t for t, _ in floats], [s for _, s in floats], 1.0 - decay)
    for t, s in pairs:
        if not t.dtype.is_floating_point:
            t.copy_(s)


class Run:
    """What a training step reads and updates, set up: student, teacher, optimiser, sampler, pool and bank;
    fast: bf16 autocast + channels-last (default: fast_paths)."""

    def __init__(self, cfg, split, volumes, device, world=World(), fast=None, progress=True):
        self.cfg, self.device, self.world, self.bank, self.cots = cfg, device, world, None, None
        self.bf16, self.channels_last = fast_paths(cfg, device) if fast is None else (fast, fast)
        seed_everything(cfg.seed)                      # the same initial weights on every rank
        layout = torch.channels_last_3d if self.channels_last else None
        self.student = student = build_model(cfg).to(device, memory_format=layout)
        self.teacher = teacher = copy.deepcopy(student).requires_grad_(False).eval()   # no dropout
        if cfg.compile:                                # in place: state_dict keys stay as they are
            for part in (m for n in (student, teacher) for m in (n.encoder, n.decoder_a, n.decoder_b)):
                part.compile()
        self.net = student if world.size == 1 else torch.nn.parallel.DistributedDataParallel(student)
        seed = cfg.seed + world.rank
        torch.manual_seed(seed)                        # each rank its own noise and dropout
        self.optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.labeled_bs = n_lab = cfg.labeled_bs // world.size   # each process its share of the batch
        self.sampler = data.BatchSampler(volumes, split.labeled, split.unlabeled, n_lab,
                                         cfg.batch_size // world.size, cfg.patch_size, device, seed)
        self.ref_gen = torch.Generator().manual_seed(seed)   # CPU draws of the random retrieval control
        if cfg.references:
            with main_first(world):
                self.cots = pool.build_pool(cfg, split, volumes, progress=progress and world.main)
            self.bank = ReferenceBank.build(cfg, volumes, split.labeled, self.cots.mask, device)
            self.bank.index_queries(self.cots.image)

    @property
    def memory_format(self):
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def train_step(run, it, image, label, ids):
    """One iteration on a batch, labeled patches first; returns the losses as device tensors (unread)."""
    cfg, teacher, bank, n_lab = run.cfg, run.teacher, run.bank, run.labeled_bs
    image = image.contiguous(memory_format=run.memory_format)            # (B, 1, X, Y, Z)
    # 1. every bank_refresh iterations the bank follows the teacher's encoder (the first fill replaces)
    if bank is not None and it % cfg.bank_refresh == 0:
        with torch.no_grad(), run.autocast():
            bank.refresh(lambda x: teacher.encoder(x.contiguous(memory_format=run.memory_format))[-1],
                         cfg.bank_momentum, replace=it == 0)
        if run.world.size > 1:
            dist.broadcast(bank.features, 0)                             # bit-identical banks on every rank
    # 2. teacher targets: noisy input, both decoders' mean, sharpened. With references the teacher sees every
    #    patch: its decoder-B prediction and image CoT query the bank; the student fuses the same references
    with torch.no_grad(), run.autocast():
        first = n_lab if bank is not None else 0                        # where the unlabeled patches start
        t_in, sigma = image[n_lab - first:], cfg.teacher_noise          # (B or Bu, 1, X, Y, Z)
        feats = teacher.encoder(t_in + (torch.randn_like(t_in) * sigma).clamp(-2 * sigma, 2 * sigma))
        t_b = teacher.decoder_b(feats)                                   # (B or Bu, 2, X, Y, Z)
        refs = None if bank is None else query_references(bank, t_b, ids, cfg, run.ref_gen)  # (B, K, ..)
        t_a = teacher.decode_a([f[first:] for f in feats], refs and refs.part(slice(first, None)))
        p_teacher = 0.5 * (t_a.float().softmax(1) + t_b[first:].float().softmax(1))[:, 1]   # (Bu, X, Y, Z)
        target = sharpen(p_teacher, cfg.sharpen_t)
    # 3. student: supervised loss on the labeled patches, mean-teacher + cross-decoder consistency on the rest
    with run.autocast():
        logits_a, logits_b = run.net(image, refs)                        # (B, 2, X, Y, Z) each
    sup_a = supervised_loss(logits_a[:n_lab], label)                     # decoder A's part, logged
    loss_sup = sup_a + supervised_loss(logits_b[:n_lab], label)
    p_a, p_b = (logits[n_lab:].float().softmax(1)[:, 1] for logits in (logits_a, logits_b))  # (Bu, X, Y, Z)
    loss_mt = mse(p_a, target) + mse(p_b, target)
    sharp_a, sharp_b = sharpen(p_a, cfg.sharpen_t).detach(), sharpen(p_b, cfg.sharpen_t).detach()
    loss_cross = mse(p_a, sharp_b) + mse(p_b, sharp_a)
    loss = loss_sup + consistency_weight(it, cfg) * (loss_mt + loss_cross)
    # 4. SGD step at the scheduled lr; the teacher follows, its BN statistics (not DDP's) averaged over ranks
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(it, cfg)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    ema_update(teacher, run.student, cfg.ema_decay, it)
    if run.world.size > 1:
        buffers = [b for b in teacher.buffers() if b.dtype.is_floating_point]
        flat = torch.nn.utils.parameters_to_vector(buffers)
        dist.all_reduce(flat)
        torch.nn.utils.vector_to_parameters(flat / run.world.size, buffers)
    return {key: value.detach() for key, value in
            {"loss": loss, "sup": loss_sup, "sup_a": sup_a, "cons": loss_mt + loss_cross}.items()}


@torch.no_grad()
def reference_delta(run, image, ids, it):
    """Decoder A's use of its references (student, eval mode, own generator): its mean |change| in probability
    with random bank entries for the retrieved ones, and the fused context's norm over the scan's."""
    student, cfg, bank = run.student.eval(), run.cfg, run.bank
    with run.autocast():
        feats = student.encoder(image.contiguous(memory_format=run.memory_format))
        logits_b, generator = student.decoder_b(feats), torch.Generator().manual_seed(cfg.seed + it)
        p = decoder_a_probabilities(student, feats, logits_b, ids, bank, cfg, generator,
                                    ("retrieved", "random"))
        ratio = student.context_ratio(feats, query_references(bank, logits_b, ids, cfg, generator))
    run.student.train()
    return float((p["retrieved"] - p["random"]).abs().mean()), float(ratio)


def start_log(path, resume_at=None):
    """A new log; or, resuming at `resume_at`, the log as it was then: later rows and one cut short by a kill
    are dropped atomically, so a resumed run logs what an uninterrupted one does."""
    if resume_at is None or not Path(path).exists():
        return write_text(path, ",".join(COLUMNS) + "\n")
    lines = Path(path).read_bytes().decode().splitlines(keepends=True)   # rows end in \r\n: kept as they are
    kept = lines[:1] + [line for line in lines[1:] if line.endswith("\n") and line[:1].isdigit()
                        and int(line.split(",")[0]) <= resume_at]
    if len(kept) < len(lines):
        write_text(path, "".join(kept))


def plot_curves(log_path, png):
    """Training curves: the losses; decoder A's use of its references; the consistency weight and lr."""
    from matplotlib.figure import Figure
    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    axes = Figure(figsize=(15, 3.5)).subplots(1, 3)
    for ax, keys in zip(axes, [COLUMNS[2:6], ["ref_delta", "context_ratio"], ["cons_w", "lr"]]):
        for key in keys:
            ax.plot([int(r["iter"]) for r in rows], [float(r[key]) for r in rows], label=key)
        ax.set_xlabel("iteration")
        ax.legend()
    axes[0].set_yscale("log")
    save_figure(axes[0].figure, png, dpi=100)


def check_run(cfg, world, resume=False, force=False, stop_at=None):
    """(checkpoint, Split), or what refuses a run before it writes: check_run_folder, the folders it writes,
    room for two checkpoints (fp32 student, teacher, momentum), the CoT cache, batch split, lists, cases."""
    ckpt = check_run_folder(cfg, world, resume, force, stop_at)
    generate = cfg.phantom and not Path(cfg.data_root, "train.list").exists()
    for folder in [cfg.cache_dir] * (cfg.downsample > 1) + [cfg.data_root] * generate + [cfg.out_dir]:
        near = next(p for p in [Path(folder).absolute(), *Path(folder).absolute().parents] if p.exists())
        if not (near.is_dir() and os.access(near, os.W_OK)):
            raise WriteError(f"{folder}: cannot write it: {near} is "
                             + ("a file, not a folder" if near.is_file() else "not writable"))
    need, free = 24 * sum(p.numel() for p in build_model(cfg).parameters()), shutil.disk_usage(near).free
    if free < need:
        raise WriteError(f"{cfg.out_dir}: {free >> 20} MB free, checkpoints need {need >> 20} MB")
    if cfg.references:
        pool.check_cache_writable(cfg)
    if cfg.batch_size % world.size or cfg.labeled_bs % world.size:
        raise ConfigError(f"config: batch_size={cfg.batch_size} and labeled_bs={cfg.labeled_bs} must divide "
                          f"among {world.size} processes (the global batch stays the protocol's)")
    return ckpt, None if generate else data.load_split(cfg.data_root, cfg.num_labeled, cfg.val_cases)


def provenance(cfg, world, device, split, how):
    """(record, text): what a run's numbers depend on beyond its config, and the lines it starts with: what
    differs from its experiment (config.json has it all), `how`, then the record."""
    try:
        commit, changes = (subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, text=True,
                                          capture_output=True, timeout=10, check=True).stdout.strip()
                           for args in (["rev-parse", "HEAD"], ["status", "--porcelain"]))
        changes = bool(changes)
    except (OSError, subprocess.SubprocessError):      # no git, or not a checkout
        commit = changes = "unknown"
    record = dict(torch=torch.__version__, cuda=torch.version.cuda or "none",
                  cudnn=str(torch.backends.cudnn.version() or "none"),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"{os.uname().machine} CPU, {torch.get_num_threads()} threads",
                  git_commit=commit, git_changes=changes, labeled=split.labeled if split else [],
                  command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), processes=world.size,
                  global_batch=cfg.batch_size)
    default = dataclasses.asdict(get_config(cfg.exp))
    changed = ", ".join(f"{k}={show(v)}" for k, v in dataclasses.asdict(cfg).items() if v != default[k])
    said = "; ".join(f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in record.items())
    return record, "\n".join(textwrap.fill(text, 110, break_on_hyphens=False)
                             for text in (f"{cfg.exp}: {changed or 'as defined'}; {how}", said))


def gather(world, obj):
    """Every rank's obj, in rank order (the losses; the per-rank sampler and RNG states of a checkpoint)."""
    out = [obj] * world.size
    if world.size > 1:
        dist.all_gather_object(out, obj)
    return out


def check_consistent(world, tensors):
    """Raise unless every rank holds the same values in each named tensor (sums compared in float64)."""
    sums = [(float(t.double().sum()), float(t.double().square().sum())) for t in tensors.values()]
    if differ := [name for name, *each in zip(tensors, *gather(world, sums)) if len(set(each)) > 1]:
        raise RuntimeError(f"rank {world.rank}: the ranks disagree on {len(differ)} tensors, e.g. "
                           f"{differ[:3]}")


def holds_run_folder(train):
    """Wrap train: the main process holds <out_dir>/run.lock; a signal (config.Stop), out of memory and a dead
    torchrun rank (survivors check in at the store) end in one line naming the last checkpoint."""
    @functools.wraps(train)
    def guarded(cfg, *args, **kwargs):
        path, main = Path(cfg.out_dir, "ckpt_last.pt"), main_process()
        busy = (f"{path.parent}: another run (PID {{pid}}) is training in this folder; wait for it to end, "
                "or train elsewhere with --out_dir=...")
        try:
            with Lock(path.parent / "run.lock", busy) if main else contextlib.nullcontext():
                return train(cfg, *args, **kwargs)
        except (KeyboardInterrupt, MemoryError, RuntimeError) as e:   # Stop; torch.cuda.OutOfMemoryError
            text, size, lost = str(e).lower(), dist.get_world_size() if dist.is_initialized() else 1, []
            if size > 1 and (isinstance(e, (KeyboardInterrupt, dist.DistError)) or "peer" in text):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)   # torchrun's: this rank says why it stops
                with contextlib.suppress(Exception):   # the store may be gone with the rank that held it
                    store = dist.distributed_c10d._get_default_store()
                    keys = [f"alive/{r}" for r in range(size)]
                    store.set(keys[dist.get_rank()], "1")
                    for _ in range(30):                # 3 s for every survivor to say it
                        time.sleep(0 if store.check(keys) else 0.1)
                    lost = [r for r, key in enumerate(keys) if not store.check([key])]
            if isinstance(e, Stop) and main and not lost:
                try:
                    last = (f"the last checkpoint is {path} (iteration {read_checkpoint(path)['iter']}); "
                            "continue with --resume" if path.exists() else
                            f"no checkpoint was written (none at {path})")
                except CheckpointError as error:
                    last = str(error)
                raise Stop(e.signum, last) from None
            if not (lost or isinstance(e, MemoryError) or "out of memory" in text
                    or "allocate memory" in text):
                raise
        where = f"the last checkpoint, {path}, is intact" if path.exists() else "no checkpoint was written"
        if lost:                                       # raised here, the failed frames' tensors are freed
            raise CersError(f"rank {', '.join(map(str, lost))} of {size} stopped (its own output says why), "
                            f"so this one stops too; {where}; --resume goes on with all processes")
        raise CersError(f"out of memory training with patch_size={show(cfg.patch_size)}, batch_size="
                        f"{cfg.batch_size}, base_filters={cfg.base_filters} on device={cfg.device}: lower "
                        f"--patch_size or --batch_size (--window_batch when testing); {where}")
    return guarded


@holds_run_folder
def train(cfg, resume=False, progress=True, stop_at=None, force=False, check=False):
    """Train one experiment, returning the last checkpoint's path. stop_at: stop after this iteration; force:
    replace a run with another config; check: check it all, say what would run, write nothing."""
    # everything that can refuse the run comes first; --check stops there (under torchrun rank 0 alone writes)
    world, device = init_world(cfg)
    out, end = Path(cfg.out_dir), min(stop_at or cfg.max_iters, cfg.max_iters)
    ckpt, split = check_run(cfg, world, resume, force, stop_at)
    if check:
        cots = f"{pool.resolve_backend(cfg)} CoT texts" if cfg.references else "no references"
        print(provenance(cfg, world, device, split, precision(*fast_paths(cfg, device)))[1])
        print(f"check passed: iterations {ckpt['iter'] + 1 if ckpt else 1} to {end} would run with {cots}"
              + ("" if split else f" once a phantom is written to {cfg.data_root}"))
        return None
    # data (a phantom experiment writes its own first), networks, pool and bank; what the run depends on
    phantom.ensure_for(cfg, world)
    split, volumes = data.prepare_data(cfg, world)
    run = Run(cfg, split, volumes, device, world, progress=progress)
    bank = f"; a bank of {len(run.bank)} labeled patches" if run.bank is not None else ""
    record, text = provenance(cfg, world, device, split, precision(run.bf16, run.channels_last) + bank)
    if world.main:
        print(text)
    # resume every state if the cases and CoT texts are the checkpoint's; `saved`: its iteration
    kept = {"split": {"labeled": split.labeled, "unlabeled": split.unlabeled, "test": split.test},
            "pool": {"mask": run.cots.mask, "image": run.cots.image} if run.cots else None}
    start, saved, ckpt_path, log_path = 0, None, out / "ckpt_last.pt", out / "log.csv"
    if resume:
        if changed := [k for k, now in kept.items() if now and ckpt.get(k) and ckpt[k] != now]:
            raise CheckpointError(f"--resume: the {' and '.join(changed)} (cases, CoT texts) differ from "
                                  f"{ckpt_path}'s: restore the lists, case files and cache, or train anew")
        for part in ["student", "teacher", "optimizer"] + ["bank"] * (run.bank is not None):
            getattr(run, part).load_state_dict(ckpt[part])
        mine = ckpt["ranks"][world.rank]
        run.sampler.load_state_dict(mine["sampler"])
        set_rng_state(mine["rng"])
        run.ref_gen.set_state(mine["ref_gen"])
        start = saved = ckpt["iter"]
        print(f"rank {world.rank}: resumed {ckpt_path} at iteration {start}")
    if world.main:
        write_text(out / "config.json", json.dumps(dict(dataclasses.asdict(cfg), provenance=record),
                                                         indent=1))
        if force and not resume:
            ckpt_path.unlink(missing_ok=True)          # the replaced run's would not match config.json
        start_log(log_path, resume_at=start if resume else None)   # without rows after the checkpoint
    # the loop; every log_every / ckpt_every iterations the losses, averaged over the ranks, reach the host
    # (with references each step waits there anyway, for retrieval) for a log row and a checkpoint
    t0 = time.time()
    bar = tqdm(range(start, end), initial=start, total=cfg.max_iters, desc=cfg.exp,
               disable=not (progress and world.main))
    for it in bar:
        image, label, ids = run.sampler.next()         # (B, 1, X, Y, Z), (Lb, X, Y, Z): labeled first
        losses = train_step(run, it, image, label, ids)
        done = it + 1
        log_now = done % cfg.log_every == 0 or done == cfg.max_iters
        save_now = done % cfg.ckpt_every == 0 or done == end
        values = [sum(v) / world.size for v in zip(*gather(world, torch.stack([*losses.values()]).tolist()))
                  ] if log_now or save_now else None
        if log_now and world.main:
            delta, ratio = reference_delta(run, image, ids, it) if run.bank is not None else (math.nan,) * 2
            row = [lr_at(it, cfg), *values, consistency_weight(it, cfg), delta, ratio, time.time() - t0]
            with appending(log_path) as f:             # COLUMNS, floats with 6 significant digits
                csv.writer(f).writerow([done] + [f"{v:.6g}" for v in row])
            bar.set_postfix(loss=f"{values[0]:.3f}", sup=f"{values[1]:.3f}", cons=f"{values[3]:.4f}")
        if values is not None and not all(map(math.isfinite, values)):   # never save a non-finite loss
            raise CersError(f"iteration {done}: the loss is not finite ("
                            f"{', '.join(f'{v:.4g}' for v in values)}); the run stops. Last good checkpoint: "
                            f"{f'iteration {saved}' if saved else 'none'}. Lower --lr or check the data, "
                            "then start again or --resume")
        if save_now:
            check_consistent(world, {**run.teacher.state_dict(),
                                     **({"bank": run.bank.features} if run.bank is not None else {})})
            ranks = gather(world, {"sampler": run.sampler.state_dict(), "rng": rng_state(),
                                   "ref_gen": run.ref_gen.get_state()})
            if world.main:
                save_checkpoint(ckpt_path, config=dataclasses.asdict(cfg), iter=done, world_size=world.size,
                                student=run.student.state_dict(), teacher=run.teacher.state_dict(),
                                optimizer=run.optimizer.state_dict(), ranks=ranks, **kept,
                                bank=run.bank.state_dict() if run.bank is not None else None)
            saved = done
    # the end: a summary and the curves; every rank waits for the last checkpoint's writing
    if world.main:
        print(f"trained {end - start} iterations in {time.time() - t0:.0f} s; last checkpoint {ckpt_path}")
        plot_curves(log_path, out / "curves.png")
    if world.size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return ckpt_path


def run_ablation(cfg, names, seeds, force=False):
    """Train and test each row and seed into <out_dir>/ablation/<row>/seed<S> (every run folder checked
    first), then print and save the table of all runs there (test.ablation_table): later calls add to it."""
    if unknown := sorted(set(names) - set(ABLATIONS)):
        raise ConfigError(f"--ablation: unknown {unknown}; known: {', '.join(ABLATIONS)}")
    rows = dict(ABLATIONS)
    if "supervised_all" in names:                     # every training case (less the validation split)
        phantom.ensure_for(cfg)
        split = data.load_split(cfg.data_root, 1, cfg.val_cases)
        rows["supervised_all"] = {**SUPERVISED, "num_labeled": len(split.labeled + split.unlabeled),
                                  "labeled_bs": cfg.batch_size}
    variants = [check_config(dataclasses.replace(cfg, seed=seed, **rows[name],
                                                 out_dir=f"{cfg.out_dir}/ablation/{name}/seed{seed}"))
                for name in names for seed in seeds]
    for variant in variants:
        check_run_folder(variant, World(), force=force)
    for variant in variants:
        t, ckpt = time.time(), train(variant, force=force)
        if main_process():                             # under torchrun, rank 0 tests
            summary = {**test.evaluate(ckpt), "run_seconds": time.time() - t}
            write_text(Path(variant.out_dir, "test", "summary.json"), json.dumps(summary, indent=1))
    if main_process():
        table = test.ablation_table(Path(cfg.out_dir, "ablation"), f"{cfg.exp}, {cfg.max_iters} iterations")
        print("\n" + table)
        write_text(Path(cfg.out_dir, "ablation", "table.md"), table + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--exp", default="LA_8", help=f"experiment: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--check", action="store_true", help="check what the run needs, say what would run")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--force", action="store_true", help="replace a run with another config")
    parser.add_argument("--no-test", action="store_true", help="skip testing the last checkpoint")
    parser.add_argument("--stop-at", type=int, help="stop after this iteration (resume later with --resume)")
    parser.add_argument("--ablation", help=f"'all' or a comma list of {', '.join(ABLATIONS)}")
    parser.add_argument("--seeds", type=int, default=1, help="with --ablation: seeds seed, seed + 1, ...")
    args, overrides = parser.parse_known_args(argv)
    cfg = get_config(args.exp, overrides)
    if args.resume and args.force:
        raise ConfigError("--resume continues the run in the folder, --force replaces it: give one of them")
    if args.ablation:
        if args.resume or args.stop_at is not None or args.check or args.seeds < 1:
            raise ConfigError("--ablation trains each row from the start, --seeds >= 1 times: --resume, "
                              "--stop-at and --check do not apply")
        names = list(ABLATIONS) if args.ablation == "all" else args.ablation.split(",")
        return run_ablation(cfg, names, [cfg.seed + i for i in range(args.seeds)], args.force)
    ckpt = train(cfg, resume=args.resume, stop_at=args.stop_at, force=args.force, check=args.check)
    if not (args.no_test or args.check) and args.stop_at is None and main_process():   # rank 0 tests
        test.evaluate(ckpt)


if __name__ == "__main__":
    sys.exit(cli(main))
