"""Checkpoints are data, never code: tensors and plain Python values in FORM, read back with
torch.load(weights_only=True) (a file that asks for more is refused unrun), then checked. --resume keeps the
config but RESUMABLE (cot_cache: texts compared), not deterministic (a run repeats only under one setting)."""
import dataclasses
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import torch

from config import CersError, Config, ConfigError, check_config, show, write_bytes
from model import build_model

# what --resume may change: how long, how often to log and save; where and how fast; how to get the CoT texts
RESUMABLE = ("max_iters", "log_every", "ckpt_every", "device", "amp", "compile", "window_batch", "stride_xy",
             "stride_z", "out_dir", "cot_cache", "llm_url", "llm_api_key_env", "llm_timeout", "llm_workers",
             "llm_retries")
WEIGHTS, IDS = {str: torch.Tensor}, [str]           # check_contents adds the shapes of the config's network
FORM = {  # what train.py saves, in mismatch's notation
    "config": {str: object}, "iter": int, "world_size": int, "student": WEIGHTS, "teacher": WEIGHTS,
    "optimizer": {"state": {int: {str: (None, torch.Tensor)}}, "param_groups": [dict]},
    "ranks": [{"sampler": {"gen": torch.Tensor, "orders": [[int]], "pos": [int]}, "ref_gen": torch.Tensor,
               "rng": {"torch": torch.Tensor, "numpy": list, "python": tuple, "cuda": (None, torch.Tensor)}}],
    "bank": (None, {str: (None, int, torch.Tensor, IDS)}),
    "pool": (None, {"mask": {str: str}, "image": {str: str}}),
    "split": {"labeled": IDS, "unlabeled": IDS, "test": IDS}}


class CheckpointError(CersError):
    """A checkpoint that is missing, damaged, unsafe, or does not fit the run that reads it."""


def mismatch(value, form, name="checkpoint"):
    """Where value departs from form, in words, or None. A form is a type (a bool is no int), a torch.Size (a
    tensor of that shape), None, a tuple of alternatives, [form] (a list of such items), {type: form} (a dict
    of such keys and values) or {"key": form} (exactly these entries); a meta tensor fits no form."""
    if isinstance(value, torch.Tensor) and value.is_meta:
        return f"{name} is a tensor on the meta device, without values"
    if type(form) is tuple:
        return None if None in (found := [mismatch(value, f, name) for f in form]) else found[-1]
    if isinstance(form, torch.Size):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        return None if shape == tuple(form) else f"{name} is {shape}, not a tensor of shape {tuple(form)}"
    if form is None or isinstance(form, type):
        ok = isinstance(value, form) and not (type(value) is bool and form is int) if form else value is None
        return None if ok else f"{name} is {type(value).__name__}, not {getattr(form, '__name__', 'None')}"
    if not isinstance(value, (list, tuple) if isinstance(form, list) else dict):
        return f"{name} is {type(value).__name__}, not a {type(form).__name__}"
    if isinstance(form, list):
        items = [(f"{name}[{i}]", v, form[0]) for i, v in enumerate(value)]
    elif isinstance(key_type := next(iter(form)), type):
        items = ([(f"{name} key {k!r}", k, key_type) for k in value] +
                 [(f"{name}[{k!r}]", v, form[key_type]) for k, v in value.items()])
    elif odd := sorted(set(form) ^ set(value), key=str):
        return f"{name}[{odd[0]!r}] is {'missing' if odd[0] in form else 'there, unexpected'}"
    else:
        items = [(f"{name}[{k!r}]", value[k], f) for k, f in form.items()]
    return next((problem for n, v, f in items if (problem := mismatch(v, f, n))), None)


def save_checkpoint(path, **state):
    """Write a checkpoint of FORM atomically, serialised in memory first (torch.save to a file hides why a
    write failed). A departure from FORM is the caller's bug, refused here rather than by every reader."""
    if problem := mismatch(state, FORM):
        raise TypeError(f"{path}: {problem}; see checkpoint.FORM")
    torch.save(state, buffer := io.BytesIO())
    write_bytes(path, buffer.getbuffer())


def read_checkpoint(path):
    """The checkpoint at path, on the CPU and checked; one missing, damaged or unsafe: a CheckpointError."""
    if not (path := Path(path)).is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError, EOFError, UnpicklingError ... for a damaged or unsafe file
        text = " ".join(str(e).split())
        if code := re.search(r"GLOBAL ([\w.]+)", text):                # "Unsupported global: GLOBAL io.open"
            raise CheckpointError(f"{path}: refused: loading it would call {code[1]}, and a checkpoint holds "
                                  "only tensors and plain Python values (it may run code: do not load it "
                                  "elsewhere either)") from None
        detail = re.search(r"WeightsUnpickler error: (.*?)( Check the documentation|$)", text)
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or not a checkpoint ("
                              f"{type(e).__name__}: {(detail[1] if detail else text)[:160]})") from None
    check_contents(ckpt, path)
    return ckpt


def check_contents(ckpt, path):
    """Refuse, naming the file and the entry: a departure from FORM, a config failing check_config, weights
    or optimiser state unfit for the network that config builds, a references run saved without its bank."""
    if problem := mismatch(ckpt, FORM):
        raise CheckpointError(f"{path}: not a checkpoint of this version: {problem}")
    cfg = check_config(config_from_dict(ckpt["config"], path), origin=path)   # a ConfigError names the entry
    with torch.device("meta"):                                     # shapes only: nothing is allocated
        net = build_model(cfg)
    weights, shapes = {k: t.shape for k, t in net.state_dict().items()}, [p.shape for p in net.parameters()]
    if problem := next((p for k in ("student", "teacher") if (p := mismatch(ckpt[k], weights, k))), None):
        raise CheckpointError(f"{path}: does not fit the network its config builds: {problem}")
    if sum(len(group.get("params", ())) for group in ckpt["optimizer"]["param_groups"]) != len(shapes) or any(
            i >= len(shapes) or t is not None and t.ndim and t.shape != shapes[i]
            for i, state in ckpt["optimizer"]["state"].items() for t in state.values()):
        raise CheckpointError(f"{path}: optimizer does not fit the {len(shapes)} parameters of its network")
    if cfg.references and (ckpt["bank"] is None or ckpt["pool"] is None):
        raise CheckpointError(f"{path}: references=true, but saved without its reference bank or CoT texts")


def config_from_dict(saved, path):
    """The Config a checkpoint was written with; keys this version does not know are refused by name."""
    if unknown := sorted(set(saved) - {f.name for f in dataclasses.fields(Config)}):
        raise CheckpointError(f"{path}: its config has keys this version does not know ("
                              f"{', '.join(unknown)}); read it with the version of the code that wrote it")
    return Config(**saved)


def load_checkpoint(path, device):
    """The student network (eval mode, on device), its config and the whole checkpoint dict."""
    ckpt = read_checkpoint(path)
    model = build_model(cfg := Config(**ckpt["config"]))
    model.load_state_dict(ckpt["student"])
    return model.to(device).eval(), cfg, ckpt


def rng_state():
    """This process's random states as data: torch's and its CUDA device's tensors, numpy's list, Python's."""
    kind, key, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, key.tolist(), *rest], "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    """Restore the random states rng_state() returned (CUDA's where this process has a device)."""
    (kind, keys, *rest), (version, internal, gauss) = state["numpy"], state["python"]
    torch.set_rng_state(state["torch"])
    np.random.set_state((kind, np.array(keys, np.uint32), *rest))
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed):
    """Seed Python's, numpy's and torch's generators alike."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_changes(saved, cfg, path):
    """[(key, saved value, new value)] where cfg differs from a saved config dict (a missing key: default)."""
    old, new = (json.loads(json.dumps(dataclasses.asdict(c)))                    # tuples and lists alike
                for c in (config_from_dict(saved, path), cfg))
    return [(k, old[k], new[k]) for k in new if old[k] != new[k]]


def check_run_folder(cfg, world, resume=False, force=False, stop_at=None):
    """Before anything is read or written: the checkpoint --resume continues (checked, as many processes,
    config compared, iterations left), or (unless force) a refusal to replace a run with another config."""
    path, record, ckpt = Path(cfg.out_dir) / "ckpt_last.pt", Path(cfg.out_dir) / "config.json", None
    if resume:
        if not path.exists():
            raise CheckpointError(f"--resume: no checkpoint at {path} (train without --resume first)")
        ckpt = read_checkpoint(path)
        if len(ckpt["ranks"]) != world.size:
            raise CheckpointError(f"--resume: {path} was written by {len(ckpt['ranks'])} process(es); resume "
                                  f"it with the same number, not {world.size}")
        if fixed := [c for c in config_changes(ckpt["config"], cfg, path) if c[0] not in RESUMABLE]:
            raise ConfigError(f"--resume: {path} was trained with a different config (" + ", ".join(
                f"{k}={show(a)} now {show(b)}" for k, a, b in fixed) + "); resuming may change only "
                f"{', '.join(RESUMABLE)}. Give the checkpoint's values, train a new run elsewhere "
                "(--out_dir=...), or replace this one with --force instead of --resume")
        if cfg.max_iters <= ckpt["iter"]:
            raise ConfigError(f"--resume: {path} is at iteration {ckpt['iter']}, max_iters={cfg.max_iters} "
                              "leaves nothing to train; raise --max_iters, or test it with test.py")
    elif not force and (what := path if path.exists() else record).exists():
        fix = "train elsewhere with --out_dir=..., continue it with --resume, or replace it with --force"
        try:
            saved = read_checkpoint(path)["config"] if what == path else json.loads(record.read_text())
            saved.pop("provenance", None)                               # config.json's record of the machine
            changes = [f"{k}={show(a)} there, {show(b)} here" for k, a, b in config_changes(saved, cfg, what)
                       if k != "out_dir"]
        except (CersError, ValueError, TypeError) as e:
            raise ConfigError(f"{path.parent} holds a run whose config is unreadable ({e}); {fix}") from None
        if changes:
            raise ConfigError(f"{path.parent} holds a run with another config ({', '.join(changes[:4])}"
                              f"{', ...' if len(changes) > 4 else ''}; from {what.name}); {fix}")
    if stop_at is not None and stop_at <= (at := ckpt["iter"] if ckpt else 0):
        raise ConfigError(f"--stop-at={stop_at}: the run is already at iteration {at}")
    return ckpt
