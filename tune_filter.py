"""Measure the CoT filter's tau and k_fine without training (docs/design.md §6): leave-one-case-out label
transfer on the labeled cases.

Each labeled case in turn is the query and the bank holds the other labeled cases only. The query patches
are the case's ground truth cut on the bank's grid in each orientation (cfg.patch_size, cfg.bank_stride):
their morphology stands in for decoder B's prediction and the case's image-only CoT is the query text, as
in training. References are selected by morphology kNN alone (retrieval "morph") and with the CoT filter
("both") for each tau and k_fine of a grid; the references' weighted masks (bank.label_transfer, moved onto
the query's centroid with ref_align) are the label an atlas method would transfer, scored by Dice (at 0.5)
against the query's own ground truth. No network is involved: the references' own labels say whether the
filter picks references that fit the query better than morphology alone.

    python tune_filter.py --exp LA_8_LOW --data_root=data/LA [--taus=0.3,0.6,0.9] [--ks=1,4] [--key=value ...]

The CoT texts come from the offline descriptors reasoner unless --cot_backend says otherwise; they are read
from (and written to) the data root's CoT cache as pool.py does.
"""
import argparse
import dataclasses
import sys
import time

import numpy as np
import torch

import data
import phantom
import pool
from bank import ORIENTATIONS, ReferenceBank, grid_boxes, orient
from config import ConfigError, cli, get_config
from data import padded_crop
from morphology import mask_centroids, morphology_batch
from retrieve import select

TAUS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
KS = (1, 2, 4, 8)


def query_patches(cfg, label):
    """A labeled case's ground truth (X, Y, Z) cut as the bank's grid cuts it, in each of the ORIENTATIONS:
    (n, *patch) bool."""
    patches = []
    for v in range(len(ORIENTATIONS)):
        oriented = orient(label, v)
        boxes = grid_boxes(oriented.shape, cfg.patch_size, cfg.bank_stride)
        patches += [padded_crop(oriented, b) > 0 for b in boxes]
    return np.stack(patches)


def dice(pred, truth):
    """Dice (n,) of binary masks (n, X, Y, Z) torch bool, 1 where both are empty."""
    inter = (pred & truth).flatten(1).sum(1).float()
    total = (pred.flatten(1).sum(1) + truth.flatten(1).sum(1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), 1.0)


def transfer_dice(bank, sel, truth, centroids):
    """Mean Dice of the label the selection transfers (weighted masks > 0.5) against the queries' truth."""
    transfer = bank.label_transfer(sel.indices, sel.weights, centroids)             # (n, X, Y, Z)
    return float(dice(transfer > 0.5, truth).mean())


def leave_one_out(cfg, volumes, mask_cots, image_cots, taus=TAUS, ks=KS):
    """One row per (tau, k) in grid order: tau, k, the label transfer's Dice with the CoT filter ("filter")
    and without it ("morph"), both averaged over the cases (each case the mean over its query patches), the
    share of the morphology candidates the filter removes as hard negatives ("removed"), the share of
    queries none of whose candidates pass ("none_pass", selection then falls back to morphology), and per
    case (filter, morph) Dice ("cases"). mask_cots holds the labeled cases, volumes their (image, label)."""
    labeled = list(mask_cots)
    if len(labeled) < 2:
        raise ConfigError(f"tune_filter: leave-one-out needs at least 2 labeled cases, got {len(labeled)}")
    cells = {(tau, k): {} for tau in taus for k in ks}  # (tau, k) -> case -> (filter, morph, removed, none)
    for case in labeled:
        bank = ReferenceBank.build(cfg, volumes, [c for c in labeled if c != case], mask_cots)
        truth = query_patches(cfg, volumes[case][1])                               # (n, X, Y, Z)
        morph, texts, ids = morphology_batch(truth), [image_cots[case]] * len(truth), [case] * len(truth)
        truth = torch.from_numpy(truth)
        centroids = mask_centroids(truth) if cfg.ref_align else None              # (n, 3)
        for k in ks:
            plain = select(bank, morph, texts, ids, dataclasses.replace(cfg, k_fine=k), mode="morph")
            morph_dice = transfer_dice(bank, plain, truth, centroids)
            for tau in taus:
                at = dataclasses.replace(cfg, k_fine=k, tau=tau)
                sel = select(bank, morph, texts, ids, at, mode="both")
                removed = np.mean([rec["hard_negative"].mean() for rec in sel.explain])
                cells[tau, k][case] = (transfer_dice(bank, sel, truth, centroids), morph_dice, removed,
                                       np.mean(sel.n_filled == k))
    rows = []
    for (tau, k), per_case in cells.items():
        mean = np.mean(list(per_case.values()), 0)
        rows.append(dict(tau=tau, k=k, filter=mean[0], morph=mean[1], removed=mean[2], none_pass=mean[3],
                         cases={c: v[:2] for c, v in per_case.items()}))
    return rows


def format_table(rows):
    """The rows of leave_one_out as a text table, percentages."""
    lines = [f"{'tau':>5} {'k':>3} {'Dice filter':>12} {'Dice morph':>11} {'removed':>8} {'none pass':>10}"]
    for r in rows:
        lines.append(f"{r['tau']:>5.2f} {r['k']:>3} {100 * r['filter']:>10.2f} % {100 * r['morph']:>9.2f} % "
                     f"{100 * r['removed']:>6.1f} % {100 * r['none_pass']:>8.1f} %")
    return "\n".join(lines)


def parse_grid(flag, text, kind, ok, what):
    """A comma-separated grid of numbers, each passing ok, or a ConfigError naming the flag and the value."""
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(ok(v) for v in values):
        raise ConfigError(f"tune_filter: --{flag}={text!r} must be comma-separated {what}")
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description="Leave-one-case-out label transfer of chosen references, "
                                     "with and without the CoT filter, over a grid of tau and k_fine.",
                                     allow_abbrev=False)
    parser.add_argument("--exp", default="LA_8_LOW", help="named experiment (config.py)")
    parser.add_argument("--taus", default=",".join(map(str, TAUS)), help="tau grid, e.g. 0.3,0.6,0.9")
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="k_fine grid, e.g. 1,2,4")
    args, overrides = parser.parse_known_args(argv)
    taus = parse_grid("taus", args.taus, float, lambda v: 0 <= v <= 1, "numbers in [0, 1]")
    ks = parse_grid("ks", args.ks, int, lambda v: v >= 1, "whole numbers >= 1")
    cfg = get_config(args.exp, ["--cot_backend=descriptors", *overrides])    # offline unless overridden
    phantom.ensure_for(cfg)
    split = data.load_split(cfg.data_root, cfg.num_labeled, cfg.val_cases)
    volumes = data.load_volumes(cfg.data_root, split.labeled, factor=cfg.downsample, cache_dir=cfg.cache_dir)
    cots = pool.build_pool(cfg, dataclasses.replace(split, unlabeled=[], test=[]), volumes)  # labeled only
    start = time.perf_counter()
    rows = leave_one_out(cfg, volumes, cots.mask, cots.image, taus, ks)
    n = sum(len(query_patches(cfg, volumes[c][1])) for c in split.labeled)
    seconds = time.perf_counter() - start
    print(f"leave-one-out over {len(split.labeled)} labeled cases of {cfg.data_root}, {n} query patches "
          f"(downsample {cfg.downsample}, patch {cfg.patch_size}, k_coarse {cfg.k_coarse}, at most "
          f"{cfg.max_refs_per_case} per case, ref_align {cfg.ref_align}) in {seconds:.1f} s:"
          "\nlabel transfer Dice with the CoT filter and with morphology alone, the share of the candidates "
          "the filter removes, the share of queries none of whose candidates pass")
    print(format_table(rows))


if __name__ == "__main__":
    sys.exit(cli(main))
