"""Ablations (docs/design.md §9): what each part of CERS adds, with the same seeds and iterations.

    python train.py --exp PHANTOM_8 --ablation cers,no_references --seeds 3

Each named variant is the experiment with a few keys changed; each is trained and tested per seed into
<out_dir>/ablation/<name>/seed<S>, and the table of every run found there (mean ± std over seeds of each
run's mean over the test cases) is printed and written to <out_dir>/ablation/table.md. train.py's command
line runs this with its train-and-test function, so this file needs neither training nor testing code.
"""
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

import data
import files
import phantom

from checkpoint import check_run_folder
from config import ConfigError
from distributed import World, main_process

SUPERVISED = {"references": False, "consistency": 0.0, "unlabeled_mix": False, "mix_labeled": False,
              "strong_view": False}
ALL = "all"                                            # num_labeled: every ID of train.list (less validation)
# the reference path as the paper has it: image features only, none of the reference extensions, whatever the
# experiment or the command line turned on (the experiment's training extensions stay, as in every row)
PAPER = {"references": True, "retrieval": "both", "mcam_gates": True, "ref_masks": False,
         "ref_mask_detail": False, "ref_align": False, "ref_counterfactual": 0.0, "ref_proto_weight": 0.0}
EARNED = {"ref_masks": True, "ref_align": True}           # the references that carry their aligned masks ...
ABLATIONS = {
    "cers": {},                                        # full CERS, as configured
    "paper": PAPER,                                    # CERS as the paper has it (what `cers` is by default)
    "ref_masks": {"ref_masks": True},                  # references carry their masks (beyond the paper)
    "no_cot_filter": {"retrieval": "morph"},           # references by morphology alone
    "no_mcam": {"mcam_gates": False},                  # context added without coordinate-attention gates
    "no_references": {"references": False},            # the plain dual-decoder mean teacher
    "ref_masks_random": {"ref_masks": True, "retrieval": "random"},  # an atlas prior without retrieval
    "ref_aligned": EARNED,                             # mask-carrying references aligned to the query
    # ... with training that teaches when to trust them (random references or none on 30 % of the steps),
    # with the loss in which the query's prototypes segment them, and with both
    "ref_counterfactual": {**EARNED, "ref_counterfactual": 0.3},
    "ref_proto": {**EARNED, "ref_proto_weight": 1.0},
    "cers_counterfactual": {**EARNED, "ref_counterfactual": 0.3, "ref_proto_weight": 1.0},
    "supervised_only": SUPERVISED,                     # labeled patches alone
    "supervised_all": {**SUPERVISED, "num_labeled": ALL},  # every training case labeled: the room above
}
# paired comparisons: each variant's Dice minus its baseline's, seed by seed (the unlabeled cases' share of
# the room; what references add to the network trained without them)
BASELINE = {"no_references": "supervised_only", "supervised_all": "supervised_only"}
BASELINE.update({name: "no_references" for name in (
    "cers", "paper", "ref_masks", "no_cot_filter", "no_mcam", "ref_masks_random", "ref_aligned",
    "ref_counterfactual", "ref_proto", "cers_counterfactual")})
# the table: (summary key, heading, scale); the sensitivity columns exist for runs with references
TABLE = [("dice", "Dice %", 100), ("jaccard", "Jaccard %", 100), ("hd95", "95HD", 1), ("asd", "ASD", 1),
         ("dice_a", "A %", 100), ("dice_b", "B %", 100), ("dice_a_random", "A, random refs %", 100),
         ("dice_a_zeroed", "A, refs zeroed %", 100), ("ref_gain", "A: retrieved - random, points", 100),
         ("ref_delta", "mean abs dp(A) x1e-3", 1000), ("transfer", "transfer %", 100),
         ("transfer_random", "transfer, random %", 100), ("run_seconds", "minutes", 1 / 60)]


def ablation_names(text):
    """The variants named by --ablation: 'all' or a comma list of ABLATIONS' keys."""
    names = list(ABLATIONS) if text == "all" else text.split(",")
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ConfigError(f"--ablation: unknown {unknown}; known: {', '.join(ABLATIONS)}")
    return names


def run_ablation(cfg, names, seeds, train_and_test, force=False):
    """Train and test each ablation of one experiment with each seed (train_and_test(cfg, force) -> the test
    summary, None on the ranks that do not test); then print and save the table of every run found under
    <out_dir>/ablation (so later runs add seeds or rows to it). Every run folder is checked before the first
    one trains."""
    variants = [dataclasses.replace(cfg, seed=seed, out_dir=f"{cfg.out_dir}/ablation/{name}/seed{seed}",
                                    **resolved(ABLATIONS[name], cfg)) for name in names for seed in seeds]
    for variant in variants:
        check_run_folder(variant, World(), force=force)
    for variant in variants:
        t = time.time()
        summary = train_and_test(variant, force)
        if summary is not None:
            summary["run_seconds"] = time.time() - t
            files.write_text(Path(variant.out_dir, "test", "summary.json"), json.dumps(summary, indent=1))
    if main_process():
        table = ablation_table(Path(cfg.out_dir, "ablation"), f"{cfg.exp}, {cfg.max_iters} iterations")
        print("\n" + table)
        files.write_text(Path(cfg.out_dir, "ablation", "table.md"), table + "\n")


def resolved(changes, cfg):
    """An ablation's config changes with num_labeled=ALL made a count: every training case (less the
    validation split), each batch all labeled."""
    if changes.get("num_labeled") != ALL:
        return changes
    phantom.ensure_for(cfg)
    split = data.load_split(cfg.data_root, 1, cfg.val_cases)
    return {**changes, "num_labeled": len(split.labeled + split.unlabeled), "labeled_bs": cfg.batch_size}


def mean_spread(values, sign=""):
    """'mean ± spread' of values over seeds; the spread is the sample standard deviation (n - 1), so a few
    seeds do not look steadier than they are; one value has none."""
    mean = round(float(np.mean(values)), 2) + 0.0                      # + 0.0: a -0.00 reads 0.00
    return f"{mean:{sign}.2f}" + (f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")


def paired_table(folder):
    """Markdown lines: per variant with a baseline, Dice (points) minus the baseline's on the same seed, for
    each seed both have, with the mean, the seed spread and the count of seeds where it is above."""
    lines = ["| variant − baseline | per seed (Dice points) | mean ± std | above on |",
             "|---|---|---|---|"]
    for name, base in BASELINE.items():
        dice = {b: {p.parent.parent.name: 100 * json.loads(p.read_text())["dice"]["mean"]
                    for p in Path(folder, b).glob("seed*/test/summary.json")} for b in (name, base)}
        seeds = sorted(set(dice[name]) & set(dice[base]), key=lambda s: int(s[4:]))
        if seeds:
            gain = np.array([dice[name][s] - dice[base][s] for s in seeds])
            per_seed = ", ".join(f"{s[4:]}: {g:+.2f}" for s, g in zip(seeds, gain))
            lines.append(f"| {name} − {base} | {per_seed} | {mean_spread(gain, '+')} | "
                         f"{(gain > 0).sum()} of {len(gain)} |")
    return lines if len(lines) > 2 else []


def ablation_table(folder, title):
    """A markdown table of every ablation run under `folder`: per variant, the mean ± std over its seeds of
    each run's mean over the test cases (the std, n - 1, is the seed spread)."""
    lines = [f"{title}; last checkpoints; mean ± std over seeds (n - 1)",
             "| variant | seeds | " + " | ".join(head for _, head, _ in TABLE) + " |",
             "|---|---|" + "---|" * len(TABLE)]
    for name in ABLATIONS:
        runs = [json.loads(p.read_text()) for p in sorted(Path(folder, name).glob("seed*/test/summary.json"))]
        if not runs:
            continue
        cells = []
        for key, _, scale in TABLE:
            values = [scale * (r[key]["mean"] if isinstance(r[key], dict) else r[key])
                      for r in runs if key in r]
            cells.append(mean_spread(values) if values else "–")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    paired = paired_table(folder)
    return "\n".join(lines + ([""] + paired if paired else []))
