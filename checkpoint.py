"""Checkpoints: written atomically, read back into a network rebuilt from the config they carry.

A checkpoint holds everything a run needs to continue exactly (docs/design.md §12):
student, teacher, optimiser, iteration, every rank's sampler and random states, the reference bank,
the CoT texts and the whole config. train.py writes and resumes them; test.py and explain.py read
the student back with load_checkpoint, which builds the network from the saved config.

--resume continues a run only with the config it was trained with: config_changes() lists the keys that
differ, and only the keys in RESUMABLE (how long, how often to log and save, where and how fast to run,
how to test, how to reach the LLM) may change. check_run_folder runs before a run reads or writes anything:
it opens the checkpoint --resume continues, or refuses to replace a run with another config without --force.
holds_run_folder keeps a second run out of a folder that one is training in, and makes a run stopped by Ctrl-C
or SIGTERM say where its last checkpoint is.
"""
import dataclasses
import functools
import io
import json
import random
from pathlib import Path

import numpy as np
import torch

import files
from config import Config, CersError, ConfigError, Stop, show
from distributed import main_process
from model import build_model

# keys that may differ between a checkpoint and the run that resumes it: none changes the network, the data,
# the references or the arithmetic of the iterations already done (max_iters does stretch the lr decay ahead)
RESUMABLE = ("max_iters", "log_every", "ckpt_every", "device", "amp", "compile", "window_batch", "stride_xy",
             "stride_z", "out_dir", "llm_url", "llm_api_key_env", "llm_timeout", "llm_workers", "llm_retries")


class CheckpointError(CersError):
    """A checkpoint that is missing, damaged, or does not fit the run that reads it."""


def save_checkpoint(path, **state):
    """Write atomically (files.write_bytes: a temp file of this process, then a rename) so an interrupted or
    failed save never damages the last checkpoint. Serialised in memory first: torch.save writing a file
    itself reports a full disk without its cause."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files.write_bytes(path, buffer.getbuffer())


def read_checkpoint(path, map_location="cpu"):
    """The checkpoint dict at path, or a CheckpointError naming the file: missing, truncated, not a
    checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError ... for a damaged file
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or not a checkpoint "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from e
    missing = [k for k in ("config", "iter", "student") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a CERS checkpoint (no {', '.join(missing)})")
    return ckpt


def config_from_dict(saved, path):
    """The Config a checkpoint was written with; keys this version does not know are refused by name."""
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise CheckpointError(f"{path}: its config has keys this version does not know "
                              f"({', '.join(unknown)}); read it with the version of the code that wrote it")
    return Config(**saved)


def config_changes(saved, cfg, path):
    """[(key, saved value, new value)] for every key where cfg differs from the checkpoint's saved config dict
    (a key the checkpoint predates counts at its default)."""
    old = json.loads(json.dumps(dataclasses.asdict(config_from_dict(saved, path))))  # tuples and lists alike
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))
    return [(k, old[k], new[k]) for k in new if old[k] != new[k]]


def check_resumable(ckpt, cfg, path):
    """Refuse to resume a checkpoint with a config changed outside RESUMABLE, or one that has nothing left
    to do."""
    fixed = [c for c in config_changes(ckpt["config"], cfg, path) if c[0] not in RESUMABLE]
    if fixed:
        changes = ", ".join(f"{k}={show(a)} now {show(b)}" for k, a, b in fixed)
        raise ConfigError(f"--resume: {path} was trained with a different config ({changes}); "
                          f"resuming may change only {', '.join(RESUMABLE)}. Give the checkpoint's values, "
                          "train a new run elsewhere (--out_dir=...), or replace this one with --force "
                          "instead of --resume")
    if cfg.max_iters <= ckpt["iter"]:
        raise ConfigError(f"--resume: {path} is at iteration {ckpt['iter']}, max_iters={cfg.max_iters} "
                          f"leaves nothing to train; raise --max_iters, or test it with test.py")


def load_checkpoint(path, device):
    """The student network (eval mode), its config and the whole checkpoint dict, rebuilt from what was
    saved."""
    ckpt = read_checkpoint(path, device)
    cfg = config_from_dict(ckpt["config"], path)
    model = build_model(cfg).to(device)
    model.load_state_dict(ckpt["student"])
    return model.eval(), cfg, ckpt


def rng_state():
    """This process's random states (torch, numpy, python, and the current CUDA device's)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()     # this process's device only
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- the run folder

def check_run_folder(cfg, world, resume=False, force=False, stop_at=None):
    """Before anything is read or written: for --resume, the checkpoint it continues (readable, same number of
    processes, config compared key by key, iterations left); for a new run, a refusal to replace a run with
    another config in cfg.out_dir unless force. Returns the checkpoint dict to resume, or None."""
    out = Path(cfg.out_dir)
    ckpt_path = out / "ckpt_last.pt"
    ckpt = None
    if resume:
        if not ckpt_path.exists():
            raise CheckpointError(f"--resume: no checkpoint at {ckpt_path} (train without --resume first)")
        ckpt = read_checkpoint(ckpt_path)                  # RNG states must stay on the CPU
        if len(ckpt["ranks"]) != world.size:
            raise CheckpointError(f"--resume: {ckpt_path} was written by {len(ckpt['ranks'])} process(es); "
                                  f"resume it with the same number, not {world.size}")
        check_resumable(ckpt, cfg, ckpt_path)
    elif not force:
        check_not_replacing(cfg, out)
    at = ckpt["iter"] if ckpt else 0
    if stop_at is not None and stop_at <= at:
        raise ConfigError(f"--stop-at={stop_at}: the run is already at iteration {at}")
    return ckpt


def check_not_replacing(cfg, out):
    """Refuse a new run in a folder that holds a run with another config (its checkpoint, else its
    config.json)."""
    ckpt_path, record = out / "ckpt_last.pt", out / "config.json"
    what = ckpt_path if ckpt_path.exists() else record if record.exists() else None
    if what is None:
        return
    advice = "train elsewhere with --out_dir=..., continue it with --resume, or replace it with --force"
    try:
        saved = read_checkpoint(what)["config"] if what == ckpt_path else json.loads(record.read_text())
        changes = [c for c in config_changes(saved, cfg, what) if c[0] != "out_dir"]
    except (CersError, ValueError, TypeError) as e:
        raise ConfigError(f"{out} holds a run whose config cannot be read ({e}); {advice}") from None
    if changes:
        listed = ", ".join(f"{k}={show(a)} there, {show(b)} here" for k, a, b in changes[:4])
        raise ConfigError(f"{out} holds a run with another config ({listed}"
                          f"{', ...' if len(changes) > 4 else ''}; from {what.name}); {advice}")


def holds_run_folder(train):
    """Wrap train(cfg, ...): the main process holds <out_dir>/run.lock while it trains (created, and so the
    folder checked writable, before anything is read), so a second run on the folder is refused naming the
    first one's PID; a run stopped by Ctrl-C or SIGTERM ends saying where its last checkpoint is
    (config.Stop)."""
    @functools.wraps(train)
    def locked(cfg, *args, **kwargs):
        if not main_process():
            return train(cfg, *args, **kwargs)
        out = Path(cfg.out_dir)
        busy = (f"{out}: another run (PID {{pid}}) is training in this folder; wait for it to end, or train "
                "elsewhere with --out_dir=...")
        with files.Lock(out / "run.lock", busy):
            try:
                return train(cfg, *args, **kwargs)
            except Stop as e:
                raise Stop(e.signum, last_checkpoint(out / "ckpt_last.pt")) from None
    return locked


def last_checkpoint(path):
    """Where a stopped run can be continued from, in words."""
    if not path.exists():
        return f"no checkpoint was written (none at {path})"
    try:
        done = read_checkpoint(path)["iter"]
        return f"the last checkpoint is {path} (iteration {done}); continue with --resume"
    except CheckpointError as e:
        return str(e)
