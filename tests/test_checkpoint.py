"""Checkpoints are data: written and read as tensors and plain Python values only (weights_only), random
states restored exactly, and every entry checked against the network its config builds before use."""
import dataclasses
import io
import os
import random

import numpy as np
import pytest
import torch

import checkpoint as C
from config import cli, get_config, init_world
from model import build_model


@pytest.fixture(scope="module")
def state():
    """A checkpoint's entries as train.py writes them, for a small network after one optimiser step."""
    cfg = get_config("PHANTOM_8", ["--references=false", "--base_filters=4"])
    net = build_model(cfg)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    rank = {"sampler": {"gen": torch.Generator().get_state(), "orders": [[1, 0], [0]], "pos": [1, 0]},
            "rng": C.rng_state(), "ref_gen": torch.Generator().get_state()}
    return dict(config=dataclasses.asdict(cfg), iter=2, world_size=1, student=net.state_dict(),
                teacher=net.state_dict(), optimizer=optimizer.state_dict(), ranks=[rank], bank=None,
                pool=None, split={"labeled": ["A"], "unlabeled": ["B"], "test": ["C"]})


def write(path, ckpt):
    """ckpt saved as torch.save writes any object: what a damaged or malicious file holds."""
    torch.save(ckpt, path)
    return path


def refused(capsys, path, *words):
    """Reading path as an entry point does: exit status 2 and one line naming the file and every word."""
    capsys.readouterr()
    assert cli(lambda argv: C.read_checkpoint(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(word in err for word in words), (words, err)


def test_a_checkpoint_round_trips_as_data(state, tmp_path):
    path = tmp_path / "ckpt.pt"
    C.save_checkpoint(path, **state)
    torch.load(path, weights_only=True)                       # nothing in it needs unpickling
    model, cfg, ckpt = C.load_checkpoint(path, "cpu")
    assert cfg.base_filters == 4 and ckpt["iter"] == 2 and not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state["student"].values()))
    with pytest.raises(TypeError, match=r"\['student'\] is ndarray"):         # the writer keeps to FORM
        C.save_checkpoint(path, **{**state, "student": np.zeros(3)})


def test_random_states_are_restored_exactly_from_data():
    C.seed_everything(3)
    random.random(), np.random.rand(), torch.rand(1)          # the states moved on from the seed
    torch.save(C.rng_state(), buffer := io.BytesIO())
    draws = lambda: (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    first = draws()
    C.set_rng_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert draws() == first


def test_deterministic_turns_autotuning_off_and_deterministic_kernels_on(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ, CUBLAS_WORKSPACE_CONFIG=""))
    for deterministic in (True, False):
        init_world(get_config("PHANTOM_8", [f"--deterministic={deterministic}", "--device=cpu"]))
        assert torch.are_deterministic_algorithms_enabled() == deterministic != torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ""        # setdefault: a user's own setting stays
    monkeypatch.delitem(os.environ, "CUBLAS_WORKSPACE_CONFIG")
    init_world(get_config("PHANTOM_8", ["--deterministic=true", "--device=cpu"]))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    init_world(get_config("PHANTOM_8", ["--device=cpu"]))


class Marker:
    """Pickles as a call that creates a file: what an unsafe checkpoint could run while it loads."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_unsafe_files_are_refused_unrun_and_damaged_or_missing_ones_named(state, tmp_path, capsys):
    marker = tmp_path / "marker"
    for i, evil in enumerate([{"student": Marker(marker)}, {"bank": {"features": Marker(marker)}}]):
        refused(capsys, write(tmp_path / f"evil{i}.pt", {**state, **evil}), "refused", "open")
    refused(capsys, write(tmp_path / "numpy.pt", {**state, "student": np.zeros(3, dtype=object)}), "numpy")
    assert not marker.exists()
    (tmp_path / "text.pt").write_text("a text file, not a checkpoint\n" * 10)
    refused(capsys, tmp_path / "text.pt", "not a checkpoint")                  # truncated: test_bad_input.py
    refused(capsys, tmp_path / "none.pt", "no checkpoint there")


def test_contents_are_checked_naming_the_entry(state, tmp_path, capsys):
    cfg, student, rank = state["config"], state["student"], state["ranks"][0]
    key = next(iter(student))
    cases = [
        ("patch_size='32,32,32'", dict(config={**cfg, "patch_size": "32,32,32"})),
        ("stride_xy=64", dict(config={**cfg, "stride_xy": 64})),
        ("not_a_key", dict(config={**cfg, "not_a_key": 1})),
        ("['iter'] is bool", dict(iter=True)),
        ("['student'] is list", dict(student=list(student.values()))),
        (f"['student']['{key}'] is str", dict(student={**student, key: "weights"})),
        ("meta device", dict(student={k: v.to("meta") for k, v in student.items()})),
        (f"teacher['{key}'] is (3,)", dict(teacher={**student, key: torch.zeros(3)})),
        (f"student['{key}'] is missing", dict(student={k: v for k, v in student.items() if k != key})),
        ("optimizer", dict(optimizer={**state["optimizer"], "param_groups": []})),
        ("['rng']['numpy'] is str", dict(ranks=[{**rank, "rng": {**rank["rng"], "numpy": "MT19937"}}])),
        ("['split'] is missing", dict(split=None))]
    for i, (words, change) in enumerate(cases):
        ckpt = {k: v for k, v in {**state, **change}.items() if not (k == "split" and v is None)}
        refused(capsys, write(tmp_path / f"bad{i}.pt", ckpt), words)

