"""Synthetic left-atrium phantoms written in the exact LA layout (docs/design.md §3, §4; docs/phantom.md).

The offline default: a fresh machine has no LA data, so this writes look-alike cases that every
loader, test and experiment can use unchanged:

    <root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5   image float32 z-scored, label uint8 {0, 1}, (X, Y, Z)
    <root>/train.list, <root>/test.list                one ID a line
    <root>/phantom.json                                the parameters it was written with, and summary figures

Each case is an LGE-MRI-like crop around the left atrium, as the LA challenge crops are. The
atrial body with its appendage and four pulmonary-vein ostia sits among the other blood pools of
the heart: left ventricle, right atrium with the superior vena cava, ascending and descending
aorta, pulmonary artery. All of them share one intensity distribution. The LA opens into the LV
at the mitral valve plane and into its veins with no wall; elsewhere thin dark walls separate
the pools, with gaps. The label is the LA body, the appendage and each vein up to VEIN_LABEL
beyond the body, as in the challenge masks; the rest of each vein, and every other pool, is
unlabeled. So intensity alone cannot find the target (a single global threshold reaches Dice
0.3-0.4, see `threshold_dice`): position, shape and context must. Heterogeneous enhancement,
bright fat, dark lungs, a coil bias field, partial-volume blur, magnitude (Rician) noise and a
scanner response (a power curve) finish the picture; contrast, blur, bias, noise and response change
from case to case as between scanners and sessions (version 4 widened these ranges).

Every case draws from its own generator seeded by (seed, index), so a seed gives byte-identical files.
"""
import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

import files
from config import CASE_DIR, CASE_FILE, EXPERIMENTS, CersError, ConfigError, cli
from distributed import World, main_first

PARAMS_FILE = "phantom.json"
VERSION = 4  # of the generator: bump it when a change alters the cases, so ensure_phantom rewrites them
ID_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # IDs look like the real ones: 20 upper-case alphanumerics
SHAPE = EXPERIMENTS["PHANTOM_8"]["phantom_shape"]  # the default size, (48, 48, 32): CPU-sized, 2.1 mm voxels
NOMINAL = 64.0     # the anatomy is laid out in voxels of a 64-wide crop (about 1.6 mm); other widths scale it
VEIN_LABEL = 4.0   # nominal voxels: veins are labeled this far beyond the atrial body, then go on unlabeled
THIN = 2.5         # nominal voxels: walls up to this thick (atria, vessels) show gaps; the LV's do not
INSET = 0.7        # nominal voxels: the label edge lies this far inside the blood, as in the challenge masks
LA_RADII = (17.0, 11.0, 13.0)  # nominal LA body semi-axes (x left, y posterior, z up): about 7 % of the crop


class NotAPhantom(CersError, FileExistsError):
    """The phantom's folder holds other files, which are never replaced."""


def smooth_field(rng, grid, scale, n_modes=6):
    """A smooth random field (mean ~0, std ~1): a sum of cosines with wavelengths of about 2 * scale voxels.

    cos(w.x + phase) is the real part of a product of three 1D complex exponentials, so the sum
    over modes is a matrix product instead of n_modes full-volume cosines."""
    w = rng.normal(0.0, np.pi / (2 * scale), (3, n_modes))
    phase = rng.uniform(0, 2 * np.pi, (3, n_modes))
    ex, ey, ez = (np.exp(1j * (w[i, :, None] * grid[i].ravel() + phase[i, :, None])).astype(np.complex64)
                  for i in range(3))                                                    # (K, X) (K, Y) (K, Z)
    xy = (ex[:, :, None] * ey[:, None, :]).reshape(n_modes, -1)                               # (K, X*Y)
    field = np.concatenate([xy.real, -xy.imag]).T @ np.concatenate([ez.real, ez.imag])        # Re(xy^T ez)
    return field.reshape(ex.shape[1], ey.shape[1], ez.shape[1]) * np.float32(np.sqrt(2.0 / n_modes))


# ----------------------------------------------------------------------------- shapes
# Shapes are signed distances in nominal voxels (< 0 inside) over the heart-frame coordinates q, a
# tuple of three (X, Y, Z) arrays: a union is a minimum, a wall is 0 < d <= thickness.

def unit(v):
    return np.asarray(v, float) / np.linalg.norm(v)


def reach(radii, direction):
    """Distance from an ellipsoid's centre to its surface along a unit direction."""
    return 1.0 / np.sqrt(np.sum((np.asarray(direction) / radii) ** 2))


def ellipsoid(q, center, radii, wobble):
    """A deformed ellipsoid: its radius in each direction is scaled by (1 + wobble), wobble a (X, Y, Z)
    field."""
    d = [qi - np.float32(c) for qi, c in zip(q, center)]
    r = np.sqrt(sum((di / np.float32(ri)) ** 2 for di, ri in zip(d, radii)))   # 1 on the undeformed surface
    along = np.sqrt(sum(di * di for di in d)) / np.maximum(r, 1e-3)     # the radius in this voxel's direction
    return (r - 1.0 - wobble) * along


def tube(q, points, radii):
    """A tube around the polyline `points` (K, 3) whose radius goes linearly through `radii` (K,)."""
    best = np.full(q[0].shape, np.inf, np.float32)
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        ab = (b - a).astype(np.float32)
        rel = [qi - np.float32(ai) for qi, ai in zip(q, a)]
        t = np.clip(sum(r * x for r, x in zip(rel, ab)) / np.float32(ab @ ab), 0.0, 1.0)
        dist = np.sqrt(sum((r - t * x) ** 2 for r, x in zip(rel, ab)))
        np.minimum(best, dist - (ra + t * (rb - ra)), out=best)
    return best


def bend(p0, p1, p2, n=6):
    """n points (n, 3) along the quadratic Bezier curve p0 -> p2 with control point p1."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2


# ----------------------------------------------------------------------------- the anatomy

def anatomy(rng, q, wobble):
    """Signed distances of every blood pool, and the wall thickness around each (nominal voxels).

    The heart frame: the LA body centred at 0, x to the patient's left, y posterior, z up. Sizes,
    positions and the gaps between pools vary per case; a negative gap is an overlap (no wall).
    Returns {name: (signed distance (X, Y, Z), wall thickness)}."""
    u = rng.uniform
    la_r = np.array(LA_RADII) * u(0.75, 1.3, 3)
    atrial_wall = u(0.8, 1.6)                                          # thin: LGE shows it faintly, with gaps
    pools = {"la": (ellipsoid(q, (0, 0, 0), la_r, 0.15 * wobble[0]), atrial_wall)}
    # four pulmonary veins leave the back of the LA to the left and right, above and below
    veins = []
    for side, level in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        d = unit([side, u(0.3, 0.9), level * u(0.3, 0.7)])
        s = d * reach(la_r, d)                                           # ostium on the body surface
        out = unit([side * u(0.6, 1.0), u(0.4, 1.0), level * u(0.0, 0.5)])  # veins curve backwards
        r0 = u(2.6, 3.8)
        path = np.vstack([0.6 * s, bend(s, s + 6 * d, s + 6 * d + u(16, 24) * out)])
        veins.append(tube(q, path, np.r_[r0, np.linspace(r0, 0.75 * r0, len(path) - 1)]))
    pools["veins"] = (np.minimum.reduce(veins), atrial_wall)
    # the appendage: a thin finger from the front-left roof, curling forward and down
    d = unit([0.8 + u(-0.2, 0.2), -0.8 + u(-0.2, 0.2), 0.4 + u(-0.2, 0.2)])
    s = d * reach(la_r, d)
    path = (np.array([0.7 * s, s + 3 * d, s + 6 * d + [2, -3, 1], s + 7 * d + [3, -4, -4]])
            + u(-1.5, 1.5, (4, 3)))
    pools["appendage"] = (tube(q, path, np.array([3.8, 3.0, 2.3, 1.3]) * u(0.8, 1.2)), atrial_wall)
    # the left ventricle, in front, left and below, opening into the LA at the mitral plane (no wall)
    d = unit([u(0.2, 0.7), -1.0, u(-1.1, -0.6)])
    lv_r = np.array([15.0, 13.0, 18.0]) * u(0.85, 1.15, 3)
    center = d * (reach(la_r, d) + reach(lv_r, d) - u(1.0, 2.5))
    pools["lv"] = (ellipsoid(q, center, lv_r, 0.08 * wobble[1]), u(3.0, 5.0))   # thick, nulled myocardium
    # the right atrium to the right and in front, behind the thin interatrial septum; the SVC rises from it
    d = unit([-1.0, u(-0.6, -0.2), u(-0.3, 0.1)])
    ra_r = np.array([12.0, 12.0, 14.0]) * u(0.85, 1.15, 3)
    center = d * (reach(la_r, d) + reach(ra_r, d) + u(0.5, 2.5))
    pools["ra"] = (ellipsoid(q, center, ra_r, 0.1 * wobble[2]), atrial_wall)
    r = u(4.0, 5.5)
    pools["svc"] = (tube(q, np.array([center + [2, 3, 6], center + [3, 5, 40]]), np.array([r, r])),
                    u(1.0, 2.0))
    # the ascending aorta rises in front of the LA, from the LV outflow; sometimes touching it
    r, x = u(5.5, 7.5), u(-6.0, 2.0)
    y = -la_r[1] * np.sqrt(max(1 - (x / la_r[0]) ** 2, 0.3)) - r - u(-2.0, 2.0)
    path = np.array([[x + 4, y - 5, -la_r[2]], [x, y, 0.3 * la_r[2]], [x - 3, y + 2, la_r[2] + 30]])
    pools["aorta"] = (tube(q, path, np.array([r * 1.15, r, r])), u(1.0, 2.0))
    # the descending aorta runs down behind the LA, beside the spine
    r, x = u(5.0, 7.0), la_r[0] * u(0.1, 0.6)
    y = la_r[1] + r + u(-1.0, 4.0)
    path = np.array([[x, y, -50.0], [x + u(-3, 3), y + u(-2, 2), 50.0]])
    pools["descending"] = (tube(q, path, np.array([r, r])), u(1.0, 2.0))
    # the pulmonary artery: trunk in front on the left, branches over the LA roof (the right one may touch it)
    r, top = u(4.5, 6.0), la_r[2] + u(-2.0, 2.0)
    fork = np.array([6.0, -la_r[1] - 9, top + r + 3])
    trunk = np.array([[12.0, -la_r[1] - 18, -8.0], fork])
    right = np.array([fork, [0.0, -2.0, top + r], [-40.0, 0.0, top + r + 2]])
    left = np.array([fork, [28.0, 2.0, top + r + 4], [40.0, 16.0, top + r]])
    pa = [tube(q, p, np.full(len(p), rr)) for p, rr in ((trunk, 1.2 * r), (right, r), (left, r))]
    pools["pa"] = (np.minimum.reduce(pa), u(1.0, 2.0))
    return pools


def heart_frame(rng, grid, size, scale):
    """Per-case pose and field of view: the heart-frame coordinates q (3 arrays (X, Y, Z)) of every voxel.

    The LA centre sits near the middle of the crop (the challenge crops are cut around it), up to 10 % of
    the crop off it; the heart turns up to 0.7 rad in the axial plane and tilts up to 0.5 rad out of it (the
    augmentation turns only in the axial plane); its size varies from -30 % to +40 %. Version 2 had 6 %,
    0.4 and 0.15 rad and +-12 %, and eight labeled cases covered it; version 3 had 0.3 rad and -20 / +25 %
    (docs/phantom.md, "Versions")."""
    center = np.asarray(size) / 2 + rng.uniform(-0.1, 0.1, 3) * size
    a, b, c = rng.uniform(-0.7, 0.7), rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    inverse = ((rz @ rx @ ry).T / (scale * rng.uniform(0.7, 1.4))).astype(np.float32)  # volume -> heart frame
    rel = [g - np.float32(c0) for g, c0 in zip(grid, center)]
    return tuple(sum(inverse[i, j] * rel[j] for j in range(3)) for i in range(3))


# ----------------------------------------------------------------------------- the image

def paint(rng, grid, pools, s):
    """The noise-free LGE-like image (X, Y, Z) of the pools, and the boolean parts for tests and summaries.

    Blood = 1 with a slow heterogeneous enhancement; the contrast of blood to tissue, fat, lungs and
    walls is drawn per case. Walls are nulled myocardium with gaps and a few enhanced (scar-like)
    patches. `s` is voxels per nominal voxel: texture scales follow the anatomy."""
    u = rng.uniform
    field = lambda scale: smooth_field(rng, grid, scale * s)
    blood_d = np.minimum.reduce([d for d, _ in pools.values()])
    blood = blood_d <= 0
    tissue = 1.0 / u(1.4, 4.0)                                          # blood-to-tissue contrast varies most
    image = tissue * (1 + 0.2 * field(1.5) + 0.1 * field(6))            # mediastinal tissue, mottled
    fat = (blood_d > 0) & (blood_d <= u(3, 6)) & (field(3) > u(0.0, 0.8))
    image[fat] = u(0.45, 0.7) * (1 + 0.15 * field(1.5))[fat]              # epicardial fat: bright, not blood
    lung = blood_d > u(6, 10) + 4 * field(10)
    image[lung] = u(0.02, 0.12)                                          # air: almost no signal
    thin, thick = np.zeros_like(blood), np.zeros_like(blood)
    for d, thickness in pools.values():
        (thick if thickness > THIN else thin)[...] |= (d > 0) & (d <= thickness)
    wall = ~blood & (thick | (thin & (field(3) < u(0.6, 1.4))))        # thin walls are not seen everywhere
    image[wall] = tissue * u(0.2, 0.5)                                 # nulled myocardium: darker than tissue
    scar = wall & (field(3) > u(0.4, 1.4))
    image[scar] = u(0.5, 0.8)                                          # late enhancement: bright wall patches
    image[blood] = (1 + u(0.03, 0.12) * field(5))[blood]                # heterogeneous blood-pool enhancement
    return image, blood, wall


def make_case(rng, shape):
    """One phantom case of about `shape` (X and Y vary by up to 15 %, Z is kept).

    Returns image float32 (X, Y, Z) z-scored over the volume, label uint8 (LA body, appendage and
    veins up to VEIN_LABEL, INSET inside their blood), and boolean parts for tests and summaries:
    "target" (the label), "atrium" (the blood the label stands for), "other" (every other blood
    voxel: other pools and the veins' continuation), "wall" (dark walls outside the atrium)."""
    size = np.array([round(shape[0] * rng.uniform(0.85, 1.15)), round(shape[1] * rng.uniform(0.85, 1.15)),
                     shape[2]])
    grid = [g.astype(np.float32) for g in np.ogrid[:size[0], :size[1], :size[2]]]
    s = shape[0] / NOMINAL                                               # voxels per nominal voxel
    q = heart_frame(rng, grid, size, s)
    pools = anatomy(rng, q, [smooth_field(rng, grid, 8 * s) for _ in range(3)])
    la, veins = pools["la"][0], pools["veins"][0]
    own = np.minimum(np.minimum(la, pools["appendage"][0]), np.where(la <= VEIN_LABEL, veins, np.inf))
    image, blood, wall = paint(rng, grid, pools, s)
    u = rng.uniform
    image = ndimage.gaussian_filter(image, u(0.4, 1.3) * s, truncate=3.0)         # partial volume
    image *= np.exp(u(0.05, 0.35) * smooth_field(rng, grid, 30 * s))                # coil bias field
    sigma = u(0.02, 0.12)                                                         # noise, relative to blood
    noise = rng.standard_normal((2, *image.shape), dtype=np.float32) * sigma
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)                    # magnitude of complex data
    image = image ** u(0.6, 1.6)                                                # scanner's intensity response
    image = ((image - image.mean()) / image.std()).astype(np.float32)
    target, atrium = own <= -INSET, own <= 0
    return image, target.astype(np.uint8), {"target": target, "atrium": atrium, "other": blood & ~atrium,
                                            "wall": wall & ~atrium}


# ----------------------------------------------------------------------------- the dataset on disk

def phantom_params(n_train, n_test, shape, seed):
    """The parameters that define a phantom dataset, as stored in phantom.json (checked here)."""
    if n_train < 1 or n_test < 1 or len(shape) != 3 or min(shape) < 16:
        raise ConfigError(f"phantom: need n_train, n_test >= 1 and a 3D shape of at least 16 voxels a side, "
                         f"got n_train={n_train}, n_test={n_test}, shape={tuple(shape)}")
    return {"n_train": int(n_train), "n_test": int(n_test), "shape": [int(v) for v in shape],
            "seed": int(seed), "version": VERSION}


def numbered_case(seed, i, shape):
    """Case i of a seed and its ID, from its own generator: the same case whatever the counts."""
    rng = np.random.default_rng([seed, i])
    return ("".join(rng.choice(list(ID_CHARS), 20)), *make_case(rng, shape))


def case_bytes(image, label):
    """A case file's bytes, built in memory: h5py writing a file itself reports a full disk only as noise."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label, compression="gzip")
    return buffer.getvalue()


def write_cases(folder, params):
    """Write every case, train.list and test.list into `folder`; returns the mean summary figures."""
    ids, stats = [], []
    for i in range(params["n_train"] + params["n_test"]):
        case_id, image, label, parts = numbered_case(params["seed"], i, params["shape"])
        ids.append(case_id)
        path = folder / CASE_DIR / case_id / CASE_FILE
        files.make_folder(path.parent)
        files.write_bytes(path, case_bytes(image, label))
        rest = ~(parts["atrium"] | parts["other"] | parts["wall"])
        stats.append([label.mean()] + [image[m].mean() if m.any() else np.nan
                                       for m in (parts["target"], parts["other"], parts["wall"], rest)])
    files.write_text(folder / "train.list", "".join(f"{i}\n" for i in ids[:params["n_train"]]))
    files.write_text(folder / "test.list", "".join(f"{i}\n" for i in ids[params["n_train"]:]))
    names = ["foreground_fraction", "target", "other_blood", "wall", "rest"]  # mean z-scored intensities
    return dict(zip(names, np.round(np.nanmean(stats, axis=0), 4).tolist()))


def write_phantom(root, n_train=40, n_test=10, shape=SHAPE, seed=0):
    """Write a phantom dataset at `root` and return `root`.

    An earlier phantom there is replaced with everything in its folder (a CoT cache made for the
    old cases included: it would be stale); any other non-empty folder is left alone with an error.
    The cases are built in a temp folder beside `root` that is renamed into place, so an interrupted
    write never leaves a half dataset that looks complete. It runs under a lock beside `root`: another
    process writing the same phantom waits, and the temp folder of a write that was killed is removed."""
    root, params = Path(root), phantom_params(n_train, n_test, shape, seed)
    with phantom_lock(root):
        return replace_phantom(root, params)


def ensure_phantom(root, n_train=40, n_test=10, shape=SHAPE, seed=0):
    """The phantom at `root`, written only when missing or written with other parameters."""
    root, params = Path(root), phantom_params(n_train, n_test, shape, seed)
    if written_params(root) != params:
        with phantom_lock(root):
            if written_params(root) != params:         # another process may have written it meanwhile
                replace_phantom(root, params)
    return root


def ensure_for(cfg, world=World()):
    """Write an experiment's synthetic dataset when its config asks for one (rank 0 first under torchrun)."""
    if cfg.phantom:
        with main_first(world):
            ensure_phantom(cfg.data_root, n_train=cfg.phantom_cases[0], n_test=cfg.phantom_cases[1],
                           shape=tuple(cfg.phantom_shape), seed=0)


def phantom_lock(root):
    return files.Lock(root.parent / f".{root.name}.lock")


def written_params(root):
    """The parameters the phantom at `root` was written with, or None (missing or damaged: write it anew)."""
    try:
        return json.loads((root / PARAMS_FILE).read_text())["params"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def replace_phantom(root, params):
    """write_phantom's work, under its lock."""
    if root.exists() and any(root.iterdir()) and not (root / PARAMS_FILE).exists():
        raise NotAPhantom(f"{root}: not empty and not a phantom dataset; refusing to replace it "
                          "(give an empty or new folder, or --phantom=false to use the data there)")
    tmp, old = files.temp_path(root), files.temp_path(root)
    try:
        summary = {**write_cases(tmp, params), "threshold_dice": round(threshold_dice(tmp)["dice"], 4)}
        files.write_text(tmp / PARAMS_FILE, json.dumps({"params": params, "summary": summary}, indent=1))
        with files.writing(root):
            if root.exists():
                root.rename(old)
            tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return root


def read_cases(root):
    """(image, boolean label) of every case in train.list, then test.list, of an LA-layout root, one at a
    time."""
    root = Path(root)
    for name in ("train.list", "test.list"):
        for case_id in (root / name).read_text().split():
            with h5py.File(root / CASE_DIR / case_id / CASE_FILE, "r") as f:
                yield f["image"][()], f["label"][()].astype(bool)


def threshold_dice(root, levels=512, sample=16):
    """How far intensity alone gets on an LA-layout dataset: Dice of the best single global threshold.

    One threshold for the whole dataset, foreground = image > threshold, chosen among `levels`
    quantiles of a 1-in-`sample` voxel sample of all cases. "dice" is the mean of the per-case
    Dice at the threshold that maximises it (as test.py averages Dice); "pooled" the best Dice of
    all voxels counted together. The cases are read twice (candidates, then exact counts), so
    memory holds one case at a time, also for the 100 real LA volumes."""
    values = np.concatenate([image.ravel()[::sample] for image, _ in read_cases(root)])
    t = np.unique(np.quantile(values, np.linspace(0.5, 0.9995, levels)))                # (T,) candidates
    above, hits, sizes = [], [], []
    for image, label in read_cases(root):
        x, x_label = np.sort(image.ravel()), np.sort(image[label])
        above.append(x.size - np.searchsorted(x, t, "right"))                           # voxels over each t
        hits.append(x_label.size - np.searchsorted(x_label, t, "right"))                # label voxels over it
        sizes.append(x_label.size)
    above, hits, sizes = np.array(above), np.array(hits), np.array(sizes)[:, None]     # (N, T) (N, T) (N, 1)
    per_case = (2 * hits / np.maximum(above + sizes, 1)).mean(0)                        # (T,)
    pooled = 2 * hits.sum(0) / np.maximum(above.sum(0) + sizes.sum(), 1)
    best = int(per_case.argmax())
    return {"dice": float(per_case[best]), "threshold": float(t[best]), "pooled": float(pooled.max())}


def preview(root, png, n=4):
    """Save axial slices of the first n training cases, the LA label outlined in red: three levels
    (low, middle, high) through the label, in radiological view (anterior up, patient's right on the left)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    root = Path(root)
    ids = (root / "train.list").read_text().split()[:n]
    levels = (0.25, 0.5, 0.75)                                           # of the label's z range
    fig, axes = plt.subplots(len(levels), len(ids), figsize=(2.6 * len(ids), 2.6 * len(levels)),
                             squeeze=False)
    for j, cid in enumerate(ids):
        with h5py.File(root / CASE_DIR / cid / CASE_FILE, "r") as f:
            image, label = f["image"][()], f["label"][()]
        zs = np.flatnonzero(label.any((0, 1)))
        vmin, vmax = np.percentile(image, [1, 99.5])
        for i, level in enumerate(levels):
            z = int(round(zs[0] + level * (zs[-1] - zs[0])))
            ax = axes[len(levels) - 1 - i, j]                            # the highest slice in the top row
            ax.imshow(image[:, :, z].T, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.contour(label[:, :, z].T, [0.5], colors="r", linewidths=0.8)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlabel(f"z = {z}", fontsize=7, labelpad=1)
        axes[0, j].set_title(f"{cid[:8]}  {image.shape[0]}x{image.shape[1]}x{image.shape[2]}", fontsize=8)
    fig.suptitle("phantom LGE-MRI, axial; red: LA label (body, appendage, vein ostia)", fontsize=9)
    fig.tight_layout()
    files.save_figure(fig, png, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a synthetic LA-layout dataset (docs/phantom.md).",
                                allow_abbrev=False)
    p.add_argument("--out", default="data/phantom", help="dataset root")
    n_train, n_test = EXPERIMENTS["PHANTOM_8"]["phantom_cases"]                # PHANTOM_8's folder by default
    p.add_argument("--n-train", type=int, default=n_train)
    p.add_argument("--n-test", type=int, default=n_test)
    p.add_argument("--shape", type=int, nargs=3, default=list(SHAPE), metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preview", metavar="PNG", help="also save axial slices of a few cases here")
    p.add_argument("--threshold-dice", metavar="ROOT",
                   help="only measure the best global threshold Dice of the LA-layout dataset at ROOT "
                        "(real LA or a phantom)")
    args = p.parse_args(argv)
    if args.threshold_dice:
        r = threshold_dice(args.threshold_dice)
        return print(f"{args.threshold_dice}: best global threshold {r['threshold']:.3f}, Dice "
                     f"{r['dice']:.3f} (mean over cases), pooled over all voxels {r['pooled']:.3f}")
    t0 = time.time()
    root = write_phantom(args.out, args.n_train, args.n_test, args.shape, args.seed)
    summary = json.loads((root / PARAMS_FILE).read_text())["summary"]
    print(f"wrote {args.n_train} train + {args.n_test} test cases to {root} in {time.time() - t0:.1f} s")
    print(f"foreground fraction {summary['foreground_fraction']:.3f}; mean z-scored intensity: target "
          f"{summary['target']:.2f}, other blood {summary['other_blood']:.2f}, wall {summary['wall']:.2f}, "
          f"rest {summary['rest']:.2f}")
    print(f"intensity alone: the best global threshold gives Dice {summary['threshold_dice']:.3f} (mean over "
          "cases)")
    if args.preview:
        preview(root, args.preview)
        print(f"preview: {args.preview}")


if __name__ == "__main__":
    sys.exit(cli(main))
