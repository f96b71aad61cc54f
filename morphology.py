"""Descriptors of masks and images: the morphology vector of reference selection (docs/design.md §6) and
the image statistics the CoT reasoners put into words (docs/design.md §4).

    morphology_batch   shape statistics of binary masks, numpy: pool entries, explanations, the CPU step
    morphology_torch   the same vector on the training device without host-device synchronisation
    image_stats        intensity, contrast, noise and edge statistics of a volume (and of its target)

Two implementations of the morphology vector exist because the GPU step must not wait for the host;
they sit side by side here and tests/test_morphology.py holds them equal.
"""
import numpy as np
import torch
from scipy import ndimage

EPS = 1e-6
FACE6 = ndimage.generate_binary_structure(3, 1)  # voxels are neighbours when they share a face

# ----------------------------------------------------------------------------- morphology descriptors

MORPH_NAMES = (
    "fg_fraction",                             # foreground voxels / patch voxels
    "extent_x", "extent_y", "extent_z",        # bounding-box size / patch size, per axis
    "axis_ratio_mid", "axis_ratio_min",        # principal-axis lengths over the longest (1 round, 0 flat or
                                               # thin)
    "surface_to_volume",                       # mask-background faces per foreground voxel; the patch cut is
                                               # no surface
    "centroid_x", "centroid_y", "centroid_z",  # centroid offset from the patch centre / patch size, in
                                               # [-0.5, 0.5]
    "components",                              # face-connected components
    "largest_share",                           # share of the foreground in the largest component
    "border_contact",                          # share of the six patch faces the mask touches (a cut-off
                                               # target)
)
MORPH_DIM = len(MORPH_NAMES)


def morphology_batch(masks):
    """Shape descriptors (B, MORPH_DIM) float32 of binary masks (B, X, Y, Z); an empty mask gives zeros.

    Pool entries describe their ground truth and queries the teacher's prediction with this vector
    on every training batch, so it comes from 2D projections of the masks plus one scipy labelling
    of the whole batch, cropped to the masks' bounding box."""
    m = np.asarray(masks).astype(bool, copy=False)
    B, shape = m.shape[0], np.array(m.shape[1:], dtype=np.float64)
    pxy, pxz, pyz = (m.view(np.uint8).sum(axis=a, dtype=np.int32).astype(np.float64) for a in (3, 2, 1))
    px, py, pz = pxy.sum(2), pxy.sum(1), pxz.sum(1)                    # (B, X) (B, Y) (B, Z) profiles
    n = px.sum(1)                                                      # (B,) voxel counts
    safe = np.maximum(n, 1)
    cx, cy, cz = (np.arange(s, dtype=np.float64) for s in m.shape[1:])
    mean = np.stack([px @ cx, py @ cy, pz @ cz], 1) / safe[:, None]    # (B, 3)
    sxy, sxz, syz = (np.einsum("bij,i,j->b", p, a, b)
                     for p, a, b in ((pxy, cx, cy), (pxz, cx, cz), (pyz, cy, cz)))
    second = np.stack([px @ cx**2, sxy, sxz, sxy, py @ cy**2, syz, sxz, syz, pz @ cz**2],
                      1).reshape(B, 3, 3)
    # covariance of voxels taken as unit cubes (+1/12): a box's axis ratios are exactly its side ratios
    cov = second / safe[:, None, None] - mean[:, :, None] * mean[:, None, :] + np.eye(3) / 12
    ev = np.linalg.eigvalsh(cov)[:, ::-1]                              # (B, 3), longest axis first
    ratios = np.sqrt(np.clip(ev[:, 1:] / ev[:, :1], 0, 1))             # (B, 2)
    extents, touches, box = [], [], []
    for p in (px, py, pz):
        occupied = p > 0
        low, high = occupied.argmax(1), p.shape[1] - 1 - occupied[:, ::-1].argmax(1)
        extents.append((high - low + 1) / p.shape[1])
        touches += [occupied[:, 0], occupied[:, -1]]
        box.append(slice(low[n > 0].min(initial=p.shape[1]), high[n > 0].max(initial=-1) + 1))
    # the masks' union bounding box, padded with a zero voxel on each side that is not the patch border:
    # faces on the patch cut are not surface, every other face is, whatever else is in the batch
    pads = [(int(b.start > 0), int(b.stop < s)) for b, s in zip(box, m.shape[1:])]
    crop = np.pad(m[(slice(None), *box)], [(0, 0), *pads])
    faces = sum(np.count_nonzero(np.diff(crop, axis=a), axis=(1, 2, 3)) for a in (1, 2, 3))
    labels, _ = ndimage.label(crop, structure=np.stack([np.zeros_like(FACE6), FACE6, np.zeros_like(FACE6)]))
    # labels run in raster order, case after case, so each case owns a contiguous range of labels
    top = np.maximum.accumulate(labels.reshape(B, -1).max(1, initial=0))
    start = np.concatenate([[0], top[:-1]])
    sizes = np.bincount(labels.ravel(), minlength=top[-1] + 1)
    largest = np.array([sizes[a + 1:b + 1].max(initial=0) for a, b in zip(start, top)], dtype=np.float64)
    centroid = (mean - (shape - 1) / 2) / shape                        # (B, 3)
    out = np.stack([n / shape.prod(), *extents, *ratios.T, faces / safe, *centroid.T,
                    top - start, largest / safe, np.mean(touches, 0)], 1)
    out[n == 0] = 0
    return out.astype(np.float32)


def morphology(mask):
    """Shape descriptors (MORPH_DIM,) float32 of one binary mask (X, Y, Z)."""
    return morphology_batch(np.asarray(mask)[None])[0]


# Rounds of label propagation in components_torch. Measured with return_converged: the 832 training-grid
# crops (112 x 112 x 80) of all 100 LA ground truths settle in at most 3 (293 in 1, 532 in 2, 7 in 3), and
# one-voxel-thin coils of up to 12 turns in 5; 6 leaves room for the teacher's rougher predictions.
LABEL_ROUNDS = 6


def morphology_torch(masks, rounds=LABEL_ROUNDS, return_converged=False):
    """morphology_batch on the device: descriptors (B, MORPH_DIM) float32 of masks (B, X, Y, Z), where they
    are.

    Training describes the teacher's predictions on every step: nothing here reads a value back or
    takes a shape from the data, so the GPU never waits for the host. Faces are counted as neighbour
    pairs inside the patch that differ (the count of morphology_batch's padded crop), components by
    components_torch; with return_converged, also whether they settled, (B,) bool."""
    m = masks.bool()                                                        # (B, X, Y, Z)
    B, shape, f64 = m.shape[0], m.shape[1:], dict(dtype=torch.float64, device=m.device)
    pxy, pxz, pyz = (m.sum(a, dtype=torch.float64) for a in (3, 2, 1))     # (B, X, Y) (B, X, Z) (B, Y, Z)
    px, py, pz = pxy.sum(2), pxy.sum(1), pxz.sum(1)                         # (B, X) (B, Y) (B, Z) profiles
    n = px.sum(1)                                                           # (B,) voxel counts
    safe = n.clamp(min=1)
    cx, cy, cz = (torch.arange(s, **f64) for s in shape)
    mean = torch.stack([px @ cx, py @ cy, pz @ cz], 1) / safe[:, None]     # (B, 3)
    sxy, sxz, syz = (torch.einsum("bij,i,j->b", p, a, b)
                     for p, a, b in ((pxy, cx, cy), (pxz, cx, cz), (pyz, cy, cz)))
    second = torch.stack([px @ cx**2, sxy, sxz, sxy, py @ cy**2, syz, sxz, syz, pz @ cz**2],
                         1).reshape(B, 3, 3)
    cov = second / safe[:, None, None] - mean[:, :, None] * mean[:, None, :] + torch.eye(3, **f64) / 12
    ev = eigvalsh3(cov)                                                     # (B, 3), longest axis first
    ratios = (ev[:, 1:] / ev[:, :1]).clamp(0, 1).sqrt()                     # (B, 2)
    extents, touches = [], []
    for p in (px, py, pz):
        occupied, at = p > 0, torch.arange(p.shape[1], device=m.device)
        low, high = torch.where(occupied, at, p.shape[1]).amin(1), torch.where(occupied, at, -1).amax(1)
        extents.append((high - low + 1).double() / p.shape[1])
        touches += [occupied[:, 0], occupied[:, -1]]
    faces = sum((m.narrow(a, 1, s - 1) != m.narrow(a, 0, s - 1)).sum((1, 2, 3))
                for a, s in enumerate(shape, 1))
    count, largest, converged = components_torch(m, rounds, return_converged)
    out = torch.stack([n / shape.numel(), *extents, *ratios.T, faces / safe,
                       *((mean[:, i] - (s - 1) / 2) / s for i, s in enumerate(shape)),
                       count.double(), largest.double() / safe, torch.stack(touches).double().mean(0)], 1)
    out = torch.where(n[:, None] > 0, out, 0).float()                       # an empty mask: zeros
    return (out, converged) if return_converged else out


def eigvalsh3(a):
    """Eigenvalues (B, 3), largest first, of symmetric 3x3 matrices (B, 3, 3), by the trigonometric formula
    (Smith 1961): torch.linalg.eigvalsh checks for errors on the host, a sync on CUDA."""
    q = a.diagonal(dim1=1, dim2=2).mean(1)                                  # (B,) mean eigenvalue
    d = a - q[:, None, None] * torch.eye(3, dtype=a.dtype, device=a.device)  # (B, 3, 3)
    p = (d.square().sum((1, 2)) / 6).sqrt()                                 # (B,) spread of the eigenvalues
    b = d / p.clamp(min=torch.finfo(a.dtype).tiny)[:, None, None]           # (B, 3, 3); 0 when all are equal
    det = (b[:, 0] * torch.cross(b[:, 1], b[:, 2], dim=1)).sum(1)           # (B,)
    phi = torch.acos((det / 2).clamp(-1, 1)) / 3                            # (B,) in [0, pi / 3]
    first, last = q + 2 * p * torch.cos(phi), q + 2 * p * torch.cos(phi + 2 * np.pi / 3)
    return torch.stack([first, 3 * q - first - last, last], 1)


def components_torch(m, rounds, return_converged=False):
    """Face-connected components of masks (B, X, Y, Z): count (B,), largest size (B,), converged (B,) or None.

    Labels start as flat index + 1 (0 off the mask) and only grow within their component. A round gives
    each run of voxels along x, then y, then z, its largest label (scattered to the run's first voxel and
    back); the voxel a label named before the round takes the new label too (hooking, as in Shiloach-
    Vishkin); then every label is replaced twice by the label of the voxel it names (pointer jumping).
    A settled component carries its last voxel's label, and that voxel, its root, is the one labelled
    with its own index + 1; one more round would change nothing (`converged`). Unsettled, a component
    has extra roots: too many components, too small a largest one, never mixed with another's."""
    B, V = m.shape[0], m[0].numel()
    flat = torch.arange(V, device=m.device).reshape(m.shape[1:])           # (X, Y, Z) own flat index
    heads = []                                                        # per axis (B, V): run's first voxel + 1
    for d in (1, 2, 3):
        starts = m.clone()
        starts.narrow(d, 1, m.shape[d] - 1).logical_and_(~m.narrow(d, 0, m.shape[d] - 1))
        first = torch.where(starts, flat, 0).cummax(d).values              # (B, X, Y, Z); flat grows along d
        heads.append(torch.where(m, first + 1, 0).reshape(B, V))            # 0 off the mask: a slot of zeros

    # buffers (B, V + 1): slot i + 1 for voxel i, slot 0 for "off the mask", always 0
    def settle(lab):                                                        # (B, V) -> (B, V), one round
        named = lab
        for head in heads:
            lab = lab.new_zeros(B, V + 1).scatter_reduce_(1, head, lab, "amax").gather(1, head)
        table = torch.cat([lab.new_zeros(B, 1), lab], 1).scatter_reduce_(1, named, lab, "amax")  # (B, V + 1)
        for _ in range(2):
            lab = table.gather(1, table[:, 1:])
            table = torch.cat([table[:, :1], lab], 1)
        return lab

    lab = torch.where(m, flat + 1, 0).reshape(B, V)                        # (B, V)
    for _ in range(rounds):
        lab = settle(lab)
    sizes = torch.zeros(B, V + 1, dtype=lab.dtype, device=m.device).scatter_add_(1, lab, torch.ones_like(lab))
    converged = (settle(lab) == lab).all(1) if return_converged else None
    return (lab == flat.reshape(1, V) + 1).sum(1), sizes[:, 1:].amax(1), converged


# ----------------------------------------------------------------------------- image statistics

MIN_BLOB = 2e-4     # a bright structure counts when it holds at least this share of the volume
SMOOTH_SIGMA = 2.0  # voxels; heterogeneity is read from a smoothed image, so fine noise does not count twice
RING = 3            # voxels; the neighbourhood a target is compared with


def otsu(values, bins=256):
    """The threshold that best splits `values` into two intensity classes (Otsu's method)."""
    hist, edges = np.histogram(values, bins=bins)
    w0 = np.cumsum(hist.astype(np.float64))
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * (edges[:-1] + edges[1:]) / 2)
    between = w0 * w1 * (m0 / np.maximum(w0, 1) - (m0[-1] - m0) / np.maximum(w1, 1)) ** 2
    return float(edges[1:][np.argmax(between)])


def neighbours(m, combine):
    """m combined with its six face neighbours: np.logical_or dilates, np.logical_and erodes.

    Slicing, not scipy's binary morphology, which is slower on whole volumes (docs/results.md §3.4);
    outside the volume counts as the voxel itself."""
    out = m.copy()
    for a in range(3):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[a], hi[a] = slice(1, None), slice(None, -1)
        combine(out[tuple(lo)], m[tuple(hi)], out=out[tuple(lo)])
        combine(out[tuple(hi)], m[tuple(lo)], out=out[tuple(hi)])
    return out


def _median(x):
    return float(np.median(x)) if x.size else 0.0


def _std(x):
    return float(x.std()) if x.size else 0.0


def image_stats(image, mask=None):
    """Intensity statistics of a volume (X, Y, Z), and with a mask (labeled cases only) of its target.

    Two Otsu thresholds split the volume into background, tissue and bright structures (in LA MRI
    the blood pools of atrium, veins, ventricle and aorta). Intensities are in units of the
    bright-vs-tissue step, so scans with different scaling read alike."""
    x = np.asarray(image, dtype=np.float32)
    body = x > otsu(x)
    bright = x > otsu(x[body])
    tissue = body & ~bright
    step = max(_median(x[bright]) - _median(x[tissue]), EPS)                 # bright-vs-tissue intensity step
    grad = np.sqrt(sum(g * g for g in np.gradient(x)))                       # (X, Y, Z) gradient magnitude
    smooth = ndimage.gaussian_filter(x, SMOOTH_SIGMA, truncate=2.0)
    core = neighbours(bright, np.logical_and)
    sizes = np.bincount(ndimage.label(bright, FACE6)[0].ravel())[1:]
    stats = {
        "contrast": step / max(_std(x[tissue]), EPS),                         # a contrast-to-noise ratio
        "noise": 1.4826 / np.sqrt(2) * _median(np.abs(np.diff(x, axis=0))[body[1:]]) / step,  # robust sigma
        "heterogeneity": _std(smooth[core]) / step,                      # slow variation in bright structures
        "edge_sharpness": 2 * _median(grad[bright & ~core]) / step,      # 1 for an ideal step edge
        "bright_fraction": float(bright.mean()),
        "bright_structures": int((sizes >= MIN_BLOB * x.size).sum()),
        # 1: one connected bright pool
        "largest_share": float(sizes.max() / sizes.sum()) if sizes.size else 0.0,
    }
    if mask is None:
        return stats
    m = np.asarray(mask).astype(bool, copy=False)
    inner, ring = neighbours(m, np.logical_and), neighbours(m, np.logical_or)
    shell = ring & ~m                                                    # the first voxels outside the target
    for _ in range(RING - 1):
        ring = neighbours(ring, np.logical_or)
    shape = dict(zip(MORPH_NAMES, morphology(m)))
    radius = (3 * m.sum() / (4 * np.pi)) ** (1 / 3)
    return {**stats,
            "target_contrast": (_median(x[m]) - _median(x[ring & ~m])) / step,  # target vs its neighbourhood
            "target_heterogeneity": _std(smooth[inner]) / step,
            "boundary_sharpness": 2 * _median(grad[m & ~inner]) / step,
            "lookalike_share": float((bright & ~m).sum() / max(bright.sum(), 1)),  # bright tissue not target
            "lookalike_contact": float(bright[shell].mean()) if shell.any() else 0.0,  # border open to bright
            "target_fraction": float(m.mean()),
            # a digital sphere has about 1.5 * 4 pi r^2 faces: 1 = sphere-like, lower = lobulated
            "target_sphericity": float(6 * np.pi * radius**2 / max(shape["surface_to_volume"] * m.sum(), 1)),
            "target_elongation": float(1 - shape["axis_ratio_min"]),
            "target_components": int(shape["components"])}


def mask_centroids(masks):
    """Foreground centroids (..., 3) float32, in voxels, of masks (..., X, Y, Z) on their device; NaN for an
    empty mask. Pure tensor arithmetic: no host-device synchronisation."""
    m = masks.float()
    axes = [torch.arange(s, device=m.device, dtype=torch.float32) for s in m.shape[-3:]]
    sums = ((m.sum((-2, -1)) * axes[0]).sum(-1), (m.sum((-3, -1)) * axes[1]).sum(-1),
            (m.sum((-3, -2)) * axes[2]).sum(-1))
    return torch.stack(sums, -1) / m.sum((-3, -2, -1))[..., None]               # 0 / 0 = NaN when empty
