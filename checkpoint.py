"""Checkpoints: written atomically, read back into a network rebuilt from the config they carry.

A checkpoint holds everything a run needs to continue exactly (STYLE.md, "Checkpoints resume"):
student, teacher, optimiser, iteration, every rank's sampler and random states, the reference bank,
the CoT texts and the whole config. train.py writes and resumes them; test.py and retrieve.py read
the student back with load_checkpoint, which builds the network from the saved config.
"""
import random
from pathlib import Path

import numpy as np
import torch

from config import Config
from model import build_model


def save_checkpoint(path, **state):
    """Write atomically (temp file + rename) so an interrupted save never corrupts the last checkpoint."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path, device):
    """The student network (eval mode), its config and the whole checkpoint dict, rebuilt from what was saved."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    cfg = Config(**ckpt["config"])
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
