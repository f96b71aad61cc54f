"""Why a case got its references, and how much the CoT filter acts (docs/design.md §6): the command line of
reference selection.

    python explain.py --exp LA_8 --explain ID      # each candidate's distance, BM25 score and fate; a PNG
    python explain.py --exp LA_8 --filter-report   # the share of candidates the CoT filter rejects, per tau

A query patch's shape comes from decoder B of the experiment's last checkpoint, as in training and testing;
without a checkpoint a labeled case's ground truth stands in for it.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

import data
import phantom
import pool
from bank import ReferenceBank, grid_boxes
from checkpoint import CheckpointError, load_checkpoint
from config import ConfigError, cli, get_config
from morphology import morphology_batch
from retrieve import format_explanation, plot_explanation, select


def query_masks(cfg, image, label, boxes, labeled):
    """The query patches' masks (n, X, Y, Z): decoder B of the experiment's last checkpoint, as in training
    and testing; without a checkpoint, the ground truth of a labeled case. Other masks are never read."""
    ckpt = Path(cfg.out_dir) / "ckpt_last.pt"
    if ckpt.is_file():
        model, _, _ = load_checkpoint(ckpt, "cpu")
        patches = np.stack([data.padded_crop(image, b) for b in boxes])                # (n, X, Y, Z)
        x = torch.from_numpy(patches[:, None])                                          # (n, 1, X, Y, Z)
        with torch.no_grad():
            return (model.predict_b(x).argmax(1) == 1).numpy()
    if not labeled:
        raise CheckpointError(f"no checkpoint at {ckpt}: train first, or explain a labeled case (its mask is "
                              "known)")
    print(f"no checkpoint at {ckpt}: the labeled case's ground truth stands in for decoder B's prediction")
    return np.stack([data.padded_crop(label, b) > 0 for b in boxes])


def filter_report(bank, image_texts, cfg, taus=(0.5, 0.6, 0.7, 0.8, 0.9)):
    """How much the CoT filter acts, as lines of text. Every bank entry is a query: its ground-truth
    morphology, its case's image CoT, its own case excluded. Per tau: the share of the morphology candidates
    the BM25 stage rejects as hard negatives, the queries left with no survivor, the slots the fill rule
    fills and the distinct cases among the references."""
    ids = bank.case_ids
    lines = [f"{len(set(bank.texts))} distinct mask CoTs for {len(set(ids))} labeled cases, "
             f"{len(set(image_texts.values()))} distinct image CoTs for {len(image_texts)} cases; queries: "
             f"the {len(bank)} bank entries (ground-truth morphology, own case excluded), k_coarse "
             f"{cfg.k_coarse}, k_fine {cfg.k_fine}, at most {cfg.max_refs_per_case} per case"]
    for tau in taus:
        sel = select(bank, bank.morph, [image_texts[c] for c in ids], ids, dataclasses.replace(cfg, tau=tau))
        rejected = np.mean([rec["hard_negative"].mean() for rec in sel.explain])
        cases = np.mean([len({bank.case_ids[i] for i, w in zip(row, ws) if w > 0})
                         for row, ws in zip(sel.indices, sel.weights)])
        lines.append(f"tau {tau:.2f}: {100 * rejected:5.1f} % of candidates rejected, "
                     f"{100 * np.mean(sel.n_filled == cfg.k_fine):5.1f} % of queries with no survivor, "
                     f"{sel.n_filled.mean():.2f} of {cfg.k_fine} slots filled, "
                     f"{cases:.2f} distinct cases among the references")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description="Explain reference selection for one case, or report how "
                                                 "much the CoT filter acts.", allow_abbrev=False)
    parser.add_argument("--exp", default="LA_8", help="named experiment (config.py)")
    parser.add_argument("--explain", metavar="ID", help="case ID whose patches are the queries")
    parser.add_argument("--filter-report", action="store_true",
                        help="the share of morphology candidates the CoT filter rejects, for several tau")
    args, overrides = parser.parse_known_args(argv)
    if not (args.explain or args.filter_report):
        parser.error("give --explain ID or --filter-report")
    cfg = get_config(args.exp, overrides)
    pool.check_cache_writable(cfg)                     # before any data are read
    phantom.ensure_for(cfg)
    split = data.load_split(cfg.data_root, cfg.num_labeled, cfg.val_cases)
    if args.explain and args.explain not in split.labeled + split.unlabeled + split.test:
        raise ConfigError(f"--explain: case {args.explain!r} is in neither train.list nor test.list of "
                          f"{cfg.data_root}")
    volumes = data.load_volumes(cfg.data_root, split.labeled + split.unlabeled + split.test,
                                factor=cfg.downsample, cache_dir=cfg.cache_dir)
    texts = pool.build_pool(cfg, split, volumes)
    bank = ReferenceBank.build(cfg, volumes, split.labeled, texts.mask)
    if args.filter_report:
        print("\n".join(filter_report(bank, texts.image, cfg)))
        return
    image, label = volumes[args.explain]
    boxes = grid_boxes(label.shape, cfg.patch_size, cfg.bank_stride)
    morph = morphology_batch(query_masks(cfg, image, label, boxes, args.explain in split.labeled))
    sel = select(bank, morph, [texts.image[args.explain]] * len(boxes), [args.explain] * len(boxes), cfg)
    print(format_explanation(bank, sel, boxes))
    png = Path(cfg.out_dir) / f"explain_{args.explain}.png"
    print("figure:", plot_explanation(png, image, boxes, bank, sel))


if __name__ == "__main__":
    sys.exit(cli(main))
