"""Semantic-aware reference selection: morphology kNN, then BM25 CoT consistency.

Implements the paper's "semantic-aware reference selection" (DESIGN.md §1.2, §5).
A ReferenceBank holds labeled patches (a grid of patch-size crops per labeled
volume); for a query patch we pick references in two stages:

1. morphology: k-nearest neighbours (scikit-learn) over standardised morphology
   descriptors give `k_coarse` candidates, never from the query's own case;
2. CoT consistency: BM25 (rank-bm25, IDF over the whole pool) scores each
   candidate's mask CoT against the query's CoT; scores are divided by the
   query's best candidate score, candidates under `tau` are hard negatives
   (they look alike but reason differently) and the best `k_fine` remain.

The chosen references' weights are a softmax of their consistency scores; their
features (teacher encoder bottleneck, EMA-refreshed) feed MCAM (mcam.py).
select() runs on the host and explains itself; select_device() makes the same picks on
the training device without host-device synchronisation, from BM25 scores that
index_queries() computes once per (query case, distinct bank text).

    python retrieve.py --exp LA_8 --explain ID   # why these references, plus a PNG
    python retrieve.py --bench                   # selection latency on synthetic banks (host and device)
"""
import argparse
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import scipy.sparse
import torch
from rank_bm25 import BM25Okapi
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

MODES = ("both", "morph", "cot", "random")  # ablations: both stages, morphology only, CoT only, random

# -----------------------------------------------------------------------------
# tokenizer for radiology CoT text

FIELD_LABEL = re.compile(r"\b(?:texture|boundary|context|summary)\s*:", re.IGNORECASE)  # structure, not evidence
WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # hyphenated compounds stay one match; '/' separates
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having here how
if in into is it its itself may might more most much must near of off on once only or other over own same
shall should so some such than that the their them then there these they this those through to too under
until up upon very via was were what when where which while who whom why will with would
""".split())
# inflection suffixes, longest first: stripped repeatedly so that enhancing / enhanced / enhancement
# and heterogeneous / heterogeneity / heterogeneously meet at one stem
SUFFIXES = ("ations", "ation", "ments", "ment", "ness", "ities", "ity", "ously", "ous", "ative", "ating",
            "ated", "ate", "ively", "ive", "ingly", "ing", "edly", "ed", "ies", "ly", "al", "ic", "es", "s", "e", "y")


@lru_cache(maxsize=1 << 16)
def stem(word):
    """A small suffix stripper: crude, but it maps the inflected forms of one root to one token."""
    stripped = False
    while True:
        suffix = next((s for s in SUFFIXES if word.endswith(s) and len(word) - len(s) >= 3
                       and not (s == "s" and word[-2] in "isu")), None)  # keep mass, status, ... whole
        if suffix is None:
            break
        word, stripped = word[:-len(suffix)], True
    if stripped and len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouylsz":
        word = word[:-1]  # blurred -> blurr -> blur
    return word


@lru_cache(maxsize=1 << 16)
def _tokens(text):
    out = []
    for match in WORD.finditer(FIELD_LABEL.sub(" ", text).lower()):
        parts = [p for p in match.group().split("-") if len(p) > 1 and p not in STOPWORDS]
        out += [stem(p) for p in parts]
        if len(parts) > 1:
            out.append(stem("".join(parts)))  # ill-defined also as illdefined, so both spellings meet
    return tuple(out)


def tokenize(text):
    """Radiology CoT text -> stems: case folded, punctuation and stopwords and field labels dropped,
    inflected forms stemmed, hyphenated forms split and also kept joined."""
    return list(_tokens(text or ""))


# -----------------------------------------------------------------------------
# BM25 over the pool's distinct CoT texts

class CotIndex:
    """BM25 over distinct texts. Many bank entries share their case's CoT, so each text is one document:
    IDF comes from the whole pool and scoring costs per distinct text, not per patch.

    rank-bm25's BM25Okapi holds the corpus statistics (term counts, lengths, k1, b). Its IDF is replaced by
    the smoothed, always positive log(1 + (N - n + 0.5) / (n + 0.5)) (Lucene's): a pool has few cases (8 in
    LA_8), so most words sit in over half the documents, where Okapi's IDF is negative and rank-bm25's
    floor (epsilon x mean IDF) turns negative too, and every score of a templated pool would be < 0."""

    def __init__(self, texts, tokenizer=tokenize, k1=1.5, b=0.75):
        self.texts = list(dict.fromkeys(texts))
        self.doc_of = {t: i for i, t in enumerate(self.texts)}
        self.tokenizer = tokenizer
        tokens = [tokenizer(t) for t in self.texts]
        if not any(tokens):
            raise ValueError(f"the {len(self.texts)} CoT texts of the pool contain no words to index")
        self.bm25 = BM25Okapi(tokens, k1=k1, b=b)
        n = Counter(t for doc in self.bm25.doc_freqs for t in doc)  # documents holding each term
        self.vocab = {t: j for j, t in enumerate(n)}
        n = np.fromiter(n.values(), float, len(n))
        self.idf = np.log1p((len(self.texts) - n + 0.5) / (n + 0.5))
        self.weights = self.term_weights(self.bm25.doc_freqs, self.bm25.doc_len)  # (docs, vocab)

    def term_weights(self, freqs, lengths):
        """BM25 weight of every (document, term) pair from rank-bm25's precomputed statistics, as a sparse
        matrix: a query's scores are then one product, BM25Okapi.get_scores' numbers (with this IDF)."""
        rows, cols, tf, dl = [], [], [], []
        for r, (doc, n) in enumerate(zip(freqs, lengths)):
            for term, count in doc.items():
                if term in self.vocab:
                    rows.append(r), cols.append(self.vocab[term]), tf.append(count), dl.append(n)
        bm = self.bm25
        tf, dl = np.array(tf, float), np.array(dl, float)
        data = self.idf[cols] * tf * (bm.k1 + 1) / (tf + bm.k1 * (1 - bm.b + bm.b * dl / bm.avgdl))
        return scipy.sparse.csr_matrix((data, (rows, cols)), shape=(len(freqs), len(self.vocab)))

    def query_matrix(self, texts):
        """(vocab, B) counts of each query's indexed terms; repeated query words count repeatedly, as in BM25."""
        q = np.zeros((len(self.vocab), len(texts)))
        for i, text in enumerate(texts):
            for term in self.tokenizer(text or ""):
                if term in self.vocab:
                    q[self.vocab[term], i] += 1
        return q

    def scores(self, texts, docs):
        """Raw BM25 scores (len(docs), B) of the given documents for each query text."""
        return np.asarray(self.weights[docs] @ self.query_matrix(texts))


@lru_cache(maxsize=4)
def _cached_index(corpus, tokenizer):
    return CotIndex(corpus, tokenizer)


def cot_scores(query, candidates, corpus, tokenizer=tokenize):
    """Raw BM25 score (CotIndex: smoothed IDF) of each candidate text for the query text, IDF and average
    length from `corpus`
    (candidates need not belong to it). Selection normalises these per query; see select()."""
    index = _cached_index(tuple(corpus), tokenizer)
    rows = [index.doc_of.get(c) for c in candidates]
    if None in rows:
        token_lists = [tokenizer(c) for c in candidates]
        weights = index.term_weights([Counter(t) for t in token_lists], [len(t) for t in token_lists])
    else:
        weights = index.weights[rows]
    return np.asarray(weights @ index.query_matrix([query]))[:, 0]


# -----------------------------------------------------------------------------
# the reference bank

def grid_boxes(shape, patch, stride):
    """Crop boxes (x0, y0, z0, x1, y1, z1) covering a volume: starts every `stride` plus one flush with the far
    edge; an axis shorter than the patch gets one box centred on it (it reaches outside, read as zeros)."""
    starts = []
    for size, p, s in zip(shape, patch, stride):
        if size <= p:
            starts.append([-((p - size) // 2)])
        else:
            axis = list(range(0, size - p + 1, s))
            starts.append(axis + ([size - p] if axis[-1] != size - p else []))
    return [(x, y, z, x + patch[0], y + patch[1], z + patch[2])
            for x in starts[0] for y in starts[1] for z in starts[2]]


def crop(volume, box):
    """The box of a volume (X, Y, Z), zero where the box reaches outside it (the training-crop padding rule)."""
    lo, hi = np.array(box[:3]), np.array(box[3:])
    out = np.zeros(hi - lo, volume.dtype)
    a, b = np.maximum(lo, 0), np.minimum(hi, volume.shape)
    out[tuple(slice(i - l, j - l) for i, j, l in zip(a, b, lo))] = volume[tuple(slice(i, j) for i, j in zip(a, b))]
    return out


class ReferenceBank:
    """Labeled patches: case ID, crop box, morphology vector (from the ground truth), the case's mask CoT,
    and a reference feature map per entry, stacked as `features` (N, C, d, h, w) on the training device."""

    def __init__(self, case_ids, boxes, morph, texts, images=None, device="cpu"):
        self.case_ids, self.texts = list(case_ids), list(texts)
        self.boxes = np.asarray(boxes, np.int64).reshape(-1, 6)
        self.morph = np.asarray(morph, np.float32)
        n = len(self.case_ids)
        if n == 0 or not len(self.boxes) == len(self.morph) == len(self.texts) == n or self.morph.ndim != 2:
            raise ValueError(f"reference bank: got {n} case IDs, {len(self.boxes)} boxes, morphology "
                             f"{self.morph.shape} and {len(self.texts)} texts; need N > 0 of each, morphology (N, M)")
        if not np.isfinite(self.morph).all():
            raise ValueError("reference bank: morphology vectors contain NaN or inf")
        self.images = images or {}  # case ID -> image (X, Y, Z), read by refresh()
        self.device = torch.device(device)
        self.features = None  # (N, C, d, h, w) once refresh() has run
        self.crops = None  # (N, 1, X, Y, Z) image patches on the device, cut by the first refresh()
        self.query_texts = {}  # case ID -> query CoT, once index_queries() has run
        self._index()

    @classmethod
    def build(cls, cfg, volumes, labeled_ids, mask_cots, device="cpu"):
        """Bank of every labeled volume's grid crops (cfg.patch_size, stride cfg.bank_stride)."""
        import pool
        case_ids, boxes, morph, texts = [], [], [], []
        for cid in labeled_ids:
            if cid not in mask_cots:
                raise ValueError(f"reference bank: labeled case {cid!r} has no mask CoT in the pool")
            label = volumes[cid][1]
            case_boxes = grid_boxes(label.shape, cfg.patch_size, cfg.bank_stride)
            morph.append(pool.morphology_batch(np.stack([crop(label, b) > 0 for b in case_boxes])))
            case_ids += [cid] * len(case_boxes)
            boxes += case_boxes
            texts += [mask_cots[cid]] * len(case_boxes)
        images = {cid: volumes[cid][0] for cid in labeled_ids}
        return cls(case_ids, boxes, np.concatenate(morph), texts, images, device)

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
        """Precompute, for select_device, what a query brings: case_texts maps every case of the pool (labeled,
        unlabeled, test) to its query CoT, fixed for the run, so each (query case, distinct bank text) BM25
        score is computed once here instead of on the host at every step. On the bank's device:
        query_bm25 (n_cases, n_docs) raw BM25 scores, query_code (n_cases,) the case's code in the bank (-1:
        not in the bank, nothing to exclude), query_others (n_cases,) its number of other-case entries;
        query_row maps a case ID to its row. _index() calls this again, so the tables follow the bank."""
        self.query_texts = dict(case_texts)
        ids = list(self.query_texts)
        self.query_row = {c: r for r, c in enumerate(ids)}
        codes = np.array([self.code_of.get(c, -1) for c in ids], np.int64)
        others = len(self) - np.where(codes >= 0, self.case_count[np.maximum(codes, 0)], 0)
        scores = self.cot.scores([self.query_texts[c] for c in ids], np.arange(len(self.cot.texts)))  # (docs, cases)
        self.query_bm25 = torch.as_tensor(scores.T, dtype=torch.float32, device=self.device)  # (n_cases, n_docs)
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
        Asks for k + (size of the query's case) neighbours so exclusion still leaves k when the bank has them."""
        extra = max([self.case_count[c] for c in codes if c >= 0], default=0)
        z = (morph - self.scaler.mean_) / self.scaler.scale_  # scaler.transform without its input checks
        dist, idx = self.knn.kneighbors(z, n_neighbors=min(len(self), k + extra))
        keep = [self.case_code[i] != c for i, c in zip(idx, codes)]
        return [i[m][:k] for i, m in zip(idx, keep)], [d[m][:k] for d, m in zip(dist, keep)]

    @torch.no_grad()
    def refresh(self, encoder_fn, momentum, batch_size=4):
        """features <- momentum * features + (1 - momentum) * encoder_fn(crops); the first call just fills.
        encoder_fn maps (n, 1, X, Y, Z) image crops to (n, C, d, h, w) bottleneck features (the teacher's)."""
        if self.crops is None:  # the patches never move: cut and copy them once, not at every refresh
            if not self.images:
                raise RuntimeError("reference bank has no images to encode: build it with ReferenceBank.build")
            x = np.stack([crop(self.images[c], b) for c, b in zip(self.case_ids, self.boxes)])  # (N, X, Y, Z)
            self.crops = torch.from_numpy(x[:, None]).to(self.device)
        new = torch.cat([encoder_fn(self.crops[s:s + batch_size]).float()  # (N, C, d, h, w)
                         for s in range(0, len(self), batch_size)])
        if self.features is None:
            self.features = new
        elif self.features.shape != new.shape:
            raise ValueError(f"encoder gives features {tuple(new.shape)}, the bank holds {tuple(self.features.shape)}")
        else:
            self.features.mul_(momentum).add_(new, alpha=1 - momentum)

    def context(self, sel):
        """The chosen references' features (B, K, C, d, h, w) and weights (B, K), on the bank's device."""
        if self.features is None:
            raise RuntimeError("reference bank features are empty: call refresh() first")
        idx = torch.as_tensor(sel.indices, device=self.device)
        return self.features[idx], torch.as_tensor(sel.weights, device=self.device)

    def state_dict(self):
        """Everything but the images (they come from the data): entries, morphology, texts, features."""
        return {"case_ids": self.case_ids, "boxes": torch.from_numpy(self.boxes), "morph": torch.from_numpy(self.morph),
                "texts": self.texts, "features": self.features}

    def load_state_dict(self, state):
        """Restore a saved bank onto this one, which must hold the same patches (same cases and boxes)."""
        boxes = np.asarray(state["boxes"])
        if list(state["case_ids"]) != self.case_ids or not np.array_equal(boxes, self.boxes):
            raise ValueError(f"saved reference bank ({len(state['case_ids'])} patches) does not match the bank built "
                             f"from the data ({len(self)} patches): different labeled cases, patch size or stride")
        self.morph, self.texts = np.asarray(state["morph"], np.float32), list(state["texts"])
        self._index()
        self.features = None if state["features"] is None else state["features"].to(self.device)


# -----------------------------------------------------------------------------
# batched selection

@dataclass
class Selection:
    indices: np.ndarray   # (B, k_fine) int64 bank entries
    weights: np.ndarray   # (B, k_fine) float32, rows sum to 1; filled slots weigh 0
    n_filled: np.ndarray  # (B,) slots not held by a candidate that passed the CoT filter (see select)
    explain: list         # per query: candidates, morphology distances, BM25, normalised score, hard negatives


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def select(bank, morph, texts, case_ids, cfg, rng=None):
    """Pick cfg.k_fine references for each query (morphology (B, M), CoT text, own case ID or None).

    Score normalisation: raw BM25 divided by the query's best candidate score, so the best is 1 and `tau`
    is a fraction of it; candidates under tau are hard negatives and never chosen.
    Fill rule, when fewer than k_fine candidates survive: the empty slots repeat the survivors (best first)
    with weight 0, so the context is the weighted mean of the survivors alone and shapes stay (B, k_fine).
    If none survive (the query shares no indexed word with any candidate) there is no text evidence: the
    first k_fine candidates in stage-1 order are used with equal weights. n_filled counts the slots not held
    by a survivor (k_fine in that case). Mode "cot" skips stage 1 (every patch of another case is a
    candidate); "morph" and "random" weigh their picks equally; "random" draws from `rng` (a generator the
    caller keeps, so draws differ between calls; default: a fresh one seeded with cfg.seed).
    """
    if cfg.retrieval not in MODES:
        raise ValueError(f"retrieval={cfg.retrieval!r}: expected one of {MODES}")
    if not len(morph) == len(texts) == len(case_ids):
        raise ValueError(f"select: {len(morph)} morphology vectors, {len(texts)} texts, {len(case_ids)} case IDs")
    k, mode = cfg.k_fine, cfg.retrieval
    codes = [bank.code_of.get(c, -1) for c in case_ids]
    morph = np.asarray(morph, np.float32).reshape(len(codes), -1)
    if mode in ("both", "morph"):
        cands, dists = bank.neighbours(morph, codes, cfg.k_coarse if mode == "both" else k)
    else:
        cands = [np.flatnonzero(bank.case_code != c) for c in codes]  # every patch of another case
        if mode == "random":
            rng = np.random.default_rng(cfg.seed) if rng is None else rng
            cands = [rng.choice(c, min(k, len(c)), replace=False) for c in cands]
        dists = [np.full(len(c), np.nan) for c in cands]
    if mode in ("both", "cot"):  # stage 2: BM25 for the candidates' distinct texts only, all queries at once
        docs = np.unique(np.concatenate([bank.doc[c] for c in cands]))
        table = bank.cot.scores(texts, docs)  # (distinct docs, B)
    indices, weights = np.zeros((len(codes), k), np.int64), np.zeros((len(codes), k), np.float32)
    n_filled, explain = [], []
    for i, (cand, dist) in enumerate(zip(cands, dists)):
        if len(cand) == 0:
            raise ValueError(f"reference bank has no patches outside case {case_ids[i]!r}")
        raw = score = np.full(len(cand), np.nan)
        chosen, w = cand[:k], np.full(min(k, len(cand)), 1 / min(k, len(cand)))
        survivors = len(chosen)
        if mode in ("both", "cot"):
            raw = table[np.searchsorted(docs, bank.doc[cand]), i]
            score = raw / raw.max() if raw.max() > 0 else np.zeros_like(raw)
            order = np.argsort(-score, kind="stable")  # ties keep the morphology order
            keep = order[score[order] >= cfg.tau][:k]
            survivors = len(keep)
            if survivors:
                chosen, w = cand[keep], _softmax(score[keep] / cfg.ref_temperature)
        indices[i] = np.resize(chosen, k)
        weights[i, :len(w)] = w
        n_filled.append(k - survivors)
        explain.append(dict(case_id=case_ids[i], mode=mode, candidates=cand, distance=dist, bm25=raw, score=score,
                            hard_negative=score < cfg.tau))
    return Selection(indices, weights, np.array(n_filled), explain)


# -----------------------------------------------------------------------------
# the same selection on the device, without host-device synchronisation

def first_k(value, k, largest=False):
    """Positions (B, k) of each row's k smallest (or largest) entries of value (B, n), in that order, equal
    values by position (lowest first), as a stable sort would give them, at topk's cost. topk alone orders
    ties arbitrarily, so it runs on an int64 key without ties: a float32's bit pattern read as an integer
    orders the non-negative floats (inf included) and puts every negative one below them; times n, plus
    the position (for largest: n - 1 - position)."""
    n = value.shape[-1]
    pos = torch.arange(n, device=value.device)
    key = value.float().contiguous().view(torch.int32).long() * n + (n - 1 - pos if largest else pos)  # (B, n)
    return key.topk(k, dim=-1, largest=largest).indices


def stage1_key(bank, morph, codes, mode, generator):
    """(B, N) non-negative sort key of every entry for each query, +inf on the query's own case: the
    morphology distance (modes both, morph), 0 (cot: every other patch, in bank order) or a uniform
    random number (random: its k smallest are a draw without replacement)."""
    if mode in ("both", "morph"):
        z = (morph.float() - bank.z_mean) / bank.z_scale  # (B, M), standardised as in neighbours()
        key = torch.cdist(z, bank.z, compute_mode="donot_use_mm_for_euclid_dist")  # (B, N), exact differences
    elif mode == "cot":
        key = torch.zeros(len(codes), len(bank), device=bank.device)
    else:
        key = torch.rand(len(codes), len(bank), device=bank.device, generator=generator)
    return key.masked_fill(bank.entry_code == codes[:, None], float("inf"))


@torch.no_grad()
def select_device(bank, morph, rows, cfg, generator=None):
    """select() on the bank's device without host-device synchronisation: morphology (B, M) on the device,
    rows (B,) from bank.query_rows(case_ids) (the queries' texts and cases, see index_queries). Returns
    indices (B, k_fine) long and weights (B, k_fine) float32 on the device.

    Same rules as select(): own case excluded, scores divided by the best candidate's, tau, softmax weights,
    the fill rule. Every shape is fixed: stage 1 keeps min(k1, N) candidates per query, own-case entries
    last (their key is inf), and the first min(k1, other-case entries) of them count (k1: k_coarse for
    both, k_fine for morph and random, N for cot). Differences from select(): distances are float32 and
    equal distances are ordered by entry index (select() takes the kd-tree's order), so the two agree on
    data without exact or float32-level ties; mode random draws from torch's `generator` (default: a fresh
    one seeded with cfg.seed), not numpy's, so its picks differ from select()'s.
    """
    if cfg.retrieval not in MODES:
        raise ValueError(f"retrieval={cfg.retrieval!r}: expected one of {MODES}")
    if morph.ndim != 2 or morph.shape[0] != rows.shape[0]:
        raise ValueError(f"select_device: morphology {tuple(morph.shape)} for {rows.shape[0]} query rows")
    k, mode, n = cfg.k_fine, cfg.retrieval, len(bank)
    if mode == "random" and generator is None:
        generator = torch.Generator(bank.device).manual_seed(cfg.seed)
    k1 = min(n, {"both": cfg.k_coarse, "cot": n}.get(mode, k))
    codes = bank.query_code[rows]  # (B,)
    cand = first_k(stage1_key(bank, morph, codes, mode, generator), k1)  # (B, k1) entries, stage-1 order
    n_valid = bank.query_others[rows].clamp(max=k1)  # (B,) candidates of other cases: the first of cand
    order = torch.arange(min(k, k1), device=bank.device).expand(len(rows), -1)  # (B, k') stage-1 order
    count = n_valid.clamp(max=k)  # (B,) slots held by a pick; 1 / count each unless scores say otherwise
    logit = torch.zeros(cand.shape, device=bank.device)  # (B, k1)
    if mode in ("both", "cot"):  # stage 2: BM25 of the query case against each candidate's text
        raw = bank.query_bm25[rows].gather(1, bank.entry_doc[cand])  # (B, k1)
        valid = torch.arange(k1, device=bank.device) < n_valid[:, None]  # (B, k1) not an own-case entry
        best = raw.masked_fill(~valid, 0).amax(1, keepdim=True)  # (B, 1); BM25 scores are >= 0
        score = raw / best.clamp(min=torch.finfo(raw.dtype).tiny)  # best 1; all 0 when the best is 0
        passed = valid & (score >= cfg.tau)  # (B, k1) not hard negatives
        survivors = passed.sum(1).clamp(max=k)  # (B,)
        ranked = first_k(score.masked_fill(~passed, -1.0), min(k, k1), largest=True)  # (B, k') best first
        some = survivors > 0  # no survivor: stage-1 order, equal weights, as in select()
        order = torch.where(some[:, None], ranked, order)
        count = torch.where(some, survivors, count)
        logit = torch.where(some[:, None], score / cfg.ref_temperature, logit)
    slot = torch.arange(k, device=bank.device)  # fill rule: slot j repeats pick j mod count, weight 0
    pick = order.gather(1, slot % count[:, None])  # (B, k) positions in cand
    weights = logit.gather(1, pick).masked_fill(slot >= count[:, None], float("-inf")).softmax(1)  # (B, k)
    return cand.gather(1, pick), weights


# -----------------------------------------------------------------------------
# explanation: text and figure

def format_explanation(bank, sel, boxes=None):
    """Readable account of a selection: per query, every candidate with its morphology distance, BM25 score,
    normalised score and fate (chosen with its weight, hard negative, or not needed)."""
    lines = []
    for i, rec in enumerate(sel.explain):
        where = f" box {tuple(int(v) for v in boxes[i][:3])}" if boxes is not None else ""
        lines.append(f"query {i} (case {rec['case_id']}{where}), mode {rec['mode']}, {sel.n_filled[i]} filled slot(s)")
        lines.append(f"  {'entry':>6} {'case':<14} {'box start':<16} {'dist':>6} {'bm25':>7} {'score':>6}  fate")
        for j, c in enumerate(rec["candidates"][:64]):
            fate = (f"chosen, weight {sel.weights[i][sel.indices[i] == c].sum():.3f}" if c in sel.indices[i] else
                    "hard negative" if rec["hard_negative"][j] else "not needed")
            lines.append(f"  {c:>6} {bank.case_ids[c]:<14} {str(tuple(int(v) for v in bank.boxes[c][:3])):<16} "
                         f"{rec['distance'][j]:>6.2f} {rec['bm25'][j]:>7.2f} {rec['score'][j]:>6.2f}  {fate}")
    return "\n".join(lines)


def plot_explanation(path, image, boxes, bank, sel, max_rows=4):
    """PNG: each query patch's middle axial slice, then its chosen references' slices with score and weight."""
    from matplotlib.figure import Figure
    rows, k = min(max_rows, len(boxes)), sel.indices.shape[1]
    fig = Figure(figsize=(2.2 * (k + 1), 2.4 * rows))
    axes = fig.subplots(rows, k + 1, squeeze=False)
    for r in range(rows):
        patch = crop(image, boxes[r])
        axes[r, 0].imshow(patch[:, :, patch.shape[2] // 2].T, cmap="gray")
        where = tuple(int(v) for v in boxes[r][:3])
        axes[r, 0].set_title(f"query {sel.explain[r]['case_id']}\nbox {where}", fontsize=8)
        score = dict(zip(sel.explain[r]["candidates"], sel.explain[r]["score"]))
        for j, (idx, w) in enumerate(zip(sel.indices[r], sel.weights[r])):
            ref = crop(bank.images[bank.case_ids[idx]], bank.boxes[idx])
            axes[r, j + 1].imshow(ref[:, :, ref.shape[2] // 2].T, cmap="gray")
            axes[r, j + 1].set_title(f"{bank.case_ids[idx]}\nscore {score[idx]:.2f} w {w:.2f}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# -----------------------------------------------------------------------------
# latency benchmark on synthetic banks

def synthetic_bank(n, patches_per_case=8, morph_dim=13, seed=0, device="cpu"):
    """A bank of n entries without images: cases are clusters in morphology space, each with its own text
    of 4 fields x 12 words from a 2000-word vocabulary (Zipf-like use), shared by the case's patches."""
    rng = np.random.default_rng(seed)
    vocab = ["".join(rng.choice(list("bcdfghklmnprstv"), 3)) + rng.choice(["al", "ic", "ous", "ing", "ed", "ar"])
             for _ in range(2000)]
    cdf = np.cumsum(1 / np.arange(1, len(vocab) + 1))

    def text():
        words = [vocab[j] for j in np.searchsorted(cdf, rng.uniform(0, cdf[-1], 48))]
        return " ".join(f"{f}: {' '.join(words[12 * i:12 * i + 12])}."
                        for i, f in enumerate(("Texture", "Boundary", "Context", "Summary")))
    n_cases = -(-n // patches_per_case)
    centres, texts = rng.normal(size=(n_cases, morph_dim)), [text() for _ in range(n_cases)]
    case = np.arange(n) // patches_per_case
    morph = centres[case] + 0.3 * rng.normal(size=(n, morph_dim))
    bank = ReferenceBank([f"case{c}" for c in case], np.zeros((n, 6)), morph, [texts[c] for c in case],
                         device=device)
    return bank, text


def median_time(fn, runs, warmup, sync=lambda: None):
    """Median wall and process CPU seconds of fn() over `runs` calls after `warmup`; sync() (a device
    synchronisation) runs before each clock reading so that queued device work is counted."""
    wall, cpu = [], []
    for _ in range(warmup + runs):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - t0), cpu.append(time.process_time() - c0)
    return float(np.median(wall[warmup:])), float(np.median(cpu[warmup:]))


def benchmark(sizes=(100, 10_000, 100_000), batch=4, runs=200, warmup=20, seed=0):
    """Median wall time of one selection for `batch` queries (half labeled, half not) per bank size: select()
    (numpy, on the host) and select_device() with its query_rows() lookup (on CUDA when available, else on
    the CPU). The process's CPU time is printed beside each, as other load on the machine inflates wall
    time (and torch's CPU threads suffer most from it).
    Returns {size: {"select": seconds, "select_device": seconds}}."""
    cfg = SimpleNamespace(k_coarse=16, k_fine=4, tau=0.5, ref_temperature=1.0, retrieval="both", seed=seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {}
    for n in sizes:
        bank, text = synthetic_bank(n, seed=seed, device=device)
        rng = np.random.default_rng(seed + 1)
        morph = bank.morph[rng.integers(0, n, batch)] + 0.1 * rng.normal(size=(batch, bank.morph.shape[1]))
        ids = [bank.case_ids[int(rng.integers(0, n))] if i % 2 == 0 else f"unlabeled{i}" for i in range(batch)]
        case_texts = {c: text() for c in ids}
        texts = [case_texts[c] for c in ids]
        bank.index_queries(case_texts)
        own = [c if c in bank.code_of else None for c in ids]
        numpy_s, cpu_s = median_time(lambda: select(bank, morph, texts, own, cfg), runs, warmup)
        morph_dev = torch.as_tensor(morph, dtype=torch.float32, device=device)  # (B, M)
        device_s, device_cpu_s = median_time(lambda: select_device(bank, morph_dev, bank.query_rows(ids), cfg),
                                             runs, warmup, sync)
        result[n] = {"select": numpy_s, "select_device": device_s}
        print(f"bank {n:>7} entries ({len(bank.cot.texts)} distinct texts), {batch} queries: select "
              f"{1e3 * numpy_s:.2f} ms wall ({1e3 * cpu_s:.2f} ms CPU), select_device on {device.type} "
              f"{1e3 * device_s:.2f} ms wall ({1e3 * device_cpu_s:.2f} ms CPU) (medians of {runs})")
    return result


# -----------------------------------------------------------------------------

def query_masks(cfg, image, label, boxes, labeled):
    """The query patches' masks (n, X, Y, Z): decoder B of the experiment's last checkpoint, as in training
    and testing; without a checkpoint, the ground truth of a labeled case. Other masks are never read."""
    ckpt = Path(cfg.out_dir) / "ckpt_last.pt"
    if ckpt.is_file():
        import test
        model, _, _ = test.load_checkpoint(ckpt, "cpu")
        x = torch.from_numpy(np.stack([crop(image, b) for b in boxes])[:, None])   # (n, 1, X, Y, Z)
        with torch.no_grad():
            return (model.predict_b(x).argmax(1) == 1).numpy()
    if not labeled:
        raise SystemExit(f"no checkpoint at {ckpt}: train first, or explain a labeled case (its mask is known)")
    print(f"no checkpoint at {ckpt}: the labeled case's ground truth stands in for decoder B's prediction")
    return np.stack([crop(label, b) > 0 for b in boxes])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Explain reference selection for one case, or time it.")
    parser.add_argument("--exp", default="LA_8", help="named experiment (train.py)")
    parser.add_argument("--explain", metavar="ID", help="case ID whose patches are the queries")
    parser.add_argument("--bench", action="store_true", help="time selection on synthetic banks and exit")
    args, overrides = parser.parse_known_args(argv)
    if args.bench:
        benchmark()
        return
    if not args.explain:
        parser.error("give --explain ID or --bench")
    import data
    import pool
    from train import get_config
    cfg = get_config(args.exp, overrides)
    split = data.load_split(cfg.data_root, cfg.num_labeled)
    if args.explain not in split.labeled + split.unlabeled + split.test:
        raise SystemExit(f"case {args.explain!r} is in neither train.list nor test.list of {cfg.data_root}")
    volumes = data.load_volumes(cfg.data_root, split.labeled + split.unlabeled + split.test)
    texts = pool.build_pool(cfg, split, volumes)
    bank = ReferenceBank.build(cfg, volumes, split.labeled, texts.mask)
    image, label = volumes[args.explain]
    boxes = grid_boxes(label.shape, cfg.patch_size, cfg.bank_stride)
    morph = pool.morphology_batch(query_masks(cfg, image, label, boxes, args.explain in split.labeled))
    sel = select(bank, morph, [texts.image[args.explain]] * len(boxes), [args.explain] * len(boxes), cfg)
    print(format_explanation(bank, sel, boxes))
    print("figure:", plot_explanation(Path(cfg.out_dir) / f"explain_{args.explain}.png", image, boxes, bank, sel))


if __name__ == "__main__":
    main()
