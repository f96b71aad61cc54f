"""tune_filter.py: leave-one-case-out label transfer of the selected references, on hand-made cases whose
answers are known, and the command on a tiny LA-layout dataset."""
import dataclasses

import numpy as np
import pytest

import retrieve
import tune_filter
from config import Config, ConfigError

SIDES = {"A": 4, "B": 6, "C": 12, "D": 14}   # centred cubes: every orientation is the same patch
MASK_COTS = {"A": "alpha", "B": "bravo", "C": "charlie", "D": "delta"}
IMAGE_COTS = {"A": "delta", "B": "charlie", "C": "alpha", "D": "bravo"}   # each names one other case


def cubes():
    volumes = {}
    for c, s in SIDES.items():
        label = np.zeros((16, 16, 16), np.uint8)
        label[(slice((16 - s) // 2, (16 + s) // 2),) * 3] = 1
        volumes[c] = (label.astype(np.float32), label)
    return volumes


def cube_dice(a, b):
    """Dice of two centred cubes of sides a and b (the smaller lies inside the larger)."""
    return 2 * min(a, b) ** 3 / (a ** 3 + b ** 3)


def settings(**kw):
    return dataclasses.replace(Config(), **{"patch_size": (16, 16, 16), "bank_stride": (16, 16, 16),
                                            "k_coarse": 32, **kw})


def test_leave_one_out_never_scores_a_case_against_itself(monkeypatch):
    """Each case's nearest shape would be its own (Dice 1); the bank lacks it, so morphology alone takes the
    nearest other cube (A-B, C-D), and the filter the one its text names (A-D, B-C, C-A, D-B)."""
    seen = []

    def spy(bank, morph, texts, case_ids, cfg, rng=None, mode=None):
        seen.append((set(bank.case_ids), set(case_ids)))
        return retrieve.select(bank, morph, texts, case_ids, cfg, rng, mode)
    monkeypatch.setattr(tune_filter, "select", spy)
    rows = tune_filter.leave_one_out(settings(), cubes(), MASK_COTS, IMAGE_COTS, taus=(0.0, 0.5), ks=(1, 2))
    assert seen and all(not (bank & query) and len(bank) == 3 for bank, query in seen)
    nearest = {"A": "B", "B": "A", "C": "D", "D": "C"}
    named = {"A": "D", "B": "C", "C": "A", "D": "B"}
    cells = {(r["tau"], r["k"]): r for r in rows}
    assert list(cells) == [(0.0, 1), (0.0, 2), (0.5, 1), (0.5, 2)]
    for (tau, k), r in cells.items():
        for c in SIDES:
            fil, morph = r["cases"][c]
            assert fil == pytest.approx(cube_dice(SIDES[c], SIDES[named[c]]), abs=1e-6)
            if k == 1:
                assert morph == pytest.approx(cube_dice(SIDES[c], SIDES[nearest[c]]), abs=1e-6)
            assert fil < 1 and morph < 1
        assert r["filter"] == pytest.approx(np.mean([cube_dice(SIDES[c], SIDES[named[c]]) for c in SIDES]))
        # the candidates are the 12 patches of the other cases; at tau 0.5 the 8 of the unnamed two fall
        assert r["removed"] == pytest.approx(0.0 if tau == 0 else 8 / 12) and r["none_pass"] == 0
    table = tune_filter.format_table(rows)
    for column in ("filter", "morph"):
        assert f"{100 * cells[0.5, 1][column]:.2f} %" in table
    assert "66.7 %" in table and len(table.splitlines()) == 5


def test_aligned_transfer_lands_on_the_query():
    """Cubes off the centre, each case elsewhere: with ref_align each transferred cube is moved onto the
    query's, so the filter's pick (the case the text names) scores the Dice of two nested cubes exactly;
    without, the cubes meet less."""
    sides = {"A": 6, "B": 8, "C": 12, "D": 14}
    corners = {"A": (8, 16, 9), "B": (14, 7, 12), "C": (4, 12, 15), "D": (15, 10, 6)}  # centroids 6.5..24.5
    volumes = {}
    for c, s in sides.items():
        label = np.zeros((32, 32, 32), np.uint8)
        label[tuple(slice(o, o + s) for o in corners[c])] = 1
        volumes[c] = (label.astype(np.float32), label)
    cfg = settings(patch_size=(32, 32, 32), bank_stride=(32, 32, 32))
    aligned, = tune_filter.leave_one_out(dataclasses.replace(cfg, ref_align=True), volumes, MASK_COTS,
                                         IMAGE_COTS, taus=(0.5,), ks=(1,))
    plain, = tune_filter.leave_one_out(cfg, volumes, MASK_COTS, IMAGE_COTS, taus=(0.5,), ks=(1,))
    named = {"A": "D", "B": "C", "C": "A", "D": "B"}
    for c in sides:
        assert aligned["cases"][c][0] == pytest.approx(cube_dice(sides[c], sides[named[c]]), abs=1e-6)
        assert plain["cases"][c][0] <= aligned["cases"][c][0] + 1e-9
    assert plain["filter"] < aligned["filter"]


def test_command_on_a_tiny_dataset(tiny_la, capsys):
    tune_filter.main(["--exp", "LA_8", f"--data_root={tiny_la}", "--num_labeled=3", "--patch_size=16,16,16",
                      "--stride_xy=8", "--taus=0.5,0.9", "--ks=1,2", "--cache_dir="])
    out = capsys.readouterr().out
    assert "leave-one-out over 3 labeled cases" in out and "descriptors" in out
    table = out[out.index("  tau"):].splitlines()
    assert [line.split()[:2] for line in table[1:]] == [[t, k] for t in ("0.50", "0.90") for k in ("1", "2")]
    with pytest.raises(ConfigError, match="--taus"):
        tune_filter.main(["--exp", "LA_8", f"--data_root={tiny_la}", "--taus=1.5"])
