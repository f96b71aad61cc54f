"""Synthetic left-atrium phantoms written in the exact LA layout (DESIGN.md §3, §4).

The offline default: a fresh machine has no LA data, so this writes look-alike cases that every
loader, test and experiment can use unchanged:

    <root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5   image float32 z-scored, label uint8 {0, 1}, (X, Y, Z)
    <root>/train.list, <root>/test.list                one ID a line
    <root>/phantom.json                                the parameters it was written with, and summary figures

Each case is an LGE-MRI-like volume: a deformed ellipsoidal chamber with 2-4 tubular veins (the
label), a darker wall around it, and look-alike distractors that are NOT labeled: bright
aorta-like tubes or ventricle-like blobs that touch or approach the chamber, some behind a clear
dark wall, some touching it with little contrast. That is the visual-semantic mismatch CERS is
about: intensity says "atrium" for both, only shape and context tell them apart. Bias field,
partial-volume blur and magnitude (Rician-like) noise finish the picture. Every case draws from
its own generator seeded by (seed, index), so a seed gives byte-identical files.
"""
import argparse
import json
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from config import CASE_DIR, CASE_FILE

PARAMS_FILE = "phantom.json"
VERSION = 1  # of the generator: bump it when a change alters the cases, so ensure_phantom rewrites them
ID_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # IDs look like the real ones: 20 upper-case alphanumerics
BLOOD, WALL, BACKGROUND, DARK = 2.2, 0.35, 1.0, 0.3  # LGE-like: bright blood, dark wall, medium tissue, dark lung


def smooth_field(rng, grid, scale, n_modes=6):
    """A smooth random field (mean ~0, std ~1): a sum of cosines with wavelengths of about 2 * scale voxels.

    cos(w.x + phase) is the real part of a product of three 1D complex exponentials, so the sum
    over modes is a matrix product instead of n_modes full-volume cosines."""
    w = rng.normal(0.0, np.pi / (2 * scale), (3, n_modes))
    phase = rng.uniform(0, 2 * np.pi, (3, n_modes))
    ex, ey, ez = (np.exp(1j * (w[i, :, None] * grid[i].ravel() + phase[i, :, None])).astype(np.complex64)
                  for i in range(3))                                                         # (K, X) (K, Y) (K, Z)
    xy = (ex[:, :, None] * ey[:, None, :]).reshape(n_modes, -1)                               # (K, X*Y)
    field = np.concatenate([xy.real, -xy.imag]).T @ np.concatenate([ez.real, ez.imag])        # Re(xy^T ez)
    return field.reshape(ex.shape[1], ey.shape[1], ez.shape[1]) * np.float32(np.sqrt(2.0 / n_modes))


# Shapes are signed distances in voxels (< 0 inside): a union is a minimum, a wall is 0 < d <= thickness.

def ellipsoid(rng, grid, center, radii, angle, wobble):
    """A deformed ellipsoid rotated by `angle` in the x-y plane: its radius varies smoothly by about +-wobble."""
    dx, dy, dz = (g - np.float32(c) for g, c in zip(grid, center))           # float32 throughout: speed
    cos, sin, (rx, ry, rz) = np.float32(np.cos(angle)), np.float32(np.sin(angle)), np.float32(radii)
    u, v = cos * dx + sin * dy, cos * dy - sin * dx
    r = np.sqrt((u / rx) ** 2 + (v / ry) ** 2 + (dz / rz) ** 2)
    reach = np.sqrt(dx ** 2 + dy ** 2 + dz ** 2) / np.maximum(r, 1e-3)  # the radius in this voxel's direction
    return (r - 1.0 - wobble * smooth_field(rng, grid, scale=max(radii))) * reach


def extent(mask, center, direction):
    """How far a ray from `center` along `direction` stays inside `mask` (voxels)."""
    t = np.arange(0.0, max(mask.shape), 0.5)
    pts = np.round(np.asarray(center)[:, None] + direction[:, None] * t).astype(int)
    inside = np.all((pts >= 0) & (pts < np.array(mask.shape)[:, None]), axis=0)
    inside[inside] = mask[tuple(pts[:, inside])]
    return t[np.argmin(inside)] if not inside.all() else t[-1]


def tube(shape, p0, p1, p2, r0, r1, margin):
    """A tube around the quadratic Bezier curve p0 -> p2 (control point p1); its radius tapers from r0 to r1.

    Distances are exact up to `margin` voxels outside the tube (room for a wall), infinite beyond."""
    t = np.linspace(0.0, 1.0, int(2 * (np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1))) + 2)[:, None]
    pts = np.round((1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2).astype(int)
    keep = np.all((pts >= 0) & (pts < shape), axis=1)
    out = np.full(shape, np.inf, np.float32)                             # "far away" outside the work box
    if keep.any():
        pts, r = pts[keep], (r0 + (r1 - r0) * t[:, 0])[keep]
        m = int(np.ceil(max(r0, r1) + margin)) + 1                      # distances are only needed in this box
        lo, hi = np.maximum(pts.min(0) - m, 0), np.minimum(pts.max(0) + m + 1, shape)
        b, local = tuple(slice(a, z) for a, z in zip(lo, hi)), tuple((pts - lo).T)
        seeds, radius = np.zeros(hi - lo, bool), np.zeros(hi - lo, np.float32)
        seeds[local], radius[local] = True, r
        dist, idx = ndimage.distance_transform_edt(~seeds, return_indices=True)  # nearest centreline point
        out[b] = dist - radius[tuple(idx)]
    return out


def unit(v):
    return np.asarray(v, float) / np.linalg.norm(v)


def make_case(rng, shape):
    """One phantom case of about `shape` (X and Y vary by up to 15 %, Z is kept).

    Returns image float32 (X, Y, Z) z-scored over the volume, label uint8 (chamber + veins), and the
    boolean parts {"target", "wall", "distractor"} for tests and the summary figures."""
    size = np.array([round(shape[0] * rng.uniform(0.85, 1.15)), round(shape[1] * rng.uniform(0.85, 1.15)), shape[2]])
    grid = [g.astype(np.float32) for g in np.ogrid[:size[0], :size[1], :size[2]]]
    s = size[0] / 96.0                                                   # voxel scale relative to the default size
    # the chamber: a flattened, deformed ellipsoid, roughly central but shifted
    center = size / 2 + rng.uniform(-0.08, 0.08, 3) * size * [1, 1, 0.5]
    radii = rng.uniform([0.26, 0.18, 0.21], [0.33, 0.23, 0.27]) * size
    angle = rng.uniform(-0.4, 0.4)
    chamber = ellipsoid(rng, grid, center, radii, angle, wobble=0.15)
    inside = chamber <= 0
    c, sn = np.cos(angle), np.sin(angle)
    rot = lambda d: unit([c * d[0] - sn * d[1], sn * d[0] + c * d[1], d[2]])  # chamber frame -> volume
    wall_t = rng.uniform(1.5, 3.0) * s                                  # wall thickness (voxels)
    # 2-4 pulmonary veins leave the chamber to the left and right, towards the back (+y)
    target_d = chamber
    for k in range(rng.integers(2, 5)):
        d = rot([(-1) ** k, rng.uniform(0.2, 0.8), rng.uniform(-0.6, 0.6)])
        p0 = center + d * 0.5 * extent(inside, center, d)
        p2 = p0 + d * rng.uniform(0.3, 0.5) * size[0]
        p1 = (p0 + p2) / 2 + rng.uniform(-0.12, 0.12, 3) * size[0]
        r0 = rng.uniform(2.5, 4.0) * s
        target_d = np.minimum(target_d, tube(size, p0, p1, p2, r0, 0.7 * r0, wall_t))
    # 1-2 look-alike distractors; sharpness 1: a dark wall between them and the chamber, 0: touching, no wall
    sharp = rng.uniform()
    gap = (-2.0 + 8.0 * sharp) * s                                      # from the chamber surface (voxels)
    look_d = np.full(size, np.inf, np.float32)
    for kind in rng.choice(["aorta", "ventricle"], size=rng.integers(1, 3)):
        if kind == "aorta":                                              # a thick tube along z, in front or behind
            d = rot([rng.uniform(-0.5, 0.5), rng.choice([-1, 1]), rng.uniform(-0.2, 0.2)])
            r = rng.uniform(5.0, 8.0) * s
            mid = center + d * (extent(inside, center, d) + r + gap)
            axis = unit([rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.3), 1.0])
            bend = rng.uniform(-0.1, 0.1, 3) * size[0]
            ends = mid - axis * size[2], mid + axis * size[2]
            look = tube(size, ends[0], mid + bend, ends[1], r, r * rng.uniform(0.8, 1.1), wall_t)
        else:                                                            # a chamber-like blob in front and below
            d = rot([rng.uniform(-0.6, 0.6), -1.0, rng.uniform(-0.8, 0.0)])
            b_radii = rng.uniform([0.14, 0.12, 0.16], [0.22, 0.18, 0.26]) * size
            reach = 1.0 / np.sqrt(np.sum((d / b_radii) ** 2))            # blob radius along d
            b_center = center + d * (extent(inside, center, d) + reach + gap)
            look = ellipsoid(rng, grid, b_center, b_radii, rng.uniform(-0.5, 0.5), wobble=0.1)
        look_d = np.minimum(look_d, look)
    target = target_d <= 0
    distractor = (look_d <= 0) & ~target
    wall = (target_d > 0) & (target_d <= wall_t) & ~distractor           # a touching distractor breaks the wall
    # paint (background texture, dark lung-like patches, walls, pools), then blur, bias field, noise
    image = BACKGROUND + 0.1 * smooth_field(rng, grid, scale=8 * s)
    image[smooth_field(rng, grid, scale=20 * s) > 1.2] = DARK
    if sharp > 0.4:                                                      # sharp look-alikes get a dark wall too
        image[(look_d > 0) & (look_d <= wall_t) & ~target] = WALL
    image[wall] = WALL
    blood = BLOOD * rng.uniform(0.85, 1.15)
    image[distractor] = blood * rng.uniform(0.9, 1.1)
    image[target] = blood
    image = ndimage.gaussian_filter(image, 0.5 + 0.6 * (1 - sharp), truncate=3.0)  # partial volume
    image *= np.exp(0.15 * smooth_field(rng, grid, scale=40 * s))                 # coil bias field
    noise = rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(0.1, 0.25)
    image = np.abs(image + noise)                                                 # a magnitude image: noise folds at 0
    image = ((image - image.mean()) / image.std()).astype(np.float32)
    return image, target.astype(np.uint8), {"target": target, "wall": wall, "distractor": distractor}


def phantom_params(n_train, n_test, shape, seed):
    """The parameters that define a phantom dataset, as stored in phantom.json (checked here)."""
    if n_train < 1 or n_test < 1 or len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"phantom: need n_train, n_test >= 1 and a 3D shape of at least 16 voxels a side, "
                         f"got n_train={n_train}, n_test={n_test}, shape={tuple(shape)}")
    return {"n_train": int(n_train), "n_test": int(n_test), "shape": [int(v) for v in shape], "seed": int(seed),
            "version": VERSION}


def numbered_case(seed, i, shape):
    """Case i of a seed and its ID, from its own generator: the same case whatever the counts."""
    rng = np.random.default_rng([seed, i])
    return ("".join(rng.choice(list(ID_CHARS), 20)), *make_case(rng, shape))


def write_cases(folder, params):
    """Write every case, train.list and test.list into `folder`; returns the mean summary figures."""
    ids, stats = [], []
    for i in range(params["n_train"] + params["n_test"]):
        case_id, image, label, parts = numbered_case(params["seed"], i, params["shape"])
        ids.append(case_id)
        path = folder / CASE_DIR / case_id / CASE_FILE
        path.parent.mkdir(parents=True)
        with h5py.File(path, "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=label, compression="gzip")
        rest = ~(parts["target"] | parts["wall"] | parts["distractor"])
        stats.append([label.mean()] + [image[m].mean() if m.any() else np.nan
                                       for m in (parts["target"], parts["distractor"], parts["wall"], rest)])
    (folder / "train.list").write_text("".join(f"{i}\n" for i in ids[:params["n_train"]]))
    (folder / "test.list").write_text("".join(f"{i}\n" for i in ids[params["n_train"]:]))
    names = ["foreground_fraction", "target", "distractor", "wall", "background"]  # mean z-scored intensities
    return dict(zip(names, np.round(np.nanmean(stats, axis=0), 4).tolist()))


def write_phantom(root, n_train=40, n_test=10, shape=(96, 96, 64), seed=0):
    """Write a phantom dataset at `root` and return `root`.

    An earlier phantom there is replaced with everything in its folder (a CoT cache made for the
    old cases included: it would be stale); any other non-empty folder is left alone with an error.
    The cases are built in a sibling temp folder that is renamed into place, so an interrupted
    write never leaves a half dataset that looks complete."""
    root, params = Path(root), phantom_params(n_train, n_test, shape, seed)
    if root.exists() and any(root.iterdir()) and not (root / PARAMS_FILE).exists():
        raise FileExistsError(f"{root}: not empty and not a phantom dataset; refusing to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (root.with_name(f".{root.name}.{what}-{os.getpid()}") for what in ("partial", "old"))
    try:
        summary = write_cases(tmp, params)
        (tmp / PARAMS_FILE).write_text(json.dumps({"params": params, "summary": summary}, indent=1))
        if root.exists():
            root.rename(old)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return root


def ensure_phantom(root, n_train=40, n_test=10, shape=(96, 96, 64), seed=0):
    """The phantom at `root`, written only when missing or written with other parameters."""
    try:
        written = json.loads((Path(root) / PARAMS_FILE).read_text())["params"]
    except (OSError, ValueError, KeyError):
        written = None                                                   # missing or damaged: write it afresh
    if written == phantom_params(n_train, n_test, shape, seed):
        return Path(root)
    return write_phantom(root, n_train, n_test, shape, seed)


def preview(root, png, n=4):
    """Save middle slices (axial x-y and x-z through the label's centre) of the first n cases, label outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    root = Path(root)
    ids = (root / "train.list").read_text().split()[:n]
    fig, axes = plt.subplots(2, len(ids), figsize=(3.2 * len(ids), 6), squeeze=False)
    for j, cid in enumerate(ids):
        with h5py.File(root / CASE_DIR / cid / CASE_FILE, "r") as f:
            image, label = f["image"][()], f["label"][()]
        _, cy, cz = (int(round(c)) for c in ndimage.center_of_mass(label))
        for ax, sl in ((axes[0, j], np.s_[:, :, cz]), (axes[1, j], np.s_[:, cy, :])):
            img, lab = image[sl], label[sl]
            ax.imshow(img.T, cmap="gray", vmin=-2.5, vmax=2.5)
            ax.contour(lab.T, [0.5], colors="r", linewidths=0.8)
            ax.set_xticks([]), ax.set_yticks([])
        axes[0, j].set_title(f"{cid[:8]}… {image.shape}", fontsize=8)
    axes[0, 0].set_ylabel("x-y (axial)"), axes[1, 0].set_ylabel("x-z")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a synthetic LA-layout dataset (DESIGN.md §4).")
    p.add_argument("--out", default="data/phantom", help="dataset root")
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-test", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preview", metavar="PNG", help="also save middle slices of a few cases here")
    args = p.parse_args(argv)
    t0 = time.time()
    root = write_phantom(args.out, args.n_train, args.n_test, args.shape, args.seed)
    summary = json.loads((root / PARAMS_FILE).read_text())["summary"]
    print(f"wrote {args.n_train} train + {args.n_test} test cases to {root} in {time.time() - t0:.1f} s")
    print(f"foreground fraction {summary['foreground_fraction']:.3f}; mean z-scored intensity: target "
          f"{summary['target']:.2f}, distractor {summary['distractor']:.2f}, wall {summary['wall']:.2f}, "
          f"background {summary['background']:.2f}")
    if args.preview:
        preview(root, args.preview)
        print(f"preview: {args.preview}")


if __name__ == "__main__":
    main()
