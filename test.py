"""Sliding-window inference and the field's metrics (docs/design.md §10).

    python test.py                          # runs/LA_8/ckpt_last.pt on the LA test list
    python test.py --exp PHANTOM_8 --lcc    # keep the largest connected component
    python test.py --ckpt path/to/ckpt.pt   # any checkpoint; the model is rebuilt from its config

Metrics are the definitions of medpy.metric.binary (dc, jc, hd95, asd) in voxel units, without
spacing. Where medpy raises on empty masks, this module scores instead:

    both masks empty:        Dice 1, Jaccard 1, 95HD 0, ASD 0     (a perfect answer)
    exactly one mask empty:  Dice 0, Jaccard 0, 95HD and ASD = the volume's diagonal in voxels
                             (the largest distance possible; an empty prediction is never flattered)

The reported checkpoint is the last one; nothing here looks at the test set to choose it.
"""
import argparse
import csv
import dataclasses
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

import data
import files
import retrieve
from bank import ReferenceBank
from checkpoint import CheckpointError, load_checkpoint
from config import Config, check_config, cli, fast_paths, resolve_device
from morphology import morphology_batch

# ----------------------------------------------------------------------------- metrics


def dice(pred, gt):
    """2 |P & G| / (|P| + |G|)  (medpy dc)."""
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(pred & gt) / total


def jaccard(pred, gt):
    """|P & G| / |P | G|  (medpy jc)."""
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def _border(mask):
    """The one-voxel surface of a mask: the mask minus its 6-connected erosion (as medpy)."""
    faces = ndimage.generate_binary_structure(3, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=faces, iterations=1)


def surface_distances(a, b):
    """Distance of every surface voxel of `a` to the nearest surface voxel of `b` (medpy's
    __surface_distances).
    Both masks are cut to their joint bounding box plus one voxel first, which changes no distance."""
    where = np.argwhere(a | b)
    box = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in zip(where.min(0), where.max(0)))
    a, b = a[box], b[box]
    return ndimage.distance_transform_edt(~_border(b))[_border(a)]


def _empty_case(pred, gt):
    """None when both masks have voxels; otherwise the documented score (0 or the diagonal)."""
    if pred.any() and gt.any():
        return None
    return 0.0 if not (pred.any() or gt.any()) else float(np.linalg.norm(pred.shape))


def hd95(pred, gt):
    """95th percentile of the symmetric surface distances (medpy hd95)."""
    empty = _empty_case(pred, gt)
    if empty is not None:
        return empty
    return float(np.percentile(np.hstack([surface_distances(pred, gt), surface_distances(gt, pred)]), 95))


def asd(pred, gt):
    """Mean distance from the prediction's surface to the ground truth's (medpy asd: one direction)."""
    empty = _empty_case(pred, gt)
    return empty if empty is not None else float(surface_distances(pred, gt).mean())


def largest_component(mask):
    """Keep the largest 26-connected component (the field's optional post-processing)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n <= 1:
        return mask
    return labels == (np.bincount(labels.ravel())[1:].argmax() + 1)


METRICS = {"dice": dice, "jaccard": jaccard, "hd95": hd95, "asd": asd}

# ----------------------------------------------------------------------------- inference

@dataclass
class Probabilities:
    """The foreground probabilities (X, Y, Z) of one volume, one field per output of predictor(): what is
    scored, and what the reference-sensitivity report compares (None where it is not computed)."""
    a: np.ndarray                          # decoder A, with the retrieved references when there is a bank
    b: np.ndarray                          # decoder B
    a_random: np.ndarray = None            # decoder A with random bank entries in place of its references
    a_zeroed: np.ndarray = None            # decoder A with its references' contribution zeroed (branch kept)
    transfer: np.ndarray = None            # the retrieved references' weighted masks alone (no network)
    transfer_random: np.ndarray = None     # the random references' weighted masks alone

    @property
    def mean(self):
        """The reported prediction's probability: the mean of both decoders'."""
        return (self.a + self.b) / 2

    @classmethod
    def unstack(cls, prob):
        """The fields of sliding_window's (K, X, Y, Z) average of predictor()'s outputs, which are stacked in
        the order of the fields."""
        return cls(**dict(zip(OUTPUTS, prob)))


OUTPUTS = [field.name for field in dataclasses.fields(Probabilities)]


def window_starts(size, patch, stride):
    """Window origins along one axis: every `stride`, the last one flush with the end."""
    n = int(np.ceil((size - patch) / stride)) + 1
    return sorted({min(i * stride, size - patch) for i in range(n)})


@torch.no_grad()
def sliding_window(predict, image, patch, stride_xy, stride_z, window_batch, device):
    """Average the per-window probabilities over the whole volume.

    predict(x (N, 1, *patch)) -> foreground probabilities (N, K, *patch) for K outputs (e.g. the two
    decoders).
    image is (X, Y, Z) numpy; returns (K, X, Y, Z) numpy. Volumes smaller than the patch are zero-padded."""
    x = torch.as_tensor(image, dtype=torch.float32, device=device)
    padded = data.pad_to(x, patch)                                       # (X', Y', Z')
    size = padded.shape
    starts = [(a, b, c) for a in window_starts(size[0], patch[0], stride_xy)
              for b in window_starts(size[1], patch[1], stride_xy)
              for c in window_starts(size[2], patch[2], stride_z)]
    total = count = None
    for i in range(0, len(starts), window_batch):
        chunk = starts[i:i + window_batch]
        windows = torch.stack([data.crop(padded, s, patch) for s in chunk])[:, None]   # (N, 1, *patch)
        prob = predict(windows).float()                                                 # (N, K, *patch)
        if total is None:
            total = torch.zeros((prob.shape[1], *size), device=device)
            count = torch.zeros(size, device=device)
        for s, p in zip(chunk, prob):
            data.crop(total, s, patch).add_(p)
            data.crop(count, s, patch).add_(1)
    mean = total / count                                                 # (K, X', Y', Z')
    lo = [(p - s) // 2 for p, s in zip(size, image.shape)]                # undo the symmetric padding
    X, Y, Z = image.shape
    return mean[:, lo[0]:lo[0] + X, lo[1]:lo[1] + Y, lo[2]:lo[2] + Z].cpu().numpy()


def load_references(cfg, ckpt, device):
    """The reference bank and CoT texts a CERS checkpoint was trained with (None, None for a plain
    network)."""
    if not cfg.references:
        return None, None
    split = data.load_split(cfg.data_root, cfg.num_labeled, cfg.val_cases)
    volumes = data.load_volumes(cfg.data_root, split.labeled, progress=False, factor=cfg.downsample,
                                cache_dir=cfg.cache_dir)
    bank = ReferenceBank.build(cfg, volumes, split.labeled, ckpt["pool"]["mask"], device)
    bank.load_state_dict(ckpt["bank"])
    bank.index_queries(ckpt["pool"]["image"])
    if bank.features is None:
        raise CheckpointError("checkpoint: the reference bank has no features (stopped before the reference "
                              "warm-up); train past ref_warmup first")
    return bank, ckpt["pool"]["image"]


def predictor(model, cfg, case_id, bank=None, bf16=False, generator=None, channels_last=False):
    """predict(x) for sliding_window: (N, 1, *patch) windows -> (N, K, *patch) foreground probabilities, the
    fields of Probabilities in their order: decoder A's and decoder B's (K = 2). With a reference bank each
    batch of windows takes the training path: decoder B first, its prediction's morphology and the case's
    image-only CoT select references, decoder A fuses them; with a `generator` decoder A also runs with random
    bank entries in their place and with the references' contribution zeroed, and the references' weighted
    masks come along (K = 6), for the sensitivity report."""
    swaps = retrieve.SWAPS if generator is not None else ("retrieved",)

    def predict(x):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            feats = model.encoder(x)
            b = model.decoder_b(feats)
            if bank is None:
                a = {"retrieved": model.decode_a(feats).float().softmax(1)[:, 1]}
            else:
                a = retrieve.decoder_a_probabilities(model, feats, b, [case_id] * len(x), bank, cfg,
                                                     generator, swaps, transfer=generator is not None)
        out = {"a": a["retrieved"], "b": b.float().softmax(1)[:, 1]}
        if generator is not None:
            out.update(a_random=a["random"], a_zeroed=a["zeroed"], transfer=a["retrieved_transfer"],
                       transfer_random=a["random_transfer"])
        return torch.stack([out[name] for name in OUTPUTS if name in out], 1)
    return predict


@torch.no_grad()
def plot_references(png, model, bank, image_cots, cfg, case_id, device):
    """references.png for the case's first window (at the volume's origin), explained by retrieve.select,
    the readable twin of the device path that chose the references during testing."""
    image, _ = data.downsample(*data.read_case(data.case_path(cfg.data_root, case_id)), cfg.downsample)
    box = (0, 0, 0, *cfg.patch_size)
    window = data.padded_crop(image, box)                           # (*patch), zero outside the volume
    mask = (model.predict_b(torch.from_numpy(window)[None, None].to(device)).argmax(1) == 1).cpu().numpy()
    selection = retrieve.select(bank, morphology_batch(mask), [image_cots[case_id]], [case_id], cfg)
    return retrieve.plot_explanation(png, window, [box], bank, selection, max_rows=1)


def score(prob, gt, lcc):
    """The metrics of the mean of both decoders' Probabilities > 0.5 (largest component only with lcc) against
    gt, and each decoder's own Dice."""
    pred = prob.mean > 0.5
    if lcc:
        pred = largest_component(pred)
    return {**{k: f(pred, gt) for k, f in METRICS.items()}, "dice_a": dice(prob.a > 0.5, gt),
            "dice_b": dice(prob.b > 0.5, gt)}


def evaluate(ckpt_path, lcc=False, out_dir=None, device=None, progress=True, sensitivity=True):
    """Test a checkpoint on its experiment's test list; prints the table and writes CSV, JSON and figures.

    With references, every batch of windows takes the training path: decoder B first, its prediction's
    morphology and the case's image-only CoT select references, then decoder A fuses their context. With
    `sensitivity` decoder A is also scored with random bank entries in place of the retrieved references
    and with none, and the mean |change| of its foreground probability (retrieved vs random) is reported:
    whether decoder A uses what its references contain (docs/design.md §10). A model trained on a coarser
    grid (cfg.downsample > 1) predicts on that grid and is scored there ("low_" keys) and, its probabilities
    brought back to the original grid (data.upsample_probabilities), against the original labels (the
    reported metrics, comparable with the protocol's)."""
    device = torch.device(device) if device else resolve_device(Config())
    model, cfg, ckpt = load_checkpoint(ckpt_path, device)
    out = files.check_writable(out_dir or Path(cfg.out_dir) / "test")      # before the data are read
    bank, image_cots = load_references(cfg, ckpt, device)
    split = data.load_split(cfg.data_root, cfg.num_labeled, cfg.val_cases)
    bf16, channels_last = fast_paths(cfg, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    sensitivity = sensitivity and bank is not None
    rows, shown, seconds = [], [], []
    for n, case_id in enumerate(tqdm(split.test, desc="testing", disable=not progress, leave=False)):
        image, label = data.read_case(data.case_path(cfg.data_root, case_id))       # the original grid
        low_image, low_label = data.downsample(image, label, cfg.downsample)       # the model's grid
        generator = torch.Generator(device).manual_seed(cfg.seed + n) if sensitivity else None
        t = time.time()
        predict = predictor(model, cfg, case_id, bank, bf16, generator, channels_last)
        stack = sliding_window(predict, low_image, cfg.patch_size, cfg.stride_xy, cfg.stride_z,
                               cfg.window_batch, device)                                 # (K, x, y, z)
        seconds.append(time.time() - t)
        low = score(Probabilities.unstack(stack), low_label.astype(bool), lcc) if cfg.downsample > 1 else {}
        prob = Probabilities.unstack(data.upsample_probabilities(stack, cfg.downsample, image.shape))
        gt = label.astype(bool)
        row = {"case": case_id, **score(prob, gt, lcc),
               **{f"low_{k}": v for k, v in low.items() if k in METRICS}}
        if sensitivity:                                 # decoder A with random references, references zeroed
            row.update(dice_a_random=dice(prob.a_random > 0.5, gt),
                       dice_a_zeroed=dice(prob.a_zeroed > 0.5, gt),
                       ref_delta=float(np.abs(prob.a - prob.a_random).mean()),
                       transfer=dice(prob.transfer > 0.5, gt),
                       transfer_random=dice(prob.transfer_random > 0.5, gt))
            row["ref_gain"] = row["dice_a"] - row["dice_a_random"]        # paired: same case, same network
        rows.append(row)
        if len(shown) < 4:
            shown.append((case_id, image, gt, Probabilities(prob.a, prob.b)))

    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(out / "per_case.csv", table.getvalue())
    summary = {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
               for k in rows[0] if k != "case"}
    summary.update(checkpoint=str(ckpt_path), iteration=ckpt["iter"], lcc=lcc, cases=len(rows),
                   scored=split.scored, seconds_per_volume=float(np.median(seconds)), sensitivity=sensitivity,
                   config=dataclasses.asdict(cfg))
    files.write_text(out / "summary.json", json.dumps(summary, indent=1))
    print_table(rows, summary, cfg, ckpt["iter"], lcc, split.scored)
    figures = [plot_cases(shown, out / "predictions.png")]
    if bank is not None:                           # why the first test case's first window got its references
        figures.append(plot_references(out / "references.png", model, bank, image_cots, cfg, split.test[0],
                                       device))
    print(f"wrote {out / 'per_case.csv'}, {out / 'summary.json'}, " + ", ".join(str(f) for f in figures))
    return summary


def print_table(rows, summary, cfg, iteration, lcc, scored="test"):
    print(f"\n{cfg.exp}: last checkpoint (iteration {iteration}), "
          f"largest connected component {'ON' if lcc else 'off'}, {len(rows)} {scored} cases")
    print(f"{'case':24s} {'Dice %':>8s} {'Jacc %':>8s} {'95HD':>8s} {'ASD':>8s}")
    for r in rows:
        print(f"{r['case']:24s} {100 * r['dice']:8.2f} {100 * r['jaccard']:8.2f} {r['hd95']:8.2f} "
              f"{r['asd']:8.2f}")
    m = {k: summary[k] for k in ("dice", "jaccard", "hd95", "asd")}
    print(f"{'mean ± std':24s} {100 * m['dice']['mean']:5.2f}±{100 * m['dice']['std']:<5.2f} "
          f"{100 * m['jaccard']['mean']:5.2f}±{100 * m['jaccard']['std']:<5.2f} "
          f"{m['hd95']['mean']:5.2f}±{m['hd95']['std']:<5.2f} "
          f"{m['asd']['mean']:5.2f}±{m['asd']['std']:<5.2f}")
    pct = {k: 100 * v["mean"] for k, v in summary.items() if isinstance(v, dict) and "mean" in v}  # in %
    if cfg.downsample > 1:
        low = {k: summary[f"low_{k}"]["mean"] for k in ("dice", "jaccard", "hd95", "asd")}
        print(f"the table is on the original grid (the prediction upsampled {cfg.downsample}x); on the "
              f"model's {cfg.downsample}x coarser grid: Dice {100 * low['dice']:.2f} %, Jaccard "
              f"{100 * low['jaccard']:.2f} %, 95HD {low['hd95']:.2f}, ASD {low['asd']:.2f} (voxels of that "
              "grid)")
    print(f"decoder A alone: Dice {pct['dice_a']:.2f} %, decoder B alone: "
          f"{pct['dice_b']:.2f} %; {summary['seconds_per_volume']:.2f} s per volume"
          + (" (with the sensitivity passes)" if summary["sensitivity"] else ""))
    if summary["sensitivity"]:
        print(f"reference sensitivity, decoder A Dice: retrieved {pct['dice_a']:.2f} %, random "
              f"{pct['dice_a_random']:.2f} %, zeroed {pct['dice_a_zeroed']:.2f} %; mean |change| of its "
              f"foreground probability, retrieved vs random: {summary['ref_delta']['mean']:.4f}")
        gains = np.array([r["ref_gain"] for r in rows])
        print(f"retrieved vs random, case by case (same network): decoder A's Dice {100 * gains.mean():+.2f} "
              f"points on average, higher on {(gains > 0).sum()} and lower on {(gains < 0).sum()} of "
              f"{len(gains)} cases")
        print(f"label transfer, the references' weighted masks alone (no network): Dice retrieved "
              f"{pct['transfer']:.2f} %, random {pct['transfer_random']:.2f} %")
    print()


def plot_cases(cases, png):
    """Each case's slice through the middle of its target: image, then decoder A, decoder B and their mean
    (red) over the ground truth (green)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(cases), 4, figsize=(12, 3.1 * len(cases)), squeeze=False)
    for row, (case_id, image, gt, prob) in zip(axes, cases):
        z = int(np.argwhere(gt)[:, 2].mean()) if gt.any() else gt.shape[2] // 2
        preds = {"decoder A": prob.a > 0.5, "decoder B": prob.b > 0.5, "mean (reported)": prob.mean > 0.5}
        row[0].imshow(image[:, :, z].T, cmap="gray")
        row[0].set_title(f"{case_id[:12]} z={z}", fontsize=8)
        for ax, (name, pred) in zip(row[1:], preds.items()):
            ax.imshow(image[:, :, z].T, cmap="gray")
            ax.contour(gt[:, :, z].T, levels=[0.5], colors="lime", linewidths=1)
            if pred[:, :, z].any():
                ax.contour(pred[:, :, z].T, levels=[0.5], colors="red", linewidths=1)
            ax.set_title(f"{name}: Dice {100 * dice(pred, gt):.1f} %", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("green: ground truth, red: prediction", fontsize=9)
    fig.tight_layout()
    files.save_figure(fig, png, dpi=100)
    plt.close(fig)
    return png


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="LA_8", help="experiment whose last checkpoint is tested")
    parser.add_argument("--ckpt", help="checkpoint path (default runs/<exp>/ckpt_last.pt)")
    parser.add_argument("--lcc", action="store_true", help="keep the largest connected component")
    parser.add_argument("--out", help="output folder (default <run>/test)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--no-sensitivity", action="store_true",
                        help="skip decoder A with random references and without references (faster)")
    args = parser.parse_args(argv)
    ckpt = Path(args.ckpt or Path("runs") / args.exp / "ckpt_last.pt")
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: no checkpoint (train first: python train.py --exp {args.exp})")
    device = None
    if args.device:                                    # checked as a config key, then sought on this machine
        device = resolve_device(check_config(Config(device=args.device)))
    evaluate(ckpt, lcc=args.lcc, out_dir=args.out, device=device, sensitivity=not args.no_sensitivity)


if __name__ == "__main__":
    sys.exit(cli(main))
