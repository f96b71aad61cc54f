"""Semantic-aware reference selection (docs/design.md §6, §7): the shape descriptors of masks, the BM25
index of the pool's CoT texts, the bank of labeled patches, and the one selection that training, testing
and explanations run (morphology kNN, then the BM25 CoT filter, the case cap, the weights)."""
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby, product
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
from rank_bm25 import BM25Okapi
from scipy import ndimage
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

import data
from mcam import References
from config import make_folder, save_figure

MODES = ("both", "morph", "random")  # the paper; its no-CoT-filter control; its random-retrieval control
SWAPS = ("retrieved", "random", "zeroed")  # what decoder A is given in the reference-sensitivity checks
MORPH_NAMES = (
    "fg_fraction", "extent_x", "extent_y", "extent_z",  # foreground share; bounding box / patch, per axis
    "axis_ratio_mid", "axis_ratio_min",        # principal-axis lengths over the longest (1 round, 0 thin)
    "surface_to_volume",                       # mask-background faces (not on the patch cut) per voxel
    "centroid_x", "centroid_y", "centroid_z",  # centroid offset from the patch centre / patch size
    "components", "largest_share",             # face-connected components; the largest one's share
    "border_contact")                          # share of the six patch faces the mask touches (a cut target)
MORPH_DIM = len(MORPH_NAMES)
FACE6 = ndimage.generate_binary_structure(3, 1)  # voxels are neighbours when they share a face
# the four distinct patches data.rot_flip(x, k, axis) makes (a y flip is an x flip after a half turn)
ORIENTATIONS = ((0, 0), (0, 1), (1, 0), (1, 1))

FIELD_LABEL = re.compile(r"\b(?:texture|boundary|context|summary)\s*:", re.IGNORECASE)  # not evidence
WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # hyphenated compounds stay one match; '/' separates
STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from further had has have
having here how if in into is it its itself may might more most much must near of off on once only or other
over own same shall should so some such than that the their them then there these they this those through to
too under until up upon very via was were what when where which while who whom why will with would""".split())
# inflection suffixes, longest first, stripped repeatedly: enhancing / enhanced / enhancement meet at one stem
SUFFIXES = ("ations", "ation", "ments", "ment", "ness", "ities", "ity", "ously", "ous", "ative", "ating",
            "ated", "ate", "ively", "ive", "ingly", "ing", "edly", "ed", "ies", "ly", "al", "ic", "es", "s",
            "e", "y")


def morphology_batch(masks):
    """Shape descriptors (B, MORPH_DIM) float32 of binary masks (B, X, Y, Z); an empty mask gives zeros."""
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
    second = np.stack([px @ cx**2, sxy, sxz, sxy, py @ cy**2, syz, sxz, syz, pz @ cz**2], 1).reshape(B, 3, 3)
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


@lru_cache(maxsize=1 << 16)
def stem(word):
    """A small suffix stripper: crude, but it maps the inflected forms of one root to one token."""
    stripped = False
    while suffix := next((s for s in SUFFIXES if word.endswith(s) and len(word) - len(s) >= 3
                          and not (s == "s" and word[-2] in "isu")), None):  # keep mass, status, ... whole
        word, stripped = word[:-len(suffix)], True
    if stripped and len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouylsz":
        word = word[:-1]  # blurred -> blurr -> blur
    return word


def tokenize(text):
    """Radiology CoT text -> stems: case folded, punctuation, stopwords and field labels dropped, inflected
    forms stemmed, hyphenated forms split and also kept joined (ill-defined meets illdefined)."""
    out = []
    for match in WORD.finditer(FIELD_LABEL.sub(" ", text or "").lower()):
        parts = [p for p in match.group().split("-") if len(p) > 1 and p not in STOPWORDS]
        out += [stem(p) for p in parts] + ([stem("".join(parts))] if len(parts) > 1 else [])
    return out


class CotIndex:
    """BM25 over distinct texts (a case's patches share its CoT), statistics from rank-bm25, Lucene's IDF
    log(1 + (N - n + 0.5) / (n + 0.5)) > 0 (Okapi's is negative for words in over half of few documents)."""

    def __init__(self, texts, tokenizer=tokenize, k1=1.5, b=0.75):
        self.texts = list(dict.fromkeys(texts))
        self.doc_of, self.tokenizer, self.cache = {t: i for i, t in enumerate(self.texts)}, tokenizer, {}
        tokens = [tokenizer(t) for t in self.texts]
        if not any(tokens):
            raise ValueError(f"the {len(self.texts)} CoT texts of the pool contain no words to index")
        bm = BM25Okapi(tokens, k1=k1, b=b)
        df = Counter(t for doc in bm.doc_freqs for t in doc)  # documents holding each term
        self.vocab, n = {t: j for j, t in enumerate(df)}, np.array(list(df.values()), float)
        idf = np.log1p((len(self.texts) - n + 0.5) / (n + 0.5))
        pairs = [(r, self.vocab[t], count, size)                  # (document, term, term count, doc length)
                 for r, (doc, size) in enumerate(zip(bm.doc_freqs, bm.doc_len)) for t, count in doc.items()]
        rows, cols, tf, dl = (np.array(x) for x in zip(*pairs))
        value = idf[cols] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / bm.avgdl))
        self.weights = scipy.sparse.csr_matrix((value, (rows, cols)), (len(self.texts), len(self.vocab)))

    def scores(self, text):
        """Raw BM25 scores (n_texts,) float64 of the distinct texts for a query (cached; repeats count)."""
        if text not in self.cache:
            terms = [self.vocab[t] for t in self.tokenizer(text) if t in self.vocab]
            self.cache[text] = self.weights @ np.bincount(terms, minlength=len(self.vocab)).astype(np.float64)
        return self.cache[text]


def orient(volume, variant):
    """A volume (X, Y, Z) numpy in one of the ORIENTATIONS, as data.rot_flip turns a training patch."""
    return data.rot_flip(torch.from_numpy(np.ascontiguousarray(volume)), *ORIENTATIONS[variant]).numpy()


def grid_boxes(shape, patch, stride):
    """Crop boxes (x0, y0, z0, x1, y1, z1) covering a volume: starts every `stride` plus one flush with the
    far edge; an axis shorter than the patch gets one box centred on it (reaching outside, read as zeros)."""
    starts = [sorted({*range(0, size - p + 1, s), size - p}) if size > p else [-((p - size) // 2)]
              for size, p, s in zip(shape, patch, stride)]
    return [(*start, *(a + p for a, p in zip(start, patch))) for start in product(*starts)]


class ReferenceBank:
    """Labeled patches: grid crops of every labeled volume in each ORIENTATION (a rotated query meets entries
    laid out as it is); per entry its case, orientation, box, label morphology, mask CoT, teacher features."""

    def __init__(self, case_ids, boxes, morph, texts, volumes=None, variants=None, device="cpu"):
        self.case_ids, self.texts = list(case_ids), list(texts)
        self.boxes, self.morph = np.asarray(boxes, np.int64).reshape(-1, 6), np.asarray(morph, np.float32)
        self.variants = np.asarray(np.zeros(len(self.case_ids)) if variants is None else variants, np.int64)
        self.volumes, self.device = volumes or {}, torch.device(device)  # case ID -> (image, label) (X, Y, Z)
        self.features = self.crops = None  # from refresh(): (N, C, d, h, w); image patches (N, 1, X, Y, Z)
        self.query_texts = {}              # case ID -> its image CoT (the query text), from index_queries()
        self._index()

    def _index(self):
        """What select() reads, built once: kd-tree on standardised morphology, case codes, BM25 index."""
        self.scaler = StandardScaler().fit(self.morph)
        self.knn = NearestNeighbors(algorithm="kd_tree").fit(self.scaler.transform(self.morph))
        cases, self.case_code = np.unique(self.case_ids, return_inverse=True)
        self.code_of = {c: i for i, c in enumerate(cases)}
        self.case_count = np.bincount(self.case_code)
        self.cot = CotIndex(self.texts)
        self.doc = np.array([self.cot.doc_of[t] for t in self.texts])  # (N,) entry -> distinct text

    @classmethod
    def build(cls, cfg, volumes, labeled_ids, mask_cots, device="cpu"):
        """Every labeled volume's grid crops (cfg.patch_size, cfg.bank_stride), laid over each orientation."""
        entries, morph = [], []                                   # (case ID, orientation, box) per entry
        for cid in labeled_ids:
            if cid not in mask_cots:
                raise ValueError(f"reference bank: labeled case {cid!r} has no mask CoT in the pool")
            for v in range(len(ORIENTATIONS)):
                label = orient(volumes[cid][1], v)
                boxes = grid_boxes(label.shape, cfg.patch_size, cfg.bank_stride)
                morph.append(morphology_batch(np.stack([data.padded_crop(label, b) > 0 for b in boxes])))
                entries += [(cid, v, b) for b in boxes]
        case_ids, variants, boxes = zip(*entries)
        return cls(case_ids, boxes, np.concatenate(morph), [mask_cots[c] for c in case_ids],
                   {cid: volumes[cid] for cid in labeled_ids}, variants, device)

    def __len__(self):
        return len(self.case_ids)

    def index_queries(self, image_cots):
        """Every case's query text (case ID -> image CoT), fixed for the run, for query_references()."""
        self.query_texts = dict(image_cots)

    def patch(self, i):
        """Entry i's image and ground-truth patches (X, Y, Z) numpy, cut from its oriented volume."""
        image, label = (orient(v, self.variants[i]) for v in self.volumes[self.case_ids[i]])
        return data.padded_crop(image, self.boxes[i]), data.padded_crop(label, self.boxes[i])

    @torch.no_grad()
    def refresh(self, encoder_fn, momentum, batch_size=4, replace=False):
        """features <- encoder_fn(crops (n, 1, X, Y, Z)) (n, C, d, h, w), the teacher's bottleneck now, or
        with momentum > 0 the EMA momentum * features + (1 - momentum) * new. The first call fills them;
        `replace` (a run's first refresh) replaces what an earlier fill or a checkpoint left."""
        if self.crops is None:  # cut once, each volume oriented once per orientation: the patches never move
            crops = []
            for (cid, v), at in groupby(range(len(self)), lambda i: (self.case_ids[i], self.variants[i])):
                image = orient(self.volumes[cid][0], v)
                crops += [data.padded_crop(image, self.boxes[i]) for i in at]
            self.crops = torch.from_numpy(np.stack(crops)[:, None]).to(self.device)      # (N, 1, X, Y, Z)
        new = torch.cat([encoder_fn(self.crops[s:s + batch_size]).float()                # (N, C, d, h, w)
                         for s in range(0, len(self), batch_size)])
        if self.features is not None and not replace and self.features.shape != new.shape:
            raise ValueError(f"encoder gives features {tuple(new.shape)}, the bank holds "
                             f"{tuple(self.features.shape)}")
        if self.features is None or replace or momentum == 0:
            self.features = new
        else:
            self.features.mul_(momentum).add_(new, alpha=1 - momentum)

    def state_dict(self):
        """Everything but the volumes (they come from the data): entries, morphology, texts, features; only
        tensors, lists of str and None, so a checkpoint reads with torch.load(weights_only=True)."""
        return {"case_ids": list(self.case_ids), "variants": torch.from_numpy(self.variants),
                "boxes": torch.from_numpy(self.boxes), "morph": torch.from_numpy(self.morph),
                "texts": list(self.texts), "features": self.features}

    def load_state_dict(self, state):
        """Restore a saved bank onto this one, which must hold the same patches (else a ValueError)."""
        keys = ["boxes", "case_ids", "features", "morph", "texts", "variants"]
        if not isinstance(state, dict) or sorted(state) != keys:
            raise ValueError(f"saved reference bank: expected a dict of {keys}")
        f, texts = state["features"], list(state["texts"])
        boxes, variants, morph = (state[k].cpu().numpy() if torch.is_tensor(state[k]) else None
                                  for k in ("boxes", "variants", "morph"))
        if list(state["case_ids"]) != self.case_ids or not (np.array_equal(boxes, self.boxes)
                                                           and np.array_equal(variants, self.variants)):
            raise ValueError(f"saved reference bank ({len(state['case_ids'])} patches) does not match the one"
                             f" built from the data ({len(self)}): other labeled cases, patch size or stride")
        if getattr(morph, "shape", None) != self.morph.shape or len(texts) != len(self) \
                or not all(isinstance(t, str) for t in texts) \
                or not (f is None or torch.is_tensor(f) and f.ndim == 5 and len(f) == len(self)):
            raise ValueError(f"saved reference bank: morphology, texts or features do not fit its "
                             f"{len(self)} patches (features {None if f is None else tuple(f.shape)})")
        self.morph, self.texts = morph.astype(np.float32), texts
        self._index()
        self.features = None if f is None else f.float().to(self.device)


@dataclass
class Selection:
    indices: np.ndarray   # (B, k_fine) int64 bank entries
    weights: np.ndarray   # (B, k_fine) float32, rows sum to 1; filled slots weigh 0
    n_filled: np.ndarray  # (B,) slots not held by a candidate that passed the CoT filter (see select)
    explain: list         # per query: candidates, morphology distances, BM25, normalised score, hard negative


def capped(order, cases, cap, k):
    """The first k of the candidate positions `order` (best first), at most `cap` of one case (diversity)."""
    taken, out = Counter(), []
    for j in order:
        if len(out) < k and taken[cases[j]] < cap:
            taken[cases[j]] += 1
            out.append(j)
    return np.array(out, np.int64)


def select(bank, morph, texts, case_ids, cfg, generator=None, mode=None):
    """cfg.k_fine references per query of morphology (B, M), CoT text and case ID (None or outside the bank:
    nothing excluded), docs/design.md §6. Stage 1: the k_coarse nearest entries of other cases. Stage 2: BM25
    over the best candidate's, under `tau` a hard negative; survivors best first, max_refs_per_case per case,
    weights softmax(score / ref_temperature); fewer than k_fine: repeats of weight 0 (n_filled counts them);
    none: the stage-1 order, capped, equal weights. `mode` (default cfg.retrieval): "morph" skips stage 2;
    "random" draws k_coarse entries of other cases from the CPU `generator` (default: seeded by cfg.seed)."""
    mode = mode or cfg.retrieval
    if mode not in MODES:
        raise ValueError(f"retrieval={mode!r}: expected one of {MODES}")
    codes = [bank.code_of.get(c, -1) for c in case_ids]
    for c, code in zip(case_ids, codes):
        if code >= 0 and bank.case_count[code] == len(bank):
            raise ValueError(f"reference bank has no patches outside case {c!r}")
    k, cap = cfg.k_fine, cfg.max_refs_per_case
    if mode == "random":
        generator = torch.Generator().manual_seed(cfg.seed) if generator is None else generator
        others = [np.flatnonzero(bank.case_code != code) for code in codes]
        cands = [o[torch.randperm(len(o), generator=generator)[:cfg.k_coarse].numpy()] for o in others]
        dists = [np.full(len(c), np.nan) for c in cands]
    else:  # stage 1, kNN: k_coarse + (entries of the query's case) neighbours, so exclusion leaves k_coarse
        extra = max([bank.case_count[c] for c in codes if c >= 0], default=0)
        z = (np.asarray(morph, np.float32).reshape(len(codes), -1) - bank.scaler.mean_) / bank.scaler.scale_
        dists, cands = bank.knn.kneighbors(z, n_neighbors=min(len(bank), cfg.k_coarse + extra))
        other = [bank.case_code[c] != code for c, code in zip(cands, codes)]
        cands, dists = ([x[m][:cfg.k_coarse] for x, m in zip(xs, other)] for xs in (cands, dists))
    indices, weights = np.zeros((len(codes), k), np.int64), np.zeros((len(codes), k), np.float32)
    n_filled, explain = np.zeros(len(codes), np.int64), []
    for i, (cand, dist) in enumerate(zip(cands, dists)):
        cases = bank.case_code[cand]
        raw = score = np.full(len(cand), np.nan)
        keep = capped(range(len(cand)), cases, cap, k)             # stage-1 order
        w, survivors = np.full(len(keep), 1 / len(keep)), len(keep)
        if mode == "both":
            raw = bank.cot.scores(texts[i])[bank.doc[cand]]
            score = raw / raw.max() if raw.max() > 0 else np.zeros_like(raw)
            order = np.argsort(-score, kind="stable")              # ties keep the morphology order
            passed = capped(order[score[order] >= cfg.tau], cases, cap, k)
            survivors = len(passed)
            if survivors:
                x = score[passed] / cfg.ref_temperature
                keep, w = passed, np.exp(x - x.max()) / np.exp(x - x.max()).sum()  # softmax
        indices[i] = np.resize(cand[keep], k)
        weights[i, :len(w)] = w
        n_filled[i] = k - survivors
        explain.append(dict(case_id=case_ids[i], mode=mode, candidates=cand, distance=dist, bm25=raw,
                            score=score, hard_negative=score < cfg.tau))
    return Selection(indices, weights, n_filled, explain)


def query_references(bank, logits_b, case_ids, cfg, generator=None, mode=None):
    """Selection as training and testing run it: decoder B's logits_b (B, 2, X, Y, Z) -> foreground on the
    host -> morphology -> select() with each case's image CoT (a labeled query never retrieves its own case)
    -> mcam.References on the bank's device: features (B, K, C, d, h, w), weights (B, K), entries (B, K)."""
    if bank.features is None:
        raise RuntimeError("reference bank features are empty: call refresh() first")
    unknown = [c for c in case_ids if c not in bank.query_texts]
    if unknown:
        raise ValueError(f"reference bank: case {unknown[0]!r} has no query CoT; pass it to index_queries()")
    masks = (logits_b[:, 1] > logits_b[:, 0]).cpu().numpy()              # (B, X, Y, Z) argmax == 1
    sel = select(bank, morphology_batch(masks), [bank.query_texts[c] for c in case_ids], list(case_ids), cfg,
                 generator, mode)
    idx = torch.from_numpy(sel.indices).to(bank.device)                  # (B, K)
    return References(bank.features[idx], torch.from_numpy(sel.weights).to(bank.device), idx)


@torch.no_grad()
def decoder_a_probabilities(model, feats, logits_b, case_ids, bank, cfg, generator, swaps=SWAPS):
    """Decoder A's foreground probability (B, X, Y, Z) float32 for each of `swaps`: the references retrieved
    for logits_b, random entries of other cases (from `generator`), "zeroed" (their contribution zero). How
    far it moves between them is how much decoder A uses what the references contain (docs/design.md §10)."""
    out = {}
    for swap in swaps:
        refs = None if swap == "zeroed" else query_references(
            bank, logits_b, case_ids, cfg, generator, mode="random" if swap == "random" else None)
        out[swap] = model.decode_a(feats, refs, zero_refs=swap == "zeroed").float().softmax(1)[:, 1]
    return out


def format_explanation(bank, sel, boxes=None):
    """Readable account of a selection: each query's candidates, their distance, BM25, score and fate."""
    lines = []
    for i, rec in enumerate(sel.explain):
        at = f" box {tuple(int(v) for v in boxes[i][:3])}" if boxes is not None else ""
        head = f"query {i} (case {rec['case_id']}{at}), mode {rec['mode']}, {sel.n_filled[i]} filled slot(s)"
        lines += [head, "   entry case           box start          dist    bm25  score  fate"]
        for j, c in enumerate(rec["candidates"][:64]):
            fate = (f"chosen, weight {sel.weights[i][sel.indices[i] == c].sum():.3f}" if c in sel.indices[i]
                    else "hard negative" if rec["hard_negative"][j] else "not needed")
            start = str(tuple(int(v) for v in bank.boxes[c][:3]))
            lines.append(f"  {c:>6} {bank.case_ids[c]:<14} {start:<16} {rec['distance'][j]:>6.2f} "
                         f"{rec['bm25'][j]:>7.2f} {rec['score'][j]:>6.2f}  {fate}")
    return "\n".join(lines)


def plot_explanation(path, image, boxes, bank, sel, max_rows=4):
    """PNG: each query patch's middle axial slice, then its chosen references' with score and weight."""
    from matplotlib.figure import Figure
    rows, k = min(max_rows, len(boxes)), sel.indices.shape[1]
    fig = Figure(figsize=(2.2 * (k + 1), 2.4 * rows))
    axes = fig.subplots(rows, k + 1, squeeze=False)
    for r in range(rows):
        patch = data.padded_crop(image, boxes[r])
        axes[r, 0].imshow(patch[:, :, patch.shape[2] // 2].T, cmap="gray")
        where = tuple(int(v) for v in boxes[r][:3])
        axes[r, 0].set_title(f"query {sel.explain[r]['case_id']}\nbox {where}", fontsize=8)
        score = dict(zip(sel.explain[r]["candidates"], sel.explain[r]["score"]))
        for j, (idx, w) in enumerate(zip(sel.indices[r], sel.weights[r])):
            ref = bank.patch(idx)[0]
            axes[r, j + 1].imshow(ref[:, :, ref.shape[2] // 2].T, cmap="gray")
            axes[r, j + 1].set_title(f"{bank.case_ids[idx]}\nscore {score[idx]:.2f} w {w:.2f}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    make_folder(Path(path).parent)
    save_figure(fig, path, dpi=100)
    return path
