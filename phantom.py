"""Synthetic left-atrium phantoms in the exact LA layout, the offline default (docs/phantom.md): LGE-MRI-like
crops where the LA shares its intensity with the heart's other blood pools, so only position, shape and
context find the label (`threshold_dice`). A seed gives byte-identical files."""
import io
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from config import (EXPERIMENTS, CersError, ConfigError, Lock, World, main_first, make_folder, temp_path,
                    write_bytes, write_text, writing)
from data import CASE_DIR, CASE_FILE, case_path, read_case, read_list

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
    """A smooth random field (mean ~0, std ~1): n_modes cosines of wavelength ~2 * scale, in one matmul."""
    w = rng.normal(0.0, np.pi / (2 * scale), (3, n_modes))
    phase = rng.uniform(0, 2 * np.pi, (3, n_modes))
    ex, ey, ez = (np.exp(1j * (w[i, :, None] * grid[i].ravel() + phase[i, :, None])).astype(np.complex64)
                  for i in range(3))                                                    # (K, X) (K, Y) (K, Z)
    xy = (ex[:, :, None] * ey[:, None, :]).reshape(n_modes, -1)                               # (K, X*Y)
    field = np.concatenate([xy.real, -xy.imag]).T @ np.concatenate([ez.real, ez.imag])        # Re(xy^T ez)
    return field.reshape(ex.shape[1], ey.shape[1], ez.shape[1]) * np.float32(np.sqrt(2.0 / n_modes))


# Shapes are signed distances in nominal voxels (< 0 inside) over the heart-frame coordinates q (X, Y, Z).
def ellipsoid(q, center, radii, wobble):
    """A deformed ellipsoid: its radius in each direction scaled by (1 + wobble), an (X, Y, Z) field."""
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


def anatomy(rng, q, wobble):
    """{name: (signed distance, wall thickness)} of every blood pool; LA at 0, x left, y posterior, z up."""
    def unit(v):
        return np.asarray(v, float) / np.linalg.norm(v)

    def reach(radii, direction):  # an ellipsoid's centre-to-surface distance along a unit direction
        return 1.0 / np.sqrt(np.sum((np.asarray(direction) / radii) ** 2))
    u = rng.uniform
    la_r = np.array(LA_RADII) * u(0.75, 1.3, 3)
    atrial_wall = u(0.8, 1.6)                                          # thin: LGE shows it faintly, with gaps
    pools = {"la": (ellipsoid(q, (0, 0, 0), la_r, 0.15 * wobble[0]), atrial_wall)}
    veins = []                        # four pulmonary veins leave the back to the left and right, up and down
    for side, level in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        d = unit([side, u(0.3, 0.9), level * u(0.3, 0.7)])
        s = d * reach(la_r, d)                                           # ostium on the body surface
        out = unit([side * u(0.6, 1.0), u(0.4, 1.0), level * u(0.0, 0.5)])  # veins curve backwards
        r0, end = u(2.6, 3.8), s + 6 * d + u(16, 24) * out
        t = np.linspace(0.0, 1.0, 6)[:, None]                   # a quadratic Bezier curve from s to end
        path = np.vstack([0.6 * s, (1 - t) ** 2 * s + 2 * t * (1 - t) * (s + 6 * d) + t ** 2 * end])
        veins.append(tube(q, path, np.r_[r0, np.linspace(r0, 0.75 * r0, len(path) - 1)]))
    pools["veins"] = (np.minimum.reduce(veins), atrial_wall)
    d = unit([0.8 + u(-0.2, 0.2), -0.8 + u(-0.2, 0.2), 0.4 + u(-0.2, 0.2)])
    s = d * reach(la_r, d)                       # the appendage: from the front-left roof, forward and down
    path = (np.array([0.7 * s, s + 3 * d, s + 6 * d + [2, -3, 1], s + 7 * d + [3, -4, -4]])
            + u(-1.5, 1.5, (4, 3)))
    pools["appendage"] = (tube(q, path, np.array([3.8, 3.0, 2.3, 1.3]) * u(0.8, 1.2)), atrial_wall)
    d = unit([u(0.2, 0.7), -1.0, u(-1.1, -0.6)])                # the LV: in front, left and below
    lv_r = np.array([15.0, 13.0, 18.0]) * u(0.85, 1.15, 3)
    center = d * (reach(la_r, d) + reach(lv_r, d) - u(1.0, 2.5))    # overlaps: the mitral plane has no wall
    pools["lv"] = (ellipsoid(q, center, lv_r, 0.08 * wobble[1]), u(3.0, 5.0))   # thick, nulled myocardium
    d = unit([-1.0, u(-0.6, -0.2), u(-0.3, 0.1)])      # the RA: right and in front, beyond the thin septum
    ra_r = np.array([12.0, 12.0, 14.0]) * u(0.85, 1.15, 3)
    center = d * (reach(la_r, d) + reach(ra_r, d) + u(0.5, 2.5))
    pools["ra"] = (ellipsoid(q, center, ra_r, 0.1 * wobble[2]), atrial_wall)
    r = u(4.0, 5.5)                                                     # the SVC rises from the RA
    pools["svc"] = (tube(q, center + np.array([[2, 3, 6], [3, 5, 40]]), np.full(2, r)), u(1.0, 2.0))
    r, x = u(5.5, 7.5), u(-6.0, 2.0)                # the ascending aorta: in front of the LA, may touch it
    y = -la_r[1] * np.sqrt(max(1 - (x / la_r[0]) ** 2, 0.3)) - r - u(-2.0, 2.0)
    path = np.array([[x + 4, y - 5, -la_r[2]], [x, y, 0.3 * la_r[2]], [x - 3, y + 2, la_r[2] + 30]])
    pools["aorta"] = (tube(q, path, np.array([r * 1.15, r, r])), u(1.0, 2.0))
    r, x = u(5.0, 7.0), la_r[0] * u(0.1, 0.6)                  # the descending aorta: behind, by the spine
    y = la_r[1] + r + u(-1.0, 4.0)
    path = np.array([[x, y, -50.0], [x + u(-3, 3), y + u(-2, 2), 50.0]])
    pools["descending"] = (tube(q, path, np.array([r, r])), u(1.0, 2.0))
    r, top = u(4.5, 6.0), la_r[2] + u(-2.0, 2.0)      # the PA: trunk front left, branches over the LA roof
    fork = np.array([6.0, -la_r[1] - 9, top + r + 3])
    trunk = np.array([[12.0, -la_r[1] - 18, -8.0], fork])
    right = np.array([fork, [0.0, -2.0, top + r], [-40.0, 0.0, top + r + 2]])
    left = np.array([fork, [28.0, 2.0, top + r + 4], [40.0, 16.0, top + r]])
    pa = [tube(q, p, np.full(len(p), rr)) for p, rr in ((trunk, 1.2 * r), (right, r), (left, r))]
    pools["pa"] = (np.minimum.reduce(pa), u(1.0, 2.0))
    return pools


def heart_frame(rng, grid, size, scale):
    """The heart-frame coordinates q of every voxel, for a per-case pose, size and field of view."""
    center = np.asarray(size) / 2 + rng.uniform(-0.1, 0.1, 3) * size             # up to 10 % off the middle
    a, b, c = rng.uniform(-0.7, 0.7), rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)   # turn, tilts (rad)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    inverse = ((rz @ rx @ ry).T / (scale * rng.uniform(0.7, 1.4))).astype(np.float32)  # size -30 to +40 %
    rel = [g - np.float32(c0) for g, c0 in zip(grid, center)]
    return tuple(sum(inverse[i, j] * rel[j] for j in range(3)) for i in range(3))


def make_case(rng, shape):
    """One case of about `shape`: image, label, and masks target, atrium (its blood), other blood, wall."""
    def field(scale):                                                    # `scale` in nominal voxels
        return smooth_field(rng, grid, scale * s)
    u = rng.uniform
    size = np.array([*(round(n * u(0.85, 1.15)) for n in shape[:2]), shape[2]])              # X, Y +-15 %
    grid = [g.astype(np.float32) for g in np.ogrid[:size[0], :size[1], :size[2]]]
    s = shape[0] / NOMINAL                                               # voxels per nominal voxel
    pools = anatomy(rng, heart_frame(rng, grid, size, s), [field(8) for _ in range(3)])
    la, veins = pools["la"][0], pools["veins"][0]
    own = np.minimum(np.minimum(la, pools["appendage"][0]), np.where(la <= VEIN_LABEL, veins, np.inf))
    blood_d = np.minimum.reduce([d for d, _ in pools.values()])        # paint the noise-free LGE-like image
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
    image = ndimage.gaussian_filter(image, u(0.4, 1.3) * s, truncate=3.0)         # partial volume
    image *= np.exp(u(0.05, 0.35) * field(30))                                      # coil bias field
    noise = u(0.02, 0.12) * rng.standard_normal((2, *image.shape), dtype=np.float32)   # relative to blood
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)                    # magnitude of complex data
    image = image ** u(0.6, 1.6)                                                # scanner's intensity response
    image = ((image - image.mean()) / image.std()).astype(np.float32)
    target, atrium = own <= -INSET, own <= 0
    return image, target.astype(np.uint8), {"target": target, "atrium": atrium, "other": blood & ~atrium,
                                            "wall": wall & ~atrium, "rest": ~(blood | wall)}


def write_cases(folder, params):
    """Write every case, train.list and test.list into `folder`; returns the mean summary figures."""
    ids, stats, n_train = [], [], params["n_train"]
    for i in range(n_train + params["n_test"]):
        rng = np.random.default_rng([params["seed"], i])        # case i's own: the same whatever the counts
        ids.append("".join(rng.choice(list(ID_CHARS), 20)))
        image, label, parts = make_case(rng, params["shape"])
        buffer = io.BytesIO()            # built in memory: h5py writing a file reports a full disk as noise
        with h5py.File(buffer, "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=label, compression="gzip")
        write_bytes(make_folder(folder / CASE_DIR / ids[-1]) / CASE_FILE, buffer.getvalue())
        stats.append([label.mean()] + [image[parts[k]].mean() if parts[k].any() else np.nan
                                       for k in ("target", "other", "wall", "rest")])
    for name, part in (("train.list", ids[:n_train]), ("test.list", ids[n_train:])):
        write_text(folder / name, "".join(f"{i}\n" for i in part))
    names = ["foreground_fraction", "target", "other_blood", "wall", "rest"]  # mean z-scored intensities
    return dict(zip(names, np.round(np.nanmean(stats, axis=0), 4).tolist()))


def written_params(root):
    """The parameters the phantom at `root` was written with, or None (missing or damaged: write it anew)."""
    try:
        return json.loads((root / PARAMS_FILE).read_text())["params"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_phantom(root, n_train=40, n_test=10, shape=SHAPE, seed=0, rewrite=False):
    """The phantom at `root`, written when missing, made with other parameters (phantom.json) or `rewrite`:
    under a lock beside it, in a temp folder renamed onto `root` (never half written), the old one removed."""
    if n_train < 1 or n_test < 1 or len(shape) != 3 or min(shape) < 16:
        raise ConfigError(f"phantom: need n_train, n_test >= 1 and a 3D shape of at least 16 voxels a side, "
                          f"got n_train={n_train}, n_test={n_test}, shape={tuple(shape)}")
    root = Path(root)
    params = {"n_train": int(n_train), "n_test": int(n_test), "shape": [int(v) for v in shape],
              "seed": int(seed), "version": VERSION}
    if not rewrite and written_params(root) == params:
        return root
    with Lock(root.parent / f".{root.name}.lock"):
        if not rewrite and written_params(root) == params:       # another process wrote it while this waited
            return root
        if root.exists() and any(root.iterdir()) and not (root / PARAMS_FILE).exists():
            raise NotAPhantom(f"{root}: not empty and not a phantom dataset; refusing to replace it "
                              "(give an empty or new folder, or --phantom=false to use the data there)")
        tmp, old = temp_path(root), temp_path(root)
        try:
            summary = {**write_cases(tmp, params), "threshold_dice": round(threshold_dice(tmp)["dice"], 4)}
            write_text(tmp / PARAMS_FILE, json.dumps({"params": params, "summary": summary}, indent=1))
            with writing(root):
                if root.exists():
                    root.rename(old)
                tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return root


def ensure_for(cfg, world=World()):
    """Write an experiment's synthetic dataset when its config asks for one (rank 0 first under torchrun)."""
    if cfg.phantom:
        with main_first(world):
            ensure_phantom(cfg.data_root, *cfg.phantom_cases, shape=cfg.phantom_shape)  # (train, test) counts


def threshold_dice(root, levels=512, sample=16):
    """Dice of the best single global threshold ("dice": mean per case, as test.py; "pooled": all voxels)."""
    paths = [case_path(root, i) for name in ("train.list", "test.list") for i in read_list(Path(root) / name)]
    values = np.concatenate([read_case(p)[0].ravel()[::sample] for p in paths])       # pass 1: candidates
    t = np.unique(np.quantile(values, np.linspace(0.5, 0.9995, levels)))                # (T,)
    above, hits, sizes = [], [], []
    for image, label in map(read_case, paths):                          # pass 2: one case in memory at a time
        x, x_label = np.sort(image.ravel()), np.sort(image[label == 1])
        above.append(x.size - np.searchsorted(x, t, "right"))                           # voxels over each t
        hits.append(x_label.size - np.searchsorted(x_label, t, "right"))                # label voxels over it
        sizes.append(x_label.size)
    above, hits, sizes = np.array(above), np.array(hits), np.array(sizes)[:, None]     # (N, T) (N, T) (N, 1)
    per_case = (2 * hits / np.maximum(above + sizes, 1)).mean(0)                        # (T,)
    pooled = 2 * hits.sum(0) / np.maximum(above.sum(0) + sizes.sum(), 1)
    best = int(per_case.argmax())
    return {"dice": float(per_case[best]), "threshold": float(t[best]), "pooled": float(pooled.max())}
