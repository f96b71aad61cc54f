"""LA-format data: reading, splits, coarser grids, augmentation and semi-supervised batches (docs/design.md
§3), in the Left Atrium layout of UA-MT, MC-Net, SS-Net and BCP: <root>/train.list and test.list (80 and 20
IDs, one a line), <root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5 (image float32 (X, Y, Z), label uint8
{0, 1}). `LA_N` labels the first N IDs of train.list. Volumes are read once, augmented on the device."""
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from config import CersError, World, check_writable, make_folder, replacing

CASE_DIR = "2018LA_Seg_Training Set"  # the LA layout: <data_root>/<CASE_DIR>/<ID>/<CASE_FILE> (with spaces)
CASE_FILE = "mri_norm2.h5"
CACHE_VERSION = 1   # bump when downsample() changes what it computes: older cache files are then not read


class DataError(CersError, ValueError):
    """Bad input data; the message names the file and the problem."""


def case_path(root, case_id):
    return Path(root) / CASE_DIR / case_id / CASE_FILE


def read_list(path):
    """The IDs of a list file, one a line (blank lines, a BOM, CRLF tolerated); each a plain folder name."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    try:
        ids = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if not ids:
        raise DataError(f"{path}: list file is empty")
    for i in ids:
        if i in (".", "..") or not i.isprintable() or any(c.isspace() or c in "/\\" for c in i):
            raise DataError(f"{path}: ID {ascii(i)} is not a plain folder name (one ID a line, no "
                            "spaces, slashes or invisible characters)")
    if repeated := sorted({i for i in ids if ids.count(i) > 1}):
        raise DataError(f"{path}: list has duplicate IDs: {', '.join(map(ascii, repeated[:5]))}")
    return ids


def open_case(path, read_voxels=True):
    """Check a case file (3D 'image' and 'label' of one shape, numbers); return both as stored, or None."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: case file not found")
    try:
        with h5py.File(path, "r") as f:
            for key in ("image", "label"):
                if not isinstance(f.get(key), h5py.Dataset):
                    raise DataError(f"{path}: missing dataset '{key}' (has: {', '.join(f) or 'nothing'})")
            image, label = f["image"], f["label"]
            if image.ndim != 3 or min(image.shape) < 1:
                raise DataError(f"{path}: 'image' must be 3D (X, Y, Z), not empty; got shape {image.shape}")
            if image.shape != label.shape:
                raise DataError(f"{path}: image shape {image.shape} != label shape {label.shape}")
            if image.dtype.kind not in "iuf" or label.dtype.kind not in "biuf":
                raise DataError(f"{path}: dtypes image {image.dtype}, label {label.dtype}; expected numbers "
                                "(image float32, label uint8)")
            return (image[()], label[()]) if read_voxels else None
    except DataError:
        raise
    except Exception as e:  # h5py raises OSError / KeyError / RuntimeError for damaged files
        raise DataError(f"{path}: unreadable h5 file ({type(e).__name__}: {e})") from e


def read_case(path):
    """One validated case: image float32 (X, Y, Z) and label uint8 (X, Y, Z) with values in {0, 1}."""
    image, label = open_case(path)
    values = np.unique(label)
    if not np.isin(values, (0, 1)).all():
        raise DataError(f"{path}: label values must be in {{0, 1}}, found {values[:10].tolist()}")
    if not np.isfinite(image).all():
        raise DataError(f"{path}: image has NaN or infinite values")
    return image.astype(np.float32), label.astype(np.uint8)


@dataclass
class Split:
    root: Path
    labeled: list    # the first N IDs of train.list
    unlabeled: list  # the rest of train.list (less the validation cases)
    test: list       # the cases scored: test.list, or the validation cases when val_cases > 0
    scored: str = "test"  # "test" or "validation": which list `test` holds


def load_split(root, num_labeled, val_cases=0):
    """The LA_N split, every listed case file opened (not read). val_cases > 0 holds the last val_cases IDs of
    train.list out and scores them in place of test.list, which is then never read (docs/design.md §3)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found (for LA, put the UA-MT data/LA folder here)")
    train = read_list(root / "train.list")
    if val_cases:
        if num_labeled > len(train) - val_cases:
            raise DataError(f"{root / 'train.list'}: num_labeled={num_labeled} with val_cases={val_cases} "
                            f"needs at least {num_labeled + val_cases} IDs; the list has {len(train)}")
        test, train, scored = train[-val_cases:], train[:-val_cases], "validation"
    else:
        test, scored = read_list(root / "test.list"), "test"
        if leaked := sorted(set(test) & set(train), key=test.index):
            raise DataError(f"{root / 'test.list'}: {len(leaked)} ID(s) also in train.list, e.g. "
                            f"{leaked[0]!r}: a test case must never be trained on; remove it from a list")
    if num_labeled > len(train):
        raise DataError(f"{root / 'train.list'}: num_labeled={num_labeled} but the list has {len(train)} IDs")
    for case_id in train + test:
        if not case_path(root, case_id).is_file():
            raise DataError(f"{case_path(root, case_id)}: listed ID '{case_id}' has no h5 file")
        open_case(case_path(root, case_id), read_voxels=False)
    return Split(root, train[:num_labeled], train[num_labeled:], test, scored)


def load_volumes(root, ids, progress=True, factor=1, cache_dir=""):
    """{ID: (image, label)} numpy arrays of every case, read once, on a grid `factor` times coarser."""
    return {i: cached_downsample(case_path(root, i), factor, cache_dir)
            for i in tqdm(ids, desc="reading cases", disable=not progress, leave=False)}


def prepare_data(cfg, world=World()):
    """The split and its volumes, the test cases too with references on (the pool describes every image)."""
    split = load_split(cfg.data_root, cfg.num_labeled, cfg.val_cases)
    ids = split.labeled + split.unlabeled + (split.test if cfg.references else [])
    return split, load_volumes(cfg.data_root, ids, world.main, cfg.downsample, cfg.cache_dir)


def check_volume_cache_writable(cfg):
    """Refuse a volume cache that reading would fill but cannot write, before any data is written or read."""
    if cfg.downsample > 1 and cfg.cache_dir:
        check_writable(cfg.cache_dir)


def cached_downsample(path, factor, cache_dir):
    """downsample(read_case(path), factor), cached in cache_dir by the file's content hash for later runs."""
    if factor == 1 or not cache_dir:
        return downsample(*read_case(path), factor)
    digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()
    file = Path(cache_dir) / f"{digest}-x{factor}-v{CACHE_VERSION}.npz"
    try:
        with np.load(file) as z:
            image, label = z["image"], z["label"]
            if (str(z["source"]) == digest and int(z["factor"]) == factor and image.dtype == np.float32
                    and label.dtype == np.uint8 and image.shape == label.shape and image.ndim == 3):
                return image, label                 # else made from another file: rebuilt below
    except FileNotFoundError:
        pass
    except Exception:  # a truncated or damaged zip raises BadZipFile, EOFError, ValueError, OSError, KeyError
        print(f"note: {file}: damaged volume cache entry; rebuilding it", file=sys.stderr)
    image, label = downsample(*read_case(path), factor)
    make_folder(cache_dir)
    with replacing(file) as tmp, open(tmp, "wb") as f:      # a file: savez would add .npz to a name
        np.savez(f, image=image, label=label, source=digest, factor=factor)
    return image, label


def downsample(image, label, factor):
    """(image, label) (X, Y, Z) on a grid `factor` times coarser: image block means, label majority vote (half
    a block is foreground); the far edge that fills no whole block is dropped (upsample_probabilities)."""
    if factor == 1:
        return image, label
    if min(image.shape) < factor:
        raise DataError(f"volume of shape {image.shape} is smaller than the downsampling factor {factor}")
    n = [s // factor for s in image.shape]

    def blocks(a):                                   # (X, Y, Z) -> (X/f, Y/f, Z/f) block means
        a = a[:n[0] * factor, :n[1] * factor, :n[2] * factor].astype(np.float32)
        return a.reshape(n[0], factor, n[1], factor, n[2], factor).mean((1, 3, 5))
    return blocks(image), (blocks(label) >= 0.5).astype(np.uint8)


def upsample_probabilities(prob, factor, shape):
    """Probabilities (K, x, y, z) on the original grid (K, *shape): trilinear, zero on the cut-off edge."""
    if factor == 1:
        return prob
    up = torch.nn.functional.interpolate(torch.as_tensor(prob)[None], scale_factor=factor, mode="trilinear",
                                         align_corners=False)[0].numpy()              # (K, x*f, y*f, z*f)
    out = np.zeros((prob.shape[0], *shape), np.float32)
    out[:, :up.shape[1], :up.shape[2], :up.shape[3]] = up
    return out


def pad_to(x, size):
    """Zero-pad the last three dims of x symmetrically up to at least `size`."""
    extra = [max(want - dim, 0) for dim, want in zip(x.shape[-3:], size)]
    pads = [p for e in reversed(extra) for p in (e // 2, e - e // 2)]                 # last dim first
    return torch.nn.functional.pad(x, pads) if any(pads) else x


def rot_flip(x, k, axis):
    """The x-y augmentation of (..., X, Y, Z): rot90 k times, flip x (0) or y (1); image and label stacked."""
    return torch.flip(torch.rot90(x, k, dims=(-3, -2)), dims=(axis - 3,))


def crop(x, start, size):
    """A size-shaped crop (a view) of the last three dims starting at `start`."""
    return x[(..., *(slice(a, a + p) for a, p in zip(start, size)))]


def padded_crop(volume, box):
    """The box (x0, y0, z0, x1, y1, z1) of a volume (X, Y, Z), zero outside it as in the training crops."""
    lo, hi = np.array(box[:3]), np.array(box[3:])
    out = np.zeros(hi - lo, volume.dtype)
    a, b = np.maximum(lo, 0), np.minimum(hi, volume.shape)                  # the box's part in the volume
    out[tuple(slice(i - l, j - l) for i, j, l in zip(a, b, lo))] = volume[tuple(map(slice, a, b))]
    return out


class BatchSampler:
    """Endless batches, labeled patches first, each part through its cases in a fresh random order per pass;
    one CPU generator draws everything, and state_dict resumes a run with the batches it would have drawn."""

    def __init__(self, volumes, labeled, unlabeled, labeled_bs, batch_size, patch, device, seed):
        if batch_size > labeled_bs and not unlabeled:
            raise DataError(f"num_labeled={len(labeled)} labels every ID of train.list: the unlabeled "
                            f"patches have no case to come from; use a smaller --num_labeled, or "
                            f"--labeled_bs={batch_size} for a supervised run on all")

        def to(a, dtype):
            return torch.as_tensor(a, dtype=dtype).to(device)
        # unlabeled cases keep no label at all, so no code path can use one by mistake
        self.volumes = {i: (to(volumes[i][0], torch.float32), to(volumes[i][1], torch.uint8) if i in labeled
                            else None) for i in labeled + unlabeled}
        self.parts = [(list(labeled), labeled_bs), (list(unlabeled), batch_size - labeled_bs)]
        self.patch = tuple(patch)
        self.gen = torch.Generator().manual_seed(seed)
        self.orders, self.pos = [[], []], [0, 0]

    def _next_ids(self, part):
        ids, n = self.parts[part]
        out = []
        while len(out) < n:
            if self.pos[part] == len(self.orders[part]):
                self.orders[part], self.pos[part] = torch.randperm(len(ids), generator=self.gen).tolist(), 0
            out.append(ids[self.orders[part][self.pos[part]]])
            self.pos[part] += 1
        return out

    def _randint(self, high):
        return int(torch.randint(high, (1,), generator=self.gen))

    def sample(self, case_id):
        """One augmented patch of a case: image (1, X, Y, Z) and label (X, Y, Z), or None when unlabeled."""
        image, label = self.volumes[case_id]
        mask = torch.zeros_like(image) if label is None else label.float()
        both = pad_to(rot_flip(torch.stack([image, mask]), self._randint(4), self._randint(2)), self.patch)
        both = crop(both, [self._randint(d - p + 1) for d, p in zip(both.shape[-3:], self.patch)], self.patch)
        return both[:1], (None if label is None else both[1].to(torch.uint8))

    def next(self):
        """A batch: image (B, 1, X, Y, Z) float, label (labeled_bs, X, Y, Z) long, and the B case IDs."""
        ids = self._next_ids(0) + self._next_ids(1)
        images, labels = zip(*[self.sample(i) for i in ids])
        return torch.stack(images), torch.stack(labels[:self.parts[0][1]]).long(), ids

    def state_dict(self):
        return {"gen": self.gen.get_state(), "orders": [list(o) for o in self.orders], "pos": list(self.pos)}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.orders, self.pos = [list(o) for o in state["orders"]], list(state["pos"])
