"""The dual-decoder mean-teacher training loop with CERS references (docs/design.md §9).

    python train.py --exp LA_8                      # the LA protocol, 8 labeled scans
    python train.py --exp PHANTOM_8                 # offline default: synthetic data, CPU-sized
    python train.py --exp LA_8 --max_iters=2000     # any config key, checked by type
    python train.py --exp LA_8 --resume             # continue from runs/LA_8/ckpt_last.pt
    python train.py --exp LA_8 --force              # replace a run with another config in runs/LA_8
    python train.py --exp LA_8 --ablation all --seeds 3   # train and test each ablation (ablate.py)

Labeled patches: Dice + cross-entropy on both decoders. Unlabeled patches: both student decoders
follow the teacher's sharpened prediction, and each other's (cross-decoder consistency), with a
sigmoid ramp-up. The teacher is an exponential moving average (EMA) of the student. Decoder A fuses
the references that reasoning selects (retrieve.py). The extensions beyond the paper are one call each
in train_step (extensions.py); the losses are in losses.py, the log in runlog.py.

Read top to bottom: schedules and the EMA, the run's state (setup), one step (train_step), the loop
(train) and the command line. Settings come from config.py.
"""
import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import ablate
import data
import extensions
import files
import phantom
import pool
import runlog
import test
from bank import ReferenceBank
from checkpoint import (CheckpointError, check_run_folder, holds_run_folder, rng_state, save_checkpoint,
                        seed_everything, set_rng_state)
from config import EXPERIMENTS, CersError, Config, ConfigError, cli, fast_paths, get_config, precision
from distributed import (World, average_buffers, check_consistent, gather, init_world, main_first,
                         main_process)
from losses import mse, sharpen, supervised_loss
from model import build_model
from retrieve import decoder_a_probabilities, query_references

# ----------------------------------------------------------------------------- schedules and the EMA

def lr_at(it, cfg):
    """Poly decay: lr * (1 - it / max_iters) ** 0.9."""
    return cfg.lr * (1.0 - it / cfg.max_iters) ** 0.9


def sigmoid_rampup(current, length):
    """exp(-5 (1 - t)^2) with t = current / length clipped to [0, 1] (Laine & Aila 2017)."""
    if length == 0:
        return 1.0
    t = min(max(current / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def consistency_weight(it, cfg):
    """The weight of the unlabeled losses: consistency times the sigmoid ramp-up."""
    return cfg.consistency * sigmoid_rampup(it, cfg.rampup_iters)


@torch.no_grad()
def ema_update(teacher, student, decay, it):
    """teacher = decay * teacher + (1 - decay) * student, for parameters and float buffers (BN statistics).
    The decay is lowered early on (1 - 1/(it+1)) so the teacher is not stuck at the random init.
    One fused (foreach) update for all tensors: per-tensor kernels would cost more than the arithmetic."""
    decay = min(1.0 - 1.0 / (it + 1), decay)
    pairs = list(zip(teacher.state_dict().values(), student.state_dict().values()))
    floats = [(t, s) for t, s in pairs if t.dtype.is_floating_point]
    torch._foreach_lerp_([t for t, _ in floats], [s.detach() for _, s in floats], 1.0 - decay)
    for t, s in pairs:
        if not t.dtype.is_floating_point:
            t.copy_(s)


# ----------------------------------------------------------------------------- the step

@dataclass
class Run:
    """What a training step reads and updates (built by setup(); train() adds the loop around it)."""
    cfg: Config
    device: torch.device
    world: World
    student: torch.nn.Module
    net: torch.nn.Module               # what the step calls: the student, or its DistributedDataParallel
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: data.BatchSampler
    bank: ReferenceBank = None         # when references are on
    cots: pool.CotTexts = None         # when references are on
    ref_gen: torch.Generator = None    # the draws of the "random" retrieval ablation
    bf16: bool = False                 # bf16 autocast (fp32 weights, optimiser and losses)
    channels_last: bool = False        # channels-last 3D activations and weights

    @property
    def memory_format(self):
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def setup(cfg, split, volumes, device, world=World(), fast=None, progress=True):
    """Networks, optimiser, batch sampler, knowledge pool and reference bank for one run.

    fast: bf16 autocast + channels-last 3D; default: cfg.amp on CUDA. On the CPU, cfg.amp keeps fp32 and
    still lays activations out channels-last (config.fast_paths)."""
    bf16, channels_last = fast_paths(cfg, device) if fast is None else (fast, fast)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True          # fixed patch size: let cuDNN pick the fastest kernels
    seed_everything(cfg.seed)                          # the same initial weights on every rank
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    student = build_model(cfg).to(device, memory_format=memory_format)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.compile:                                    # in place: state_dict keys stay as they are
        for net in (student, teacher):
            for part in (net.encoder, net.decoder_a, net.decoder_b):
                part.compile()
    net = student
    if world.size > 1:                                # before the warm-up the MCAM parameters get no gradient
        net = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=cfg.references)
    torch.manual_seed(cfg.seed + world.rank)           # each rank its own noise and dropout
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    sampler = data.BatchSampler(volumes, split.labeled, split.unlabeled, cfg.labeled_bs, cfg.batch_size,
                                cfg.patch_size, device, cfg.seed + world.rank)
    run = Run(cfg, device, world, student, net, teacher, optimizer, sampler, bf16=bf16,
              channels_last=channels_last, ref_gen=torch.Generator(device).manual_seed(cfg.seed + world.rank))
    if cfg.references:                                 # knowledge pool and reference bank
        with main_first(world):
            run.cots = pool.build_pool(cfg, split, volumes, progress=progress and world.main)
        run.bank = ReferenceBank.build(cfg, volumes, split.labeled, run.cots.mask, device)
        run.bank.index_queries(run.cots.image)
    return run


def train_step(run, it, image, label, ids):
    """One iteration on a batch (labeled patches first): references, teacher targets, student losses, SGD
    step, EMA teacher. Each extension beyond the paper is one call to extensions.py, which hands the batch or
    the loss back unchanged when its switch is off. Returns the losses as device tensors (reading them is the
    caller's choice)."""
    cfg, student, teacher, bank = run.cfg, run.student, run.teacher, run.bank
    n_lab = cfg.labeled_bs
    image = extensions.strong_labeled_view(image, n_lab, cfg)             # strong_labeled
    image = image.contiguous(memory_format=run.memory_format)              # (B, 1, X, Y, Z)

    # 1. references (after the warm-up): the bank follows the teacher's encoder every bank_refresh
    #    iterations; each patch's query is the teacher's decoder-B prediction and its image-only CoT
    use_refs = bank is not None and it >= cfg.ref_warmup
    if use_refs and (it - cfg.ref_warmup) % cfg.bank_refresh == 0:
        with torch.no_grad(), run.autocast():
            bank.refresh(lambda x: teacher.encoder(x.contiguous(memory_format=run.memory_format))[-1],
                         cfg.bank_momentum, replace=it == cfg.ref_warmup)   # the first replaces
        if run.world.size > 1:
            dist.broadcast(bank.features, 0)                              # bit-identical banks on every rank

    # 2. teacher targets for the unlabeled patches (noisy input, mean of both decoders, sharpened)
    with torch.no_grad(), run.autocast():
        t_in = image if use_refs else image[n_lab:]                     # labeled patches query references too
        sigma = cfg.teacher_noise
        noise = (torch.randn_like(t_in) * sigma).clamp(-2 * sigma, 2 * sigma)
        feats = teacher.encoder(t_in + noise)
        t_b = teacher.decoder_b(feats)                                     # (B or Bu, 2, X, Y, Z)
        refs = refs_u = student_refs = None
        zero_refs = False
        if use_refs:
            refs = query_references(bank, t_b, ids, cfg, run.ref_gen)     # mcam.References, (B, K, ...)
            student_refs, zero_refs = extensions.counterfactual_refs(      # ref_counterfactual
                refs, lambda: query_references(bank, t_b, ids, cfg, run.ref_gen, "random"), run.ref_gen, cfg)
            feats, t_b, refs_u = [f[n_lab:] for f in feats], t_b[n_lab:], refs.part(slice(n_lab, None))
        t_a = teacher.decode_a(feats, refs_u)
        p_teacher = 0.5 * (t_a.float().softmax(1) + t_b.float().softmax(1))[:, 1]   # (Bu, X, Y, Z)
        target = sharpen(p_teacher, cfg.sharpen_t)
        # what the student sees of the unlabeled patches (the references stay those of the patches as drawn)
        image, target = extensions.mixed(image, target, label, n_lab, cfg)  # unlabeled_mix, mix_labeled
        image = extensions.strong_unlabeled_view(image, n_lab, cfg)          # strong_view
        image = image.contiguous(memory_format=run.memory_format)

    # 3. student: supervised loss on labeled, consistency on unlabeled (decoder A sees the references)
    #    (with ref_proto_weight the forward pass also hands back the bottleneck features)
    with run.autocast():                                                   # (B, 2, X, Y, Z) each; (B, H, ..)
        logits_a, logits_b, transferred, *bottleneck = run.net(image, student_refs, zero_refs=zero_refs,
                                                               bottleneck=cfg.ref_proto_weight > 0)
    sup_a = supervised_loss(logits_a[:n_lab], label)
    loss_sup = sup_a + supervised_loss(logits_b[:n_lab], label)
    p_a = logits_a[n_lab:].float().softmax(1)[:, 1]                        # (Bu, X, Y, Z)
    p_b = logits_b[n_lab:].float().softmax(1)[:, 1]
    # the mean teacher (with mix_labeled: the supervised loss on the copy-pasted patches' hard targets)
    loss_mt = mse(p_a, target) + mse(p_b, target)
    loss_mt = extensions.copy_paste_loss(loss_mt, logits_a[n_lab:], logits_b[n_lab:], target, cfg)
    sharp_a, sharp_b = sharpen(p_a, cfg.sharpen_t).detach(), sharpen(p_b, cfg.sharpen_t).detach()
    loss_cross = mse(p_a, sharp_b) + mse(p_b, sharp_a)                     # cross-decoder consistency
    w = consistency_weight(it, cfg)
    loss = loss_sup + w * (loss_mt + loss_cross)
    loss = loss + extensions.transfer_loss(transferred, label, target, n_lab, w, cfg)  # ref_masks
    loss = loss + extensions.prototype_loss(refs, label, target, n_lab, w, cfg,          # ref_proto_weight
                                            *bottleneck)

    # 4. SGD step with the scheduled learning rate, then the teacher follows
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(it, cfg)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    ema_update(teacher, student, cfg.ema_decay, it)
    average_buffers(teacher, run.world)
    return {"loss": loss.detach(), "sup": loss_sup.detach(), "sup_a": sup_a.detach(),
            "cons": (loss_mt + loss_cross).detach()}


@torch.no_grad()
def reference_delta(run, image, ids, it):
    """Mean |change| of the student's decoder-A foreground probability when random bank entries replace
    the retrieved references, on this batch, in eval mode (no dropout): how much decoder A uses what its
    references contain. It reads the student and draws from its own generator, so training is unchanged."""
    student = run.student.eval()
    with run.autocast():
        feats = student.encoder(image.contiguous(memory_format=run.memory_format))
        generator = torch.Generator(run.device).manual_seed(run.cfg.seed + it)
        p = decoder_a_probabilities(student, feats, student.decoder_b(feats), ids, run.bank, run.cfg,
                                    generator, ("retrieved", "random"))
    run.student.train()
    return float((p["retrieved"] - p["random"]).abs().mean())


# ----------------------------------------------------------------------------- checks before a run writes

class DivergedError(CersError):
    """The losses stopped being finite; the message names the iteration and the last good checkpoint."""


def check_same_inputs(run, split, ckpt, path):
    """Refuse to resume when the lists or the CoT texts differ from the checkpoint's (a changed case file gets
    new texts: the cache is keyed by the file's content)."""
    lists = {"labeled": split.labeled, "unlabeled": split.unlabeled, "test": split.test}
    for name, ids in (ckpt.get("split") or {}).items():
        if ids != lists[name]:
            raise CheckpointError(f"--resume: the {name} cases of {split.root} differ from those {path} was "
                                  f"trained on ({len(ids)} then, {len(lists[name])} now); restore the lists "
                                  "or start a new run")
    saved = ckpt.get("pool") or {}
    for kind in saved if run.cots else ():
        now = getattr(run.cots, kind)
        changed = [i for i, text in saved[kind].items() if now.get(i) != text]
        if changed:
            raise CheckpointError(f"--resume: the {kind} CoT of case {changed[0]!r} differs from the one "
                                  f"{path} was trained with ({len(changed)} case(s): a changed case file, "
                                  "cache, prompt or reasoner); restore it or start a new run")


def check_testable(cfg):
    """Refuse, before training, a CERS run that test.py could not test: no bank features before ref_warmup."""
    if cfg.references and cfg.ref_warmup >= cfg.max_iters:
        raise ConfigError(f"config: ref_warmup={cfg.ref_warmup} >= max_iters={cfg.max_iters}: the references "
                          "would never be used and the checkpoint could not be tested; lower --ref_warmup, "
                          "set --references=false, or add --no-test")


def read_losses(losses, world):
    """The step's losses as floats, averaged over the ranks: a host-device synchronisation, so called only at
    log and checkpoint iterations."""
    values = torch.stack(list(losses.values()))
    if world.size > 1:
        dist.all_reduce(values)
        values /= world.size
    return values.tolist()


def check_finite(values, done, saved, ckpt_path):
    """Stop the run when a loss is NaN or infinite: the weights are lost from there on, the checkpoint is
    not."""
    if not all(math.isfinite(v) for v in values):
        last = f"{ckpt_path} (iteration {saved})" if saved else "none was written"
        raise DivergedError(f"iteration {done}: the loss is not finite (loss, sup, sup_a, cons = "
                            f"{', '.join(f'{v:.4g}' for v in values)}); the run stops. Last good checkpoint: "
                            f"{last}. Lower --lr or check the data, then start again or --resume")


# ----------------------------------------------------------------------------- the loop

@holds_run_folder
def train(cfg, resume=False, progress=True, stop_at=None, force=False):
    """Train one experiment; returns the path of the last checkpoint.

    stop_at: end after this iteration with a checkpoint, as if interrupted (resume continues the run).
    force: replace a run with another config in cfg.out_dir. Everything is checked (config, checkpoint, data,
    test files) before its files are written. Under torchrun every rank trains on its own batches; rank 0
    alone prints, logs and checkpoints."""
    world, device = init_world(cfg)
    out = Path(cfg.out_dir)
    progress = progress and world.main
    ckpt = check_run_folder(cfg, world, resume, force, stop_at)
    if world.main:
        print(f"config ({device}, {world.size} process(es)):")
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
    if cfg.references:                                 # the CoT cache must take what the pool asks for
        pool.check_cache_writable(cfg)
    data.check_volume_cache_writable(cfg)              # before any data is written or read
    phantom.ensure_for(cfg, world)                     # a phantom experiment writes its data first
    split, volumes = data.prepare_data(cfg, world)
    data.load_volumes(cfg.data_root, [i for i in split.test if i not in volumes], progress=False,
                      factor=cfg.downsample, cache_dir=cfg.cache_dir)       # now, not after training
    run = setup(cfg, split, volumes, device, world, progress=progress)
    if world.main:
        print(f"precision: {precision(run.bf16, run.channels_last)}"
              + (f"; reference bank: {len(run.bank)} labeled patches, references from iteration "
                 f"{cfg.ref_warmup}" if run.bank is not None else ""))

    start, ckpt_path, log_path = 0, out / "ckpt_last.pt", out / "log.csv"
    if resume:
        check_same_inputs(run, split, ckpt, ckpt_path)
        run.student.load_state_dict(ckpt["student"])
        run.teacher.load_state_dict(ckpt["teacher"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        mine = ckpt["ranks"][world.rank]
        run.sampler.load_state_dict(mine["sampler"])
        set_rng_state(mine["rng"])
        run.ref_gen.set_state(mine["ref_gen"].cpu())
        if run.bank is not None:
            run.bank.load_state_dict(ckpt["bank"])
        start = ckpt["iter"]
        print(f"rank {world.rank}: resumed {ckpt_path} at iteration {start}")
    if world.main:                                     # the run folder is written only now, after every check
        files.write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1))
        if force and not resume:
            ckpt_path.unlink(missing_ok=True)      # the replaced run's checkpoint would not match config.json
        runlog.start_log(log_path, resume_at=start if resume else None)   # without rows after the checkpoint
    saved = start if resume else None                  # the iteration of the last checkpoint written

    run.student.train()
    run.teacher.eval()                                 # the teacher uses its EMA statistics, no dropout
    t0 = time.time()
    end = min(stop_at or cfg.max_iters, cfg.max_iters)
    bar = tqdm(range(start, end), initial=start, total=cfg.max_iters, desc=cfg.exp, disable=not progress)
    for it in bar:
        image, label, ids = run.sampler.next()         # (B, 1, X, Y, Z), (Lb, X, Y, Z): labeled first
        losses = train_step(run, it, image, label, ids)

        # log and checkpoint: the only host-device synchronisations; no checkpoint is written from a run whose
        # loss is no longer finite
        done = it + 1
        log_now = done % cfg.log_every == 0 or done == cfg.max_iters
        save_now = done % cfg.ckpt_every == 0 or done == end
        values = read_losses(losses, world) if log_now or save_now else None
        if log_now:
            loss, sup, sup_a, cons = values
            delta = float("nan")
            if world.main and run.bank is not None and it >= cfg.ref_warmup:
                delta = reference_delta(run, image, ids, it)
            row = [done, lr_at(it, cfg), loss, sup, sup_a, cons, consistency_weight(it, cfg), delta,
                   time.time() - t0]                   # runlog.COLUMNS
            if world.main:
                runlog.append_row(log_path, row)
            bar.set_postfix(loss=f"{loss:.3f}", sup=f"{sup:.3f}", cons=f"{cons:.4f}", lr=f"{row[1]:.4f}")
        if values is not None:
            check_finite(values, done, saved, ckpt_path)
        if save_now:
            check_consistent(world, {**{f"teacher.{k}": v for k, v in run.teacher.state_dict().items()},
                                     **({"bank.features": run.bank.features}
                                        if run.bank is not None and run.bank.features is not None else {})})
            ranks = gather(world, {"sampler": run.sampler.state_dict(), "rng": rng_state(),
                                   "ref_gen": run.ref_gen.get_state()})
            if world.main:
                save_checkpoint(ckpt_path, config=dataclasses.asdict(cfg), iter=done, world_size=world.size,
                                student=run.student.state_dict(), teacher=run.teacher.state_dict(),
                                optimizer=run.optimizer.state_dict(), ranks=ranks,
                                bank=run.bank.state_dict() if run.bank is not None else None,
                                pool={"mask": run.cots.mask, "image": run.cots.image} if run.cots else None,
                                split={"labeled": split.labeled, "unlabeled": split.unlabeled,
                                       "test": split.test})
            saved = done
    bar.close()
    if world.main:
        print(f"trained {end - start} iterations in {time.time() - t0:.0f} s; last checkpoint {ckpt_path}")
        runlog.plot_curves(log_path, out / "curves.png")
    if world.size > 1:                              # the last checkpoint is written when every rank gets past
        dist.barrier()
        dist.destroy_process_group()
    return ckpt_path


def train_and_test(cfg, force=False):
    """Train one experiment, then test its last checkpoint; returns the test summary (under torchrun rank 0
    tests, and the other ranks return None)."""
    ckpt = train(cfg, force=force)
    return test.evaluate(ckpt) if main_process() else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="LA_8", help=f"experiment: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the experiment's last checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="replace a run with another config in the run folder")
    parser.add_argument("--no-test", action="store_true", help="skip testing the last checkpoint")
    parser.add_argument("--stop-at", type=int, help="stop after this iteration (resume later with --resume)")
    parser.add_argument("--ablation", help=f"'all' or a comma list of {', '.join(ablate.ABLATIONS)}: train "
                        "and test each (ablate.py)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="with --ablation: seeds seed, seed + 1, ... per variant")
    args, overrides = parser.parse_known_args(argv)
    cfg = get_config(args.exp, overrides)
    if args.resume and args.force:
        raise ConfigError("--resume continues the run in the folder, --force replaces it: give one of them")
    if args.stop_at is not None and args.stop_at < 1:
        raise ConfigError(f"--stop-at={args.stop_at}: give an iteration >= 1")
    if args.ablation:
        names = ablate.ablation_names(args.ablation)
        if args.resume or args.stop_at is not None:
            raise ConfigError("--ablation trains each variant from the start: --resume and --stop-at do not "
                              "apply")
        if args.seeds < 1:
            raise ConfigError(f"--seeds={args.seeds}: give a count >= 1")
        check_testable(cfg)
        ablate.run_ablation(cfg, names, [cfg.seed + i for i in range(args.seeds)], train_and_test, args.force)
        return
    if not args.no_test and args.stop_at is None:
        check_testable(cfg)
    ckpt = train(cfg, resume=args.resume, stop_at=args.stop_at, force=args.force)
    if not args.no_test and args.stop_at is None:
        if main_process():                             # under torchrun, rank 0 tests
            test.evaluate(ckpt)


if __name__ == "__main__":
    sys.exit(cli(main))
