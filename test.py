"""Testing (docs/design.md §10) of the last checkpoint (never one chosen on the test set): sliding-window
inference, the field's metrics, decoder A's reference sensitivity, ablation tables, why references are chosen.

    python test.py                          # runs/LA_8/ckpt_last.pt on its test list (validation split with
    python test.py --exp PHANTOM_8 --lcc    #   val_cases); --lcc keeps the largest connected component
    python test.py --ckpt path/to/ckpt.pt   # any checkpoint; the model is rebuilt from its config
    python test.py --window_batch=2         # test-time keys: window_batch, stride_xy, stride_z, device, amp
    python test.py --exp LA_8 --explain ID  # why a case got its references (text and a PNG)
    python test.py --exp LA_8 --filter-report   # the share of candidates the CoT filter rejects, per tau

Metrics are medpy.metric.binary's (dc, jc, hd95, asd) in voxels, without spacing; where medpy raises on
empty masks: both empty scores Dice 1, Jaccard 1, 95HD 0, ASD 0; one empty scores Dice 0, Jaccard 0, 95HD and
ASD the volume's diagonal (the largest distance possible: an empty prediction is never flattered)."""
import argparse
import dataclasses
import json
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage, optimize, stats
from tqdm import tqdm

import data
import phantom
import pool
import retrieve
from checkpoint import CheckpointError, load_checkpoint
from config import (ConfigError, check_config, check_writable, cli, fast_paths, get_config, resolve_device,
                    save_figure, show, write_text)


def dice(pred, gt):
    """2 |P & G| / (|P| + |G|)  (medpy dc)."""
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(pred & gt) / total


def jaccard(pred, gt):
    """|P & G| / |P | G|  (medpy jc)."""
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def surface_distances(a, b):
    """Distance of every surface voxel of `a` to the nearest surface voxel of `b` (medpy's; a surface is the
    mask minus its 6-connected erosion), on the joint bounding box plus one voxel: the same, faster."""
    where = np.argwhere(a | b)
    box = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in zip(where.min(0), where.max(0)))
    a, b = (m ^ ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(3, 1))
            for m in (a[box], b[box]))                                          # the surfaces
    return ndimage.distance_transform_edt(~b)[a]


def hd95(pred, gt):
    """95th percentile of the symmetric surface distances (medpy hd95); 0 or the diagonal for empty masks."""
    if not (pred.any() and gt.any()):
        return 0.0 if not (pred.any() or gt.any()) else float(np.linalg.norm(pred.shape))
    return float(np.percentile(np.hstack([surface_distances(pred, gt), surface_distances(gt, pred)]), 95))


def asd(pred, gt):
    """Mean distance from the prediction's surface to the ground truth's (medpy asd: one direction)."""
    if not (pred.any() and gt.any()):
        return hd95(pred, gt)                                   # the same score for empty masks
    return float(surface_distances(pred, gt).mean())


def largest_component(mask):
    """Keep the largest 26-connected component (the field's optional post-processing)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    return mask if n <= 1 else labels == (np.bincount(labels.ravel())[1:].argmax() + 1)


METRICS = {"dice": dice, "jaccard": jaccard, "hd95": hd95, "asd": asd}
# foreground probabilities (X, Y, Z) of one volume in predictor()'s order: decoder A (retrieved references
# when there is a bank), decoder B, then for the sensitivity report decoder A with random and zeroed ones
Probabilities = namedtuple("Probabilities", "a b a_random a_zeroed", defaults=(None, None))


def window_starts(size, patch, stride):
    """Window origins along one axis: every `stride`, the last one flush with the end."""
    return sorted({min(i * stride, size - patch) for i in range(int(np.ceil((size - patch) / stride)) + 1)})


@torch.no_grad()
def sliding_window(predict, image, patch, stride_xy, stride_z, window_batch, device):
    """Per-window probabilities predict(x (N, 1, *patch)) -> (N, K, *patch) averaged over image (X, Y, Z)
    numpy, zero-padded when smaller than the patch: (K, X, Y, Z) numpy. Out of memory: a ConfigError."""
    padded = data.pad_to(torch.as_tensor(image, dtype=torch.float32, device=device), patch)   # (X', Y', Z')
    size = padded.shape
    axes = [window_starts(n, p, s) for n, p, s in zip(size, patch, (stride_xy, stride_xy, stride_z))]
    starts = [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]
    total, count = None, torch.zeros(size, device=device)
    for i in range(0, len(starts), window_batch):
        chunk = starts[i:i + window_batch]
        windows = torch.stack([data.crop(padded, s, patch) for s in chunk])[:, None]   # (N, 1, *patch)
        try:
            prob = predict(windows).float()                                             # (N, K, *patch)
        except RuntimeError as e:                      # torch.cuda.OutOfMemoryError is a RuntimeError too
            if "out of memory" not in str(e):
                raise
            raise ConfigError(f"test: out of memory on {device} with window_batch={window_batch} windows of "
                              f"patch_size={show(patch)} at once; lower --window_batch=...") from None
        total = torch.zeros((prob.shape[1], *size), device=device) if total is None else total
        for s, p in zip(chunk, prob):
            data.crop(total, s, patch).add_(p)
            data.crop(count, s, patch).add_(1)
    lo = [(p - s) // 2 for p, s in zip(size, image.shape)]                # undo the symmetric padding
    return (total / count)[(slice(None), *(slice(o, o + s) for o, s in zip(lo, image.shape)))].cpu().numpy()


def load_references(cfg, ckpt, path, device, cases=()):
    """The reference bank a CERS checkpoint was trained with, queried with its image CoTs; those of `cases` it
    lacks (test cases added since training) the pool builds as in training."""
    labeled, texts = ckpt["split"]["labeled"], dict(ckpt["pool"]["image"])
    if new := [c for c in cases if c not in texts]:
        pool.check_cache_writable(cfg)                 # before any data are read
    volumes = data.load_volumes(cfg.data_root, labeled + new, progress=False, factor=cfg.downsample,
                                cache_dir=cfg.cache_dir)
    bank = retrieve.ReferenceBank.build(cfg, volumes, labeled, ckpt["pool"]["mask"], device)
    try:
        bank.load_state_dict(ckpt["bank"])
    except ValueError as e:
        raise CheckpointError(f"{path}: its reference bank does not fit the labeled case files now in "
                              f"{cfg.data_root} ({e}); restore them") from None
    if new:
        built = pool.build_pool(cfg, data.Split(cfg.data_root, [], [], new), volumes, progress=False)
        texts.update(built.image)
    bank.index_queries(texts)
    return bank


def predictor(model, cfg, case_id, bank=None, generator=None, sensitivity=False, bf16=False,
              channels_last=False):
    """predict(x) for sliding_window: (N, 1, *patch) -> (N, K, *patch) as in Probabilities; with a bank, the
    training path (decoder B, its references, decoder A); `sensitivity` adds A with random, zeroed ones."""
    swaps = ("retrieved", "random", "zeroed")[:3 if sensitivity else 1]
    def predict(x):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            feats = model.encoder(x)
            b = model.decoder_b(feats)
            a = ({"retrieved": model.decode_a(feats).float().softmax(1)[:, 1]} if bank is None else
                 retrieve.decoder_a_probabilities(model, feats, b, [case_id] * len(x), bank, cfg, generator,
                                                  swaps))
        return torch.stack([a["retrieved"], b.float().softmax(1)[:, 1], *(a[s] for s in swaps[1:])], 1)
    return predict


def score(prob, gt, lcc):
    """The metrics of the mean of both decoders > 0.5 (largest component only with lcc) against gt, and each
    decoder's own Dice; with the sensitivity outputs, decoder A's Dice with random and zeroed references."""
    pred = (prob.a + prob.b) / 2 > 0.5                                    # the reported prediction
    pred = largest_component(pred) if lcc else pred
    row = {k: f(pred, gt) for k, f in METRICS.items()}
    row.update({f"dice_{k}": dice(p > 0.5, gt) for k, p in prob._asdict().items() if p is not None})
    if prob.a_random is not None:                          # ref_gain is paired: same case, same network
        row.update(ref_delta=float(np.abs(prob.a - prob.a_random).mean()),
                   ref_gain=row["dice_a"] - row["dice_a_random"])
    return row


TEST_KEYS = ("window_batch", "stride_xy", "stride_z", "device", "amp")   # what may change at test time


def with_test_keys(cfg, overrides):
    """A checkpoint's config with `--key=value` overrides of the TEST_KEYS, parsed and checked as training's
    command line is; the device is this machine's ("auto") unless given. Any other key is the checkpoint's."""
    keys = [item.removeprefix("--").partition("=")[0] for item in overrides]
    if bad := [item for item, key in zip(overrides, keys) if "=" not in item or key not in TEST_KEYS]:
        raise ConfigError(f"test: {bad[0]!r} cannot change at test time; give --key=value with a key of "
                          f"{', '.join(TEST_KEYS)} (the checkpoint's config fixes the rest)")
    parsed = get_config(cfg.exp, [f"--patch_size={show(cfg.patch_size)}", *overrides]) if keys else None
    changes = {"device": "auto", **{k: getattr(parsed, k) for k in keys}}
    return check_config(dataclasses.replace(cfg, **changes))


def evaluate(ckpt_path, lcc=False, out_dir=None, device=None, progress=True, sensitivity=True, overrides=()):
    """Test a checkpoint on the data's test list (validation split with val_cases): print the table, write
    per_case.csv, summary.json and the figures, return the summary. `sensitivity` adds decoder A with random
    and zeroed references; a coarser grid's model is scored there ("low_" keys) and on the original labels."""
    model, cfg, ckpt = load_checkpoint(ckpt_path, "cpu")
    cfg = with_test_keys(cfg, overrides)
    device = torch.device(device) if device else resolve_device(cfg)
    out = check_writable(out_dir or Path(cfg.out_dir) / "test")      # before the data are read
    data.check_volume_cache_writable(cfg)
    split = data.load_split(cfg.data_root, cfg.num_labeled, cfg.val_cases)
    if seen := [c for c in split.test if c in ckpt["split"]["labeled"] + ckpt["split"]["unlabeled"]]:
        raise CheckpointError(f"{ckpt_path}: test case {seen[0]!r} was trained on (the lists in "
                              f"{cfg.data_root} changed since); score it with the lists it was trained with")
    bank = load_references(cfg, ckpt, ckpt_path, device, split.test) if cfg.references else None
    bf16, channels_last = fast_paths(cfg, device)
    model = model.to(device, memory_format=torch.channels_last_3d if channels_last else torch.preserve_format)
    sensitivity = sensitivity and bank is not None
    rows, shown, seconds = [], [], []
    for n, case_id in enumerate(tqdm(split.test, desc="testing", disable=not progress, leave=False)):
        image, label = data.read_case(data.case_path(cfg.data_root, case_id))       # the original grid
        low_image, low_label = data.downsample(image, label, cfg.downsample)       # the model's grid
        t, generator = time.time(), torch.Generator().manual_seed(cfg.seed + n)   # the random references
        predict = predictor(model, cfg, case_id, bank, generator, sensitivity, bf16, channels_last)
        stack = sliding_window(predict, low_image, cfg.patch_size, cfg.stride_xy, cfg.stride_z,
                               cfg.window_batch, device)                                 # (K, x, y, z)
        seconds.append(time.time() - t)
        low = score(Probabilities(*stack), low_label.astype(bool), lcc) if cfg.downsample > 1 else {}
        prob = Probabilities(*data.upsample_probabilities(stack, cfg.downsample, image.shape))
        gt = label.astype(bool)
        rows.append({"case": case_id, **score(prob, gt, lcc), **{f"low_{k}": low[k] for k in METRICS if low}})
        if len(shown) < 4:
            shown.append((case_id, image, gt, prob))
    lines = [",".join(rows[0])] + [",".join(map(str, r.values())) for r in rows]     # case IDs have no commas
    write_text(out / "per_case.csv", "\n".join(lines) + "\n")
    summary = {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
               for k in rows[0] if k != "case"}
    summary.update(checkpoint=str(ckpt_path), iteration=ckpt["iter"], lcc=lcc, cases=len(rows),
                   scored=split.scored, seconds_per_volume=float(np.median(seconds)), sensitivity=sensitivity,
                   config=dataclasses.asdict(cfg))
    write_text(out / "summary.json", json.dumps(summary, indent=1))
    print_table(rows, summary, cfg)
    figures = [plot_cases(shown, out / "predictions.png")]
    if bank is not None:                           # why the first test case's first window got its references
        image, boxes, sel = explain_case(model, bank, cfg, split.test[0], [(0, 0, 0, *cfg.patch_size)],
                                         device)
        figures.append(retrieve.plot_explanation(out / "references.png", image, boxes, bank, sel, max_rows=1))
    print(f"wrote {out / 'per_case.csv'}, {out / 'summary.json'}, " + ", ".join(map(str, figures)))
    return summary


def print_table(rows, summary, cfg):
    """The per-case table, its mean ± std, each decoder alone and the reference sensitivity."""
    print(f"\n{cfg.exp}: last checkpoint (iteration {summary['iteration']}), largest connected component "
          f"{'ON' if summary['lcc'] else 'off'}, {len(rows)} {summary['scored']} cases")
    print(f"{'case':24s}" + "".join(f"{h:>12s}" for _, h, _ in TABLE[:4]))        # the metrics' columns
    for r in rows:
        print(f"{r['case']:24s}" + "".join(f"{s * r[k]:12.2f}" for k, _, s in TABLE[:4]))
    print(f"{'mean ± std':24s}" + "".join(f"{s * summary[k]['mean']:7.2f}±{s * summary[k]['std']:<4.2f}"
                                          for k, _, s in TABLE[:4]))
    sensitivity = summary["sensitivity"]
    pct = {k: 100 * v["mean"] for k, v in summary.items() if isinstance(v, dict) and "mean" in v}   # in %
    if cfg.downsample > 1:
        print(f"the table is on the original grid (the prediction upsampled {cfg.downsample}x); on the "
              f"model's grid: Dice {pct['low_dice']:.2f} %, Jaccard {pct['low_jaccard']:.2f} %, 95HD "
              f"{summary['low_hd95']['mean']:.2f}, ASD {summary['low_asd']['mean']:.2f} (its voxels)")
    print(f"decoder A alone: Dice {pct['dice_a']:.2f} %, decoder B alone: {pct['dice_b']:.2f} %; "
          f"{summary['seconds_per_volume']:.2f} s per volume{' with the sensitivity passes' * sensitivity}")
    if sensitivity:
        gains = np.array([r["ref_gain"] for r in rows])
        print(f"reference sensitivity, decoder A Dice: retrieved {pct['dice_a']:.2f} %, random "
              f"{pct['dice_a_random']:.2f} %, zeroed {pct['dice_a_zeroed']:.2f} % (retrieved higher on "
              f"{(gains > 0).sum()}, lower on {(gains < 0).sum()} of {len(gains)} cases); mean |change| of "
              f"its foreground probability, retrieved vs random: {summary['ref_delta']['mean']:.4f}")
    print()


def plot_cases(cases, png):
    """Per case, a slice through its target: decoder A, B and their mean (red) on the truth (green)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.1 * len(cases)))
    for row, (case_id, image, gt, prob) in zip(fig.subplots(len(cases), 3, squeeze=False), cases):
        z = int(np.argwhere(gt)[:, 2].mean()) if gt.any() else gt.shape[2] // 2
        preds = {"decoder A": prob.a > 0.5, "decoder B": prob.b > 0.5, "mean (reported)": prob.a + prob.b > 1}
        for ax, (name, pred) in zip(row, preds.items()):
            ax.imshow(image[:, :, z].T, cmap="gray")
            ax.contour(gt[:, :, z].T, levels=[0.5], colors="lime", linewidths=1)
            if pred[:, :, z].any():
                ax.contour(pred[:, :, z].T, levels=[0.5], colors="red", linewidths=1)
            ax.set_title(f"{case_id[:12]} z={z}, {name}: Dice {100 * dice(pred, gt):.1f} %", fontsize=8)
            ax.axis("off")
    fig.suptitle("green: ground truth, red: prediction", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png, dpi=100)
    return png


@torch.no_grad()
def explain_case(model, bank, cfg, case_id, boxes=None, device="cpu"):
    """Reference selection for boxes of a case (default: the bank's grid) as testing runs it, from decoder B's
    masks and the case's image CoT: the volume on the model's grid, the boxes and the Selection."""
    image, _ = data.downsample(*data.read_case(data.case_path(cfg.data_root, case_id)), cfg.downsample)
    boxes = boxes or retrieve.grid_boxes(image.shape, cfg.patch_size, cfg.bank_stride)
    x = torch.from_numpy(np.stack([data.padded_crop(image, b) for b in boxes])[:, None])     # (n, 1, X, Y, Z)
    masks = (model.predict_b(x.to(device)).argmax(1) == 1).cpu().numpy()                    # (n, X, Y, Z)
    morph, n = retrieve.morphology_batch(masks), len(boxes)
    return image, boxes, retrieve.select(bank, morph, [bank.query_texts[case_id]] * n, [case_id] * n, cfg)


def explain(ckpt_path, case_id, overrides):
    """--explain ID: per query patch its candidates' morphology distances, BM25 scores and fates; a PNG."""
    model, cfg, ckpt = load_checkpoint(ckpt_path, "cpu")
    cfg = with_test_keys(cfg, overrides)
    if not cfg.references or case_id not in ckpt["pool"]["image"]:
        raise ConfigError(f"--explain: {ckpt_path} has no references for case {case_id!r}" + (
            "" if cfg.references else " (trained with references=false)"))
    bank = load_references(cfg, ckpt, ckpt_path, "cpu")
    image, boxes, sel = explain_case(model, bank, cfg, case_id)
    print(retrieve.format_explanation(bank, sel, boxes))
    png = Path(ckpt_path).parent / f"explain_{case_id}.png"
    print("figure:", retrieve.plot_explanation(png, image, boxes, bank, sel))


def filter_report(bank, image_texts, cfg, taus=(0.5, 0.6, 0.7, 0.8, 0.9)):
    """How much the CoT filter acts, as lines: every bank entry queries with its ground-truth morphology and
    its case's image CoT (its own case excluded); per tau, the share of candidates rejected as hard negatives,
    the queries with no survivor, the slots survivors hold, the distinct cases chosen."""
    ids = list(bank.case_ids)
    lines = [f"queries: the {len(bank)} bank entries of {len(set(ids))} labeled cases "
             f"({len(set(bank.texts))} distinct mask CoTs), k_coarse {cfg.k_coarse}, k_fine {cfg.k_fine}"]
    for tau in taus:
        sel = retrieve.select(bank, bank.morph, [image_texts[c] for c in ids], ids,
                              dataclasses.replace(cfg, tau=tau), mode="both")     # the filter on
        rejected = np.mean([rec["hard_negative"].mean() for rec in sel.explain])
        cases = np.mean([len({ids[i] for i, w in zip(*row) if w > 0})
                         for row in zip(sel.indices, sel.weights)])
        lines.append(f"tau {tau:.2f}: {100 * rejected:5.1f} % of candidates rejected, "
                     f"{100 * np.mean(sel.n_filled == cfg.k_fine):5.1f} % of queries with no survivor, "
                     f"{cfg.k_fine - sel.n_filled.mean():.2f} of {cfg.k_fine} slots held by survivors, "
                     f"{cases:.2f} distinct cases among the references")
    return lines


# (summary key, heading, scale); the sensitivity columns exist for runs with references
TABLE = [("dice", "Dice %", 100), ("jaccard", "Jaccard %", 100), ("hd95", "95HD", 1), ("asd", "ASD", 1),
         ("dice_a", "A %", 100), ("dice_b", "B %", 100), ("dice_a_random", "A, random refs %", 100),
         ("dice_a_zeroed", "A, refs zeroed %", 100), ("ref_gain", "A: retrieved - random, points", 100),
         ("ref_delta", "mean abs dp(A) x1e-3", 1000), ("run_seconds", "minutes", 1 / 60)]
# (row, baseline) compared seed by seed: the unlabeled cases' share, the room above, what references add to
# the network trained without them, each control's, and retrieval against random references
PAIRS = [("no_references", "supervised_only"), ("supervised_all", "supervised_only"),
         ("cers", "no_references"), ("no_cot_filter", "no_references"), ("no_mcam", "no_references"),
         ("random_retrieval", "no_references"), ("cers", "random_retrieval")]
ALPHA, POWER = 0.05, 0.8                               # the paired t-test the detectable difference is for


def mean_spread(values):
    """'mean ± sample standard deviation (n - 1)' of seeds: a few seeds look no steadier than they are."""
    mean = round(float(np.mean(values)), 2) + 0.0                      # + 0.0: a -0.00 reads 0.00
    return f"{mean:.2f}" + (f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")


def detectable_difference(sd, n, alpha=ALPHA, power=POWER):
    """The smallest true mean difference a two-sided paired t-test at `alpha` on n pairs with this standard
    deviation of the differences detects with probability `power` (noncentral t, nc = delta sqrt(n) / sd)."""
    crit = stats.t.ppf(1 - alpha / 2, n - 1)
    def reach(nc):                                                                      # both tails
        return stats.nct.sf(crit, n - 1, nc) + stats.nct.sf(crit, n - 1, -nc) - power
    return float(optimize.brentq(reach, 0.0, 100.0, xtol=1e-12)) * sd / np.sqrt(n)   # n = 2 needs nc 16


def paired_bounds(diffs):
    """(mean, low, high, above, detectable) of paired differences: the mean, its 95 % Student-t interval, the
    count above 0, detectable_difference at the observed spread; low, high, detectable None for one pair."""
    d = np.asarray(diffs, float)
    mean, above = float(d.mean()), int((d > 0).sum())
    if len(d) < 2:
        return mean, None, None, above, None
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(1 - ALPHA / 2, len(d) - 1)) * sd / np.sqrt(len(d))
    return mean, mean - half, mean + half, above, detectable_difference(sd, len(d))


def paired_table(runs):
    """Markdown lines, per pair of PAIRS in runs ({row: {seed: summary}}): the row's Dice minus its baseline's
    (points) on each seed both have, the mean [95 % interval], the seeds above, the detectable difference."""
    lines = []
    for name, base in PAIRS:
        row, ref = ({seed: 100 * r["dice"]["mean"] for seed, r in runs.get(n, {}).items()}
                    for n in (name, base))
        if seeds := sorted(set(row) & set(ref)):
            gain = [row[s] - ref[s] for s in seeds]
            mean, lo, hi, above, detect = paired_bounds(gain)
            interval = "—" if lo is None else f"[{lo:+.2f}, {hi:+.2f}]"
            per_seed = ", ".join(f"{s}: {g:+.2f}" for s, g in zip(seeds, gain))
            lines.append(f"| {name} − {base} | {per_seed} | {mean:+.2f} {interval} | {above} of "
                         f"{len(gain)} | {'—' if detect is None else f'{detect:.2f}'} |")
    head = "| row − baseline | per seed (Dice points) | mean [95 % interval] | above on | detectable |"
    return lines and [head, "|---|---|---|---|---|", *lines]


def ablation_table(folder, title):
    """A markdown table of the runs <folder>/<row>/seed<N>/test/summary.json (the rows of PAIRS first): the
    mean ± std over seeds of each run's mean over the test cases; then the paired table."""
    named = list(dict.fromkeys(n for pair in PAIRS for n in pair))
    runs = {name: {int(p.parent.parent.name[4:]): json.loads(p.read_text())
                   for p in sorted(Path(folder, name).glob("seed*/test/summary.json"))}
            for name in named + sorted({p.name for p in Path(folder).iterdir() if p.is_dir()} - set(named))}
    lines = [f"{title}; last checkpoints; mean ± std over seeds (n - 1)",
             "| row | seeds | " + " | ".join(head for _, head, _ in TABLE) + " |",
             "|---|---|" + "---|" * len(TABLE)]
    for name, seeds in runs.items():
        if seeds:
            cells = [[scale * (r[key]["mean"] if isinstance(r[key], dict) else r[key])
                      for r in seeds.values() if key in r] for key, _, scale in TABLE]
            lines.append(f"| {name} | {len(seeds)} | " + " | ".join(mean_spread(v) if v else "–"
                                                                    for v in cells) + " |")
    return "\n".join(lines + ([""] + paired if (paired := paired_table(runs)) else []))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="LA_8", help="experiment whose last checkpoint is tested")
    parser.add_argument("--ckpt", help="checkpoint path (default runs/<exp>/ckpt_last.pt)")
    parser.add_argument("--lcc", action="store_true", help="keep the largest connected component")
    parser.add_argument("--out", help="output folder (default <run>/test)")
    parser.add_argument("--no-sensitivity", action="store_true",
                        help="skip decoder A with random references and with them zeroed (faster)")
    parser.add_argument("--explain", metavar="ID", help="why the case's patches got their references")
    parser.add_argument("--filter-report", action="store_true", help="the CoT filter's rejections, per tau")
    args, overrides = parser.parse_known_args(argv)
    if not args.filter_report:
        ckpt = args.ckpt or Path("runs") / args.exp / "ckpt_last.pt"   # a missing one: "no checkpoint there"
        if args.explain:
            return explain(ckpt, args.explain, overrides)
        return evaluate(ckpt, lcc=args.lcc, out_dir=args.out, sensitivity=not args.no_sensitivity,
                        overrides=overrides)
    cfg = get_config(args.exp, overrides)          # --filter-report: the labeled cases, any key, no training
    pool.check_cache_writable(cfg)                 # before any data are written or read
    data.check_volume_cache_writable(cfg)
    phantom.ensure_for(cfg)
    split = data.load_split(cfg.data_root, cfg.num_labeled, cfg.val_cases)
    volumes = data.load_volumes(cfg.data_root, split.labeled, factor=cfg.downsample, cache_dir=cfg.cache_dir)
    texts = pool.build_pool(cfg, dataclasses.replace(split, unlabeled=[], test=[]), volumes)
    bank = retrieve.ReferenceBank.build(cfg, volumes, split.labeled, texts.mask)
    print("\n".join(filter_report(bank, texts.image, cfg)))


if __name__ == "__main__":
    sys.exit(cli(main))
