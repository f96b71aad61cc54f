"""Semantic-aware reference selection: morphology kNN, then BM25 CoT consistency (docs/design.md §6).

For a query patch, references come from the bank (bank.py) in two stages:

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
bank.index_queries() computes once per (query case, distinct bank text); query_references()
is the whole query as training and testing run it. format_explanation and plot_explanation show why a
selection chose what it did; explain.py is their command line.
"""
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data import padded_crop
import files
from morphology import mask_centroids, morphology_batch, morphology_torch

MODES = ("both", "morph", "cot", "random")  # ablations: both stages, morphology only, CoT only, random

# -----------------------------------------------------------------------------
# batched selection

@dataclass
class Selection:
    indices: np.ndarray   # (B, k_fine) int64 bank entries
    weights: np.ndarray   # (B, k_fine) float32, rows sum to 1; filled slots weigh 0
    n_filled: np.ndarray  # (B,) slots not held by a candidate that passed the CoT filter (see select)
    explain: list         # per query: candidates, morphology distances, BM25, normalised score, hard
                          # negatives


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def capped(order, cases, cap, k):
    """The first k of the candidate positions `order` (best first), skipping each candidate whose case
    already holds `cap` picks: the diversity rule (at most max_refs_per_case references from one case)."""
    taken, out = Counter(), []
    for j in order:
        if len(out) == k:
            break
        if taken[cases[j]] < cap:
            taken[cases[j]] += 1
            out.append(j)
    return np.array(out, np.int64)


def select(bank, morph, texts, case_ids, cfg, rng=None, mode=None):
    """Pick cfg.k_fine references for each query (morphology (B, M), CoT text, own case ID or None).

    Stage 1 keeps the k_coarse morphologically nearest entries of other cases. Stage 2 scores them:
    raw BM25 divided by the query's best candidate score, so the best is 1 and `tau` is a fraction of
    it; candidates under tau are hard negatives and never chosen. The survivors are taken best first,
    at most cfg.max_refs_per_case from one case (the others are skipped, not counted as hard negatives).
    Fill rule, when fewer than k_fine candidates survive: the empty slots repeat the survivors (best first)
    with weight 0, so the context is the weighted mean of the survivors alone and shapes stay (B, k_fine).
    If none survive (the query shares no indexed word with any candidate) there is no text evidence: the
    stage-1 order is used, with the same cap, and equal weights. n_filled counts the slots not held by a
    survivor (k_fine in that case). `mode` (default cfg.retrieval) picks an ablation: "cot" skips stage 1
    (every patch of another case is a candidate); "morph" and "random" take their candidates in stage-1
    order (nearest first, or k_coarse drawn at random) with equal weights; "random" draws from `rng` (a
    generator the caller keeps, so draws differ between calls; default: a fresh one seeded with cfg.seed).
    """
    mode = mode or cfg.retrieval
    if mode not in MODES:
        raise ValueError(f"retrieval={mode!r}: expected one of {MODES}")
    if not len(morph) == len(texts) == len(case_ids):
        raise ValueError(f"select: {len(morph)} morphology vectors, {len(texts)} texts, {len(case_ids)} case "
                         "IDs")
    k = cfg.k_fine
    codes = [bank.code_of.get(c, -1) for c in case_ids]
    morph = np.asarray(morph, np.float32).reshape(len(codes), -1)
    if mode in ("both", "morph"):
        cands, dists = bank.neighbours(morph, codes, cfg.k_coarse)
    else:
        cands = [np.flatnonzero(bank.case_code != c) for c in codes]  # every patch of another case
        if mode == "random":
            rng = np.random.default_rng(cfg.seed) if rng is None else rng
            cands = [rng.choice(c, min(cfg.k_coarse, len(c)), replace=False) for c in cands]
        dists = [np.full(len(c), np.nan) for c in cands]
    if mode in ("both", "cot"):  # stage 2: BM25 for the candidates' distinct texts only, all queries at once
        docs = np.unique(np.concatenate([bank.doc[c] for c in cands]))
        table = bank.cot.scores(texts, docs)  # (distinct docs, B)
    indices, weights = np.zeros((len(codes), k), np.int64), np.zeros((len(codes), k), np.float32)
    n_filled, explain = [], []
    for i, (cand, dist) in enumerate(zip(cands, dists)):
        if len(cand) == 0:
            raise ValueError(f"reference bank has no patches outside case {case_ids[i]!r}")
        cases = bank.case_code[cand]
        raw = score = np.full(len(cand), np.nan)
        keep = capped(range(len(cand)), cases, cfg.max_refs_per_case, k)  # stage-1 order
        w = np.full(len(keep), 1 / len(keep))
        survivors = len(keep)
        if mode in ("both", "cot"):
            raw = table[np.searchsorted(docs, bank.doc[cand]), i]
            score = raw / raw.max() if raw.max() > 0 else np.zeros_like(raw)
            order = np.argsort(-score, kind="stable")  # ties keep the morphology order
            passed = capped(order[score[order] >= cfg.tau], cases, cfg.max_refs_per_case, k)
            survivors = len(passed)
            if survivors:
                keep, w = passed, _softmax(score[passed] / cfg.ref_temperature)
        indices[i] = np.resize(cand[keep], k)
        weights[i, :len(w)] = w
        n_filled.append(k - survivors)
        explain.append(dict(case_id=case_ids[i], mode=mode, candidates=cand, distance=dist, bm25=raw,
                            score=score, hard_negative=score < cfg.tau))
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
    bits = value.float().contiguous().view(torch.int32).long()                     # (B, n)
    key = bits * n + (n - 1 - pos if largest else pos)                             # (B, n)
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


def under_cap(cases, ok, cap):
    """(B, n) bool: candidate j (positions best first) is allowed and fewer than `cap` allowed candidates of
    its case come before it: capped() for whole batches, in fixed shapes. cases (B, n) case codes,
    ok (B, n)."""
    n = cases.shape[1]
    same = cases[:, :, None] == cases[:, None, :]                                   # (B, n, n)
    before = torch.ones(n, n, dtype=torch.bool, device=cases.device).tril(-1)      # (n, n): j < i
    return ok & ((same & before & ok[:, None, :]).sum(2) < cap)


@torch.no_grad()
def select_device(bank, morph, rows, cfg, generator=None, mode=None):
    """select() on the bank's device without host-device synchronisation: morphology (B, M) on the device,
    rows (B,) from bank.query_rows(case_ids) (the queries' texts and cases, see index_queries). Returns
    indices (B, k_fine) long and weights (B, k_fine) float32 on the device.

    Same rules as select(): own case excluded, scores divided by the best candidate's, tau, the case cap,
    softmax weights, the fill rule. Every shape is fixed: stage 1 keeps min(k1, N) candidates per query,
    own-case entries last (their key is inf), and the first min(k1, other-case entries) of them count (k1:
    k_coarse, or N for cot). Differences from select(): distances are float32 and equal distances are
    ordered by entry index (select() takes the kd-tree's order), so the two agree on data without exact or
    float32-level ties; mode random draws from torch's `generator` (default: a fresh one seeded with
    cfg.seed), not numpy's, so its picks differ from select()'s.
    """
    mode = mode or cfg.retrieval
    if mode not in MODES:
        raise ValueError(f"retrieval={mode!r}: expected one of {MODES}")
    if morph.ndim != 2 or morph.shape[0] != rows.shape[0]:
        raise ValueError(f"select_device: morphology {tuple(morph.shape)} for {rows.shape[0]} query rows")
    k, n, B = cfg.k_fine, len(bank), len(rows)
    if mode == "random" and generator is None:
        generator = torch.Generator(bank.device).manual_seed(cfg.seed)
    k1 = min(n, n if mode == "cot" else cfg.k_coarse)
    codes = bank.query_code[rows]  # (B,)
    cand = first_k(stage1_key(bank, morph, codes, mode, generator), k1)  # (B, k1) entries, stage-1 order
    n_valid = bank.query_others[rows].clamp(max=k1)  # (B,) candidates of other cases: the first of cand
    valid = torch.arange(k1, device=bank.device) < n_valid[:, None]  # (B, k1) not an own-case entry
    order = torch.arange(k1, device=bank.device).expand(B, -1)  # (B, k1) positions in cand, best first
    ok = valid  # (B, k1) whether the candidate at order[:, j] may be picked
    logit = torch.zeros(cand.shape, device=bank.device)  # (B, k1); equal weights unless scores say otherwise
    if mode in ("both", "cot"):  # stage 2: BM25 of the query case against each candidate's text
        raw = bank.query_bm25[rows].gather(1, bank.entry_doc[cand])  # (B, k1)
        best = raw.masked_fill(~valid, 0).amax(1, keepdim=True)  # (B, 1); BM25 scores are >= 0
        score = raw / best.clamp(min=torch.finfo(raw.dtype).tiny)  # best 1; all 0 when the best is 0
        passed = valid & (score >= cfg.tau)  # (B, k1) not hard negatives
        ranked = first_k(score.masked_fill(~passed, -1.0), k1, largest=True)  # (B, k1) survivors best first
        some = passed.any(1, keepdim=True)  # (B, 1); none survives: stage-1 order, equal weights (select())
        order = torch.where(some, ranked, order)
        ok = torch.where(some, passed.gather(1, ranked), ok)
        logit = torch.where(some, score / cfg.ref_temperature, logit)
    ok = under_cap(bank.entry_code[cand.gather(1, order)], ok, cfg.max_refs_per_case)  # (B, k1)
    count = ok.sum(1).clamp(max=k)  # (B,) slots held by a pick (>= 1: every query has another case)
    first = first_k((~ok).float(), min(k, k1))  # (B, k') where the picks are in `order`, best first
    slot = torch.arange(k, device=bank.device)  # fill rule: slot j repeats pick j mod count, weight 0
    pick = order.gather(1, first.gather(1, slot % count[:, None]))  # (B, k) positions in cand
    weights = logit.gather(1, pick).masked_fill(slot >= count[:, None], float("-inf")).softmax(1)  # (B, k)
    return cand.gather(1, pick), weights


# -----------------------------------------------------------------------------
# the query as training and testing run it

def query_references(bank, logits_b, case_ids, cfg, generator=None, mode=None):
    """Reference selection (docs/design.md §6) at work, on the device: decoder B's prediction ->
    morphology -> kNN + BM25 -> references.

    logits_b (B, 2, X, Y, Z); case_ids: each query's case (its image-only CoT is the query text, and a
    labeled query never retrieves its own patches); mode: cfg.retrieval unless given ("random" for the
    sensitivity checks). Returns mcam.References: features (B, K, C, d, h, w), weights (B, K), the
    masks (B, K, X, Y, Z) when decoder A reads them (cfg.ref_masks, cfg.ref_mask_detail) or the prototype
    loss scores on them (cfg.ref_proto_weight, extensions.prototype_loss), and the chosen
    bank entries (B, K); with cfg.ref_align, features and masks moved to the prediction's centroid.
    On CUDA nothing here waits for the GPU (morphology_torch, select_device, the alignment's gathers), so
    the step keeps the GPU queue full; both are tested against their numpy twins."""
    masks = foreground(logits_b)                                          # (B, X, Y, Z)
    if masks.is_cuda:                                                     # (B, M), the query morphology
        morph = morphology_torch(masks)
    else:                                                               # no GPU to keep busy: numpy is faster
        morph = torch.from_numpy(morphology_batch(masks.numpy()))
    indices, weights = select_device(bank, morph, bank.query_rows(case_ids), cfg, generator, mode)
    with_masks = cfg.ref_masks or cfg.ref_mask_detail or cfg.ref_proto_weight > 0
    return bank.references(indices, weights, masks=with_masks,
                           query_centroids=mask_centroids(masks) if cfg.ref_align else None)


def foreground(logits_b):
    """Decoder B's predicted foreground (B, X, Y, Z) bool: argmax == 1, cheaper."""
    return logits_b[:, 1] > logits_b[:, 0]


SWAPS = ("retrieved", "random", "zeroed")  # what decoder A is given in the reference-sensitivity checks
# "zeroed" may be asked for too: the reference branch kept, the references' contribution zero (decode_a)


@torch.no_grad()
def decoder_a_probabilities(model, feats, logits_b, case_ids, bank, cfg, generator, swaps=SWAPS,
                            transfer=False):
    """Decoder A's foreground probability (B, X, Y, Z) float32 for each of `swaps`: with the references
    retrieved for decoder B's prediction logits_b, with as many random bank entries of other cases in their
    place (drawn from `generator`, equal weights, the same case cap), with none (decoder A without its
    reference branch) and "zeroed" (the branch kept, the references' contribution zero: the control that
    cannot flatter them). How far decoder A's output moves between them is how much it uses what the
    references contain (docs/design.md §6, §10).

    With `transfer`, for the swaps with references, "<swap>_transfer" is the references' own answer: their
    ground-truth masks averaged with their weights (B, X, Y, Z), the label an atlas method would transfer to
    the query without any network. Scored against the query's label it says whether retrieval finds
    references whose labels fit the query, whatever decoder A makes of them."""
    out = {}
    for swap in swaps:
        if swap == "zeroed":
            out[swap] = model.decode_a(feats, None, zero_refs=True).float().softmax(1)[:, 1]
            continue
        refs = None if swap == "none" else query_references(
            bank, logits_b, case_ids, cfg, generator, mode="random" if swap == "random" else None)
        out[swap] = model.decode_a(feats, refs).float().softmax(1)[:, 1]
        if transfer and refs is not None:
            centroids = mask_centroids(foreground(logits_b)) if cfg.ref_align else None
            out[f"{swap}_transfer"] = bank.label_transfer(refs.indices, refs.weights, centroids)
    return out


# -----------------------------------------------------------------------------
# explanation: text and figure

def format_explanation(bank, sel, boxes=None):
    """Readable account of a selection: per query, every candidate with its morphology distance, BM25 score,
    normalised score and fate (chosen with its weight, hard negative, or not needed)."""
    lines = []
    for i, rec in enumerate(sel.explain):
        where = f" box {tuple(int(v) for v in boxes[i][:3])}" if boxes is not None else ""
        lines.append(f"query {i} (case {rec['case_id']}{where}), mode {rec['mode']}, {sel.n_filled[i]} "
                     "filled slot(s)")
        lines.append(f"  {'entry':>6} {'case':<14} {'box start':<16} {'dist':>6} {'bm25':>7} {'score':>6}"
                     "  fate")
        for j, c in enumerate(rec["candidates"][:64]):
            fate = (f"chosen, weight {sel.weights[i][sel.indices[i] == c].sum():.3f}" if c in sel.indices[i]
                    else "hard negative" if rec["hard_negative"][j] else "not needed")
            start = str(tuple(int(v) for v in bank.boxes[c][:3]))
            lines.append(f"  {c:>6} {bank.case_ids[c]:<14} {start:<16} {rec['distance'][j]:>6.2f} "
                         f"{rec['bm25'][j]:>7.2f} {rec['score'][j]:>6.2f}  {fate}")
    return "\n".join(lines)


def plot_explanation(path, image, boxes, bank, sel, max_rows=4):
    """PNG: each query patch's middle axial slice, then its chosen references' slices with score and
    weight."""
    from matplotlib.figure import Figure
    rows, k = min(max_rows, len(boxes)), sel.indices.shape[1]
    fig = Figure(figsize=(2.2 * (k + 1), 2.4 * rows))
    axes = fig.subplots(rows, k + 1, squeeze=False)
    for r in range(rows):
        patch = padded_crop(image, boxes[r])
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
    files.make_folder(Path(path).parent)
    files.save_figure(fig, path, dpi=100)
    return path
