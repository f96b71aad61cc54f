"""The reference bank (docs/design.md §7): the labeled patches reference selection chooses from.

Every labeled volume is cut into a grid of patch-size crops, in each of the four orientations the
training augmentation gives a patch (data.rot_flip: a rotation by k x 90 degrees in the x-y plane, then
a flip, yields four distinct patches). Queries are augmented patches; holding every orientation makes
the bank comparable with them: the morphology vector (centroid, extents) of a rotated query meets
entries laid out the same way, so a retrieved reference's mask and its position-encoded tokens line
up with the query's. Each entry keeps its case ID, orientation, crop box (in the oriented volume),
morphology vector (of the ground truth inside the crop), the case's mask CoT, the crop's ground-truth
mask and a reference feature map: the teacher encoder's bottleneck of the crop, refreshed from the
teacher while it trains. The bank also holds what selection reads at every step, built once: the
standardised morphology with a kd-tree (stage 1 of retrieve.select), BM25 over its distinct texts
(stage 2), and device copies with per-(query case, text) BM25 tables for retrieve.select_device.

With ref_align the bank holds, per labeled case and orientation, one crop centred on its label's centroid
(centred_box) instead of the grid, and `align` moves a chosen reference's mask and features by whole
cells so that its centroid lands on the query's predicted centroid.
"""
import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

import data
from cot import CotIndex
from mcam import References, weighted_mask
from morphology import mask_centroids, morphology_batch

# the distinct patches data.rot_flip(x, k, axis) makes: (k, axis) for k in 0..3, axis in {0, 1} gives four,
# since flipping y equals flipping x after a half turn (tests/test_retrieve.py checks it)
ORIENTATIONS = ((0, 0), (0, 1), (1, 0), (1, 1))


def orient(volume, variant):
    """A volume (X, Y, Z) numpy in one of the ORIENTATIONS, exactly as data.rot_flip turns a training
    patch."""
    return data.rot_flip(torch.from_numpy(np.ascontiguousarray(volume)), *ORIENTATIONS[variant]).numpy()

def grid_boxes(shape, patch, stride):
    """Crop boxes (x0, y0, z0, x1, y1, z1) covering a volume: starts every `stride` plus one flush with the
    far edge; an axis shorter than the patch gets one box centred on it (it reaches outside, read as
    zeros)."""
    starts = []
    for size, p, s in zip(shape, patch, stride):
        if size <= p:
            starts.append([-((p - size) // 2)])
        else:
            axis = list(range(0, size - p + 1, s))
            starts.append(axis + ([size - p] if axis[-1] != size - p else []))
    return [(x, y, z, x + patch[0], y + patch[1], z + patch[2])
            for x in starts[0] for y in starts[1] for z in starts[2]]


def centred_box(label, patch):
    """The patch-size box (x0, y0, z0, x1, y1, z1) centred on the foreground centroid of a label volume
    (X, Y, Z), moved inside the volume along each axis at least as long as the patch; along a shorter axis it
    covers the volume whole, as near the centroid as that allows (crop pads with zeros). An empty label
    gives the volume's centre."""
    fg = np.argwhere(label > 0)                                                    # (n, 3)
    size, patch = np.array(label.shape), np.array(patch)
    centre = fg.mean(0) if len(fg) else (size - 1) / 2
    start = np.round(centre - (patch - 1) / 2)
    start = np.clip(start, np.minimum(0, size - patch), np.maximum(0, size - patch))
    start = start.astype(np.int64)
    return tuple(int(v) for v in (*start, *(start + patch)))


def shift(t, offsets):
    """t (*lead, X, Y, Z) moved by whole cells: out[..., p] = t[..., p - offset], zero where p - offset falls
    outside. offsets (*lead[:m], 3) integer, one per index of the first m leading dimensions (broadcast
    over the rest), on t's device: gathers, so no host-device synchronisation."""
    lead = t.ndim - 3
    off = offsets.reshape(*offsets.shape[:-1], *[1] * (lead - offsets.ndim + 1), 3)   # (*lead', 1.., 3)
    for a in range(3):
        n = t.shape[lead + a]
        src = torch.arange(n, device=t.device) - off[..., a, None]               # (*lead', 1.., n)
        view = [*src.shape[:-1], 1, 1, 1]
        view[lead + a] = n
        src = src.reshape(view)                                                  # n along axis a
        inside = (src >= 0) & (src < n)
        t = torch.where(inside, t.gather(lead + a, src.clamp(0, n - 1).expand(t.shape)), 0)
    return t


def align(t, ref_centroids, query_centroids, patch=None):
    """References t (B, K, ..., X', Y', Z') each moved so that its centroid ref_centroids (B, K, 3) lands on
    its query's centroid query_centroids (B, 3), both in voxels of the patch. On a grid coarser than the
    patch (`patch` its size, e.g. the bottleneck features) the move is rounded to whole cells of that grid;
    None: t is at patch resolution (the masks). No move where either centroid is NaN (an empty mask)."""
    cells = [1.0] * 3 if patch is None else [p / s for p, s in zip(patch, t.shape[-3:])]  # voxels per cell
    move = query_centroids[:, None] - ref_centroids                               # (B, K, 3) in voxels
    move = torch.stack([move[..., a] / cells[a] for a in range(3)], -1)           # in cells, no host copy
    return shift(t, torch.nan_to_num(move.round(), nan=0.0).long())


class ReferenceBank:
    """Labeled patches: case ID, orientation, crop box, morphology vector (from the ground truth), the case's
    mask CoT, and per entry a reference feature map, stacked as `features` (N, C, d, h, w), and the crop's
    ground truth, stacked as `masks` (N, X, Y, Z) uint8, both on the training device."""

    def __init__(self, case_ids, boxes, morph, texts, volumes=None, variants=None, device="cpu"):
        self.case_ids, self.texts = list(case_ids), list(texts)
        self.boxes = np.asarray(boxes, np.int64).reshape(-1, 6)
        self.morph = np.asarray(morph, np.float32)
        n = len(self.case_ids)
        self.variants = np.zeros(n, np.int64) if variants is None else np.asarray(variants, np.int64)
        if n == 0 or not len(self.boxes) == len(self.morph) == len(self.texts) == len(self.variants) == n \
                or self.morph.ndim != 2:
            raise ValueError(f"reference bank: got {n} case IDs, {len(self.boxes)} boxes, "
                             f"{len(self.variants)} orientations, morphology {self.morph.shape} and "
                             f"{len(self.texts)} texts; need N > 0 of each, morphology (N, M)")
        if not np.isfinite(self.morph).all():
            raise ValueError("reference bank: morphology vectors contain NaN or inf")
        self.volumes = volumes or {}  # case ID -> (image, label) (X, Y, Z), cut by refresh()
        self.device = torch.device(device)
        self.features = None  # (N, C, d, h, w) once refresh() has run
        self.crops = None  # (N, 1, X, Y, Z) float image patches on the device, cut by the first refresh()
        self.masks = None  # (N, X, Y, Z) uint8 ground-truth patches on the device, cut with the crops
        self.centroids = None  # (N, 3) float32 their foreground centroids in voxels (NaN: empty)
        self.query_texts = {}  # case ID -> query CoT, once index_queries() has run
        self._index()

    @classmethod
    def build(cls, cfg, volumes, labeled_ids, mask_cots, device="cpu"):
        """Bank of every labeled volume's grid crops (cfg.patch_size, stride cfg.bank_stride) in each of the
        ORIENTATIONS: the grid is laid over the oriented volume, so every crop is a whole patch. With
        cfg.ref_align, one crop per orientation instead, centred on the label's centroid (centred_box)."""
        case_ids, variants, boxes, morph, texts = [], [], [], [], []
        for cid in labeled_ids:
            if cid not in mask_cots:
                raise ValueError(f"reference bank: labeled case {cid!r} has no mask CoT in the pool")
            for v in range(len(ORIENTATIONS)):
                label = orient(volumes[cid][1], v)
                vboxes = ([centred_box(label, cfg.patch_size)] if cfg.ref_align
                          else grid_boxes(label.shape, cfg.patch_size, cfg.bank_stride))
                morph.append(morphology_batch(np.stack([data.padded_crop(label, b) > 0 for b in vboxes])))
                case_ids += [cid] * len(vboxes)
                variants += [v] * len(vboxes)
                boxes += vboxes
                texts += [mask_cots[cid]] * len(vboxes)
        return cls(case_ids, boxes, np.concatenate(morph), texts, {cid: volumes[cid] for cid in labeled_ids},
                   variants, device)

    def _load_patches(self):
        """Cut every entry's image and ground truth and move them to the device, once: the patches never
        move."""
        if self.crops is None:
            if not self.volumes:
                raise RuntimeError("reference bank has no volumes to cut: build it with ReferenceBank.build")
            image, label = self._cut()
            self.crops = torch.from_numpy(image[:, None]).to(self.device)      # (N, 1, X, Y, Z)
            self.masks = torch.from_numpy(label.astype(np.uint8)).to(self.device)  # (N, X, Y, Z)
            self.centroids = mask_centroids(self.masks)                            # (N, 3)

    def _cut(self):
        """Every entry's image and ground-truth patches (N, X, Y, Z), each volume oriented once per
        orientation."""
        image, label = [None] * len(self), [None] * len(self)
        for cid, v in dict.fromkeys(zip(self.case_ids, self.variants)):
            vol_image, vol_label = (orient(x, v) for x in self.volumes[cid])
            for i in np.flatnonzero((np.array(self.case_ids) == cid) & (self.variants == v)):
                image[i] = data.padded_crop(vol_image, self.boxes[i])
                label[i] = data.padded_crop(vol_label, self.boxes[i])
        return np.stack(image), np.stack(label)

    def patch(self, i):
        """Entry i's image and ground-truth patches (X, Y, Z) numpy, cut from its oriented volume."""
        image, label = (orient(v, self.variants[i]) for v in self.volumes[self.case_ids[i]])
        return data.padded_crop(image, self.boxes[i]), data.padded_crop(label, self.boxes[i])

    def _index(self):
        """Stage-1 and stage-2 structures, built once: scaler + kNN on morphology, BM25 on distinct texts,
        and the device copies select_device() reads (the query tables too, if index_queries() has run)."""
        self.scaler = StandardScaler().fit(self.morph)
        z = self.scaler.transform(self.morph)  # (N, M) standardised morphology
        self.knn = NearestNeighbors(algorithm="kd_tree").fit(z)
        cases, self.case_code = np.unique(self.case_ids, return_inverse=True)
        self.code_of = {c: i for i, c in enumerate(cases)}
        self.case_count = np.bincount(self.case_code)
        self.cot = CotIndex(self.texts)
        self.doc = np.array([self.cot.doc_of[t] for t in self.texts])
        # the same on the device, for select_device
        self.z = torch.as_tensor(z, dtype=torch.float32, device=self.device)  # (N, M)
        self.z_mean = torch.as_tensor(self.scaler.mean_, dtype=torch.float32, device=self.device)  # (M,)
        self.z_scale = torch.as_tensor(self.scaler.scale_, dtype=torch.float32, device=self.device)  # (M,)
        self.entry_doc = torch.as_tensor(self.doc, device=self.device)  # (N,) entry -> distinct text
        self.entry_code = torch.as_tensor(self.case_code, device=self.device)  # (N,) entry -> case code
        self.index_queries(self.query_texts)  # BM25 depends on the bank's texts: redo it (or keep it empty)

    def index_queries(self, case_texts):
        """Precompute, for select_device, what a query brings: case_texts maps every case of the pool
        (labeled, unlabeled, test) to its query CoT, fixed for the run, so each (query case, distinct bank
        text) BM25 score is computed once here instead of on the host at every step. On the bank's device:
        query_bm25 (n_cases, n_docs) raw BM25 scores, query_code (n_cases,) the case's code in the bank (-1:
        not in the bank, nothing to exclude), query_others (n_cases,) its number of other-case entries;
        query_row maps a case ID to its row. _index() calls this again, so the tables follow the bank."""
        self.query_texts = dict(case_texts)
        ids = list(self.query_texts)
        self.query_row = {c: r for r, c in enumerate(ids)}
        codes = np.array([self.code_of.get(c, -1) for c in ids], np.int64)
        others = len(self) - np.where(codes >= 0, self.case_count[np.maximum(codes, 0)], 0)
        texts = [self.query_texts[c] for c in ids]
        scores = self.cot.scores(texts, np.arange(len(self.cot.texts)))                     # (docs, cases)
        self.query_bm25 = torch.as_tensor(scores.T, dtype=torch.float32, device=self.device)  # (cases, docs)
        self.query_code = torch.as_tensor(codes, device=self.device)  # (n_cases,)
        self.query_others = torch.as_tensor(others, device=self.device)  # (n_cases,)

    def query_rows(self, case_ids):
        """(B,) long tensor on the device: each case ID's row of the query tables. A host-side lookup of
        strings and one non-blocking copy; it refuses, from host metadata, a case unknown to index_queries
        and a case with no patch of another case in the bank (it would have no reference to draw)."""
        rows = []
        for c in case_ids:
            if c not in self.query_row:
                raise ValueError(f"reference bank: case {c!r} has no query CoT; pass it to index_queries() "
                                 f"({len(self.query_row)} cases indexed)")
            rows.append(self.query_row[c])
            if c in self.code_of and self.case_count[self.code_of[c]] == len(self):
                raise ValueError(f"reference bank has no patches outside case {c!r}")
        rows = torch.tensor(rows, dtype=torch.long)
        if self.device.type == "cuda":
            rows = rows.pin_memory()  # so that the copy below really is asynchronous
        return rows.to(self.device, non_blocking=True)

    def __len__(self):
        return len(self.case_ids)

    def neighbours(self, morph, codes, k):
        """Stage 1: the k morphologically nearest entries of other cases for each query (code -1: no case).
        Asks for k + (size of the query's case) neighbours so exclusion still leaves k when the bank has
        them."""
        extra = max([self.case_count[c] for c in codes if c >= 0], default=0)
        z = (morph - self.scaler.mean_) / self.scaler.scale_  # scaler.transform without its input checks
        dist, idx = self.knn.kneighbors(z, n_neighbors=min(len(self), k + extra))
        keep = [self.case_code[i] != c for i, c in zip(idx, codes)]
        return [i[m][:k] for i, m in zip(idx, keep)], [d[m][:k] for d, m in zip(dist, keep)]

    @torch.no_grad()
    def refresh(self, encoder_fn, momentum, batch_size=4, replace=False):
        """features <- encoder_fn(crops): the teacher's bottleneck now. encoder_fn maps (n, 1, X, Y, Z) image
        crops to (n, C, d, h, w) features. With momentum > 0 a later call moves the features as an EMA,
        momentum * features + (1 - momentum) * new; the first call fills them, and `replace` (the first
        refresh after the reference warm-up) replaces whatever an earlier fill or a checkpoint left."""
        self._load_patches()
        new = torch.cat([encoder_fn(self.crops[s:s + batch_size]).float()  # (N, C, d, h, w)
                         for s in range(0, len(self), batch_size)])
        if self.features is not None and not replace and self.features.shape != new.shape:
            raise ValueError(f"encoder gives features {tuple(new.shape)}, the bank holds "
                             f"{tuple(self.features.shape)}")
        if self.features is None or replace or momentum == 0:
            self.features = new
        else:
            self.features.mul_(momentum).add_(new, alpha=1 - momentum)

    def references(self, indices, weights, masks=False, query_centroids=None):
        """mcam.References for chosen entries (B, K) and their weights (B, K), on the bank's device; with
        masks, the entries' ground-truth patches too (B, K, X, Y, Z) float. With query_centroids (B, 3), the
        queries' predicted foreground centroids in voxels (ref_align), features and masks are aligned."""
        if self.features is None:
            raise RuntimeError("reference bank features are empty: call refresh() first")
        idx = torch.as_tensor(indices, device=self.device)
        features = self.features[idx]                                              # (B, K, C, d, h, w)
        if masks or query_centroids is not None:
            self._load_patches()
        if query_centroids is not None:
            features = align(features, self.centroids[idx], query_centroids, self.masks.shape[1:])
        return References(features, torch.as_tensor(weights, device=self.device),
                          self.aligned_masks(idx, query_centroids) if masks else None, idx)

    def aligned_masks(self, idx, query_centroids=None):
        """Entries idx's (B, K) ground-truth patches (B, K, X, Y, Z) float, aligned when query_centroids."""
        self._load_patches()
        masks = self.masks[idx].float()
        return masks if query_centroids is None else align(masks, self.centroids[idx], query_centroids)

    def label_transfer(self, indices, weights, query_centroids=None):
        """The entries' ground-truth masks averaged with their weights, (B, K) each: (B, X, Y, Z) float,
        the label an atlas method would transfer to the queries, no network involved; aligned as in
        references()."""
        masks = self.aligned_masks(torch.as_tensor(indices, device=self.device), query_centroids)
        return weighted_mask(masks, torch.as_tensor(weights, device=self.device).float())[:, 0]

    def state_dict(self):
        """Everything but the volumes (they come from the data): entries, morphology, texts, features."""
        return {"case_ids": self.case_ids, "variants": torch.from_numpy(self.variants),
                "boxes": torch.from_numpy(self.boxes), "morph": torch.from_numpy(self.morph),
                "texts": self.texts, "features": self.features}

    def load_state_dict(self, state):
        """Restore a saved bank onto this one, which must hold the same patches (cases, orientations,
        boxes)."""
        boxes, variants = np.asarray(state["boxes"]), np.asarray(state["variants"])
        if list(state["case_ids"]) != self.case_ids or not (np.array_equal(boxes, self.boxes)
                                                           and np.array_equal(variants, self.variants)):
            raise ValueError(f"saved reference bank ({len(state['case_ids'])} patches) does not match the "
                             f"bank built from the data ({len(self)} patches): different labeled cases, "
                             "patch size or stride")
        self.morph, self.texts = np.asarray(state["morph"], np.float32), list(state["texts"])
        self._index()
        self.features = None if state["features"] is None else state["features"].to(self.device)
