"""retrieve.py: shape descriptors on hand-made masks; tokenizer and BM25 (rank-bm25 as oracle, real LLM CoTs);
the one selection; the bank (grid, orientations, refresh, checkpoints); query_references end to end."""
import csv
import dataclasses
import io
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rank_bm25 import BM25Okapi
from scipy import ndimage

import data
import retrieve
from config import Config
from retrieve import (MORPH_DIM, MORPH_NAMES, ORIENTATIONS, CotIndex, ReferenceBank, grid_boxes,
                      morphology_batch, orient, select, tokenize)

# hand-written CoTs: A looks like the query but reasons differently; B and C reason like the query
COT = {
    "A": "Texture: Homogeneous cystic fluid signal. Boundary: Sharp, well-circumscribed smooth capsule with "
         "crisp high contrast. Context: Isolated, away from other structures. Summary: Smooth well-defined "
         "cyst.",
    "B": "Texture: Heterogeneous necrotic core with irregular enhancement. Boundary: Ill-defined "
         "infiltrative margins blurred into edema. Context: Adjacent vessels mimic the enhancing rim. "
         "Summary: Irregular infiltrative mass.",
    "C": "Texture: Heterogeneously enhancing, partly necrotic. Boundary: Indistinct, infiltrating borders "
         "with blurring into surrounding edema. Context: Vessels nearby. Summary: Infiltrative necrotic "
         "lesion.",
    "D": "Texture: Mildly heterogeneous. Boundary: Partly indistinct margins. Context: Near the ventricle. "
         "Summary: Lesion with partly indistinct margins.",
}
QUERY = ("Texture: Heterogeneous, necrotic centre with irregular rim enhancement. Boundary: Infiltrative, "
         "ill-defined and blurred margins fading into edema. Context: Nearby vessels mimic enhancement. "
         "Summary: Infiltrating irregular lesion with indistinct borders.")
GRID = SimpleNamespace(patch_size=(8, 8, 8), bank_stride=(8, 8, 8))  # what ReferenceBank.build reads


def settings(**kw):
    """A config for selection: these retrieval settings, no case cap unless a test sets one."""
    base = dict(k_coarse=16, k_fine=4, tau=0.5, retrieval="both", seed=0, max_refs_per_case=99)
    return dataclasses.replace(Config(), **{**base, **kw})


def hand_bank(patches=2, with_images=False):
    """Cases A-D on a line in morphology space, A nearest the query at the origin; `patches` per case."""
    where = {"A": 0.2, "B": 1.0, "C": 1.3, "D": 2.0}
    ids = [c for c in COT for _ in range(patches)]
    morph = [[where[c] + 0.01 * j, 0.0, 0.1 * j] for j, c in enumerate(ids)]
    rng = np.random.default_rng(0)
    volumes = {c: (rng.normal(size=(8, 8, 8)).astype(np.float32), rng.random((8, 8, 8)) < 0.3) for c in COT}
    return ReferenceBank(ids, [(0, 0, 0, 8, 8, 8)] * len(ids), morph, [COT[c] for c in ids],
                         volumes if with_images else None)


def cluster_bank(n_cases=50, per_case=8, seed=0):
    """A bank without images: each case a cluster in morphology space with its own text."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words, 30)) for _ in range(n_cases)]
    case = np.arange(n_cases * per_case) // per_case
    morph = rng.normal(size=(n_cases, MORPH_DIM))[case] + 0.3 * rng.normal(size=(len(case), MORPH_DIM))
    return ReferenceBank([f"case{c}" for c in case], np.zeros((len(case), 6)), morph, np.take(texts, case))


def ball(shape, centre, radius):
    return sum((g - c) ** 2 for g, c in zip(np.indices(shape), centre)) <= radius ** 2


def blob_volumes(shapes, seed=0):
    """Case ID -> (image, label) of these shapes: noise, and a box of foreground that differs per case."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (cid, shape) in enumerate(shapes.items()):
        label = np.zeros(shape, np.uint8)
        label[2 + i:10, 3:12 - i, 1:6] = 1
        out[cid] = (rng.normal(size=shape).astype(np.float32), label)
    return out


# ----------------------------------------------------------------------------- morphology descriptors
def test_morphology_sphere_and_box():
    r = 12
    d = dict(zip(MORPH_NAMES, morphology_batch(ball((48, 48, 40), (24, 24, 20), r)[None])[0]))
    assert d["fg_fraction"] == pytest.approx(4 / 3 * np.pi * r ** 3 / (48 * 48 * 40), rel=0.03)
    assert (d["extent_x"], d["extent_z"]) == pytest.approx((25 / 48, 25 / 40))
    assert (d["axis_ratio_mid"], d["axis_ratio_min"]) == pytest.approx((1, 1), abs=1e-3)
    assert d["surface_to_volume"] == pytest.approx(4.5 / r, rel=0.1)  # a digital sphere: ~1.5 x 4 pi r^2
    centroid = [d[f"centroid_{a}"] for a in "xyz"]
    assert centroid == pytest.approx([0.5 / 48, 0.5 / 48, 0.5 / 40], abs=1e-6)  # voxel 24 vs (48 - 1) / 2
    assert (d["components"], d["largest_share"], d["border_contact"]) == (1, 1, 0)
    mask = np.zeros((40, 30, 20), bool)
    mask[0:20, 10:20, 5:10] = True          # 20 x 10 x 5, touching the x = 0 face
    d = dict(zip(MORPH_NAMES, morphology_batch(mask[None])[0]))
    assert d["fg_fraction"] == pytest.approx(1000 / 24000)
    assert [d[f"extent_{a}"] for a in "xyz"] == pytest.approx([0.5, 1 / 3, 0.25])
    assert (d["axis_ratio_mid"], d["axis_ratio_min"]) == pytest.approx((0.5, 0.25))  # side ratios, exactly
    assert d["surface_to_volume"] == pytest.approx((2 * 200 + 2 * 100 + 50) / 1000)  # x = 0 is the patch cut
    assert [d[f"centroid_{a}"] for a in "xyz"] == pytest.approx([(9.5 - 19.5) / 40, 0, (7 - 9.5) / 20])
    assert d["border_contact"] == pytest.approx(1 / 6)


def test_morphology_batch_is_its_masks_one_by_one():
    """Each mask's row as if alone; components, largest share, surface against scipy and a pair count."""
    shape = (40, 36, 28)
    box = np.pad(np.ones((25, 26, 25), bool), [(0, 15), (10, 0), (3, 0)])     # on three patch faces
    noise = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=shape), 1.5) > 0.15
    cube = np.pad(np.ones((3, 3, 3), bool), [(1, n - 4) for n in shape])
    masks = np.stack([ball(shape, (10, 10, 10), 6) | ball(shape, (28, 26, 20), 4), np.zeros(shape, bool), box,
                      noise, np.ones(shape, bool), cube])
    out = morphology_batch(masks)
    assert out.shape == (len(masks), MORPH_DIM) and out.dtype == np.float32
    assert not out[1].any() and out[0, MORPH_NAMES.index("components")] == 2
    assert out[5, MORPH_NAMES.index("surface_to_volume")] == pytest.approx(54 / 27)
    for row, mask in zip(out, masks):
        np.testing.assert_array_equal(row, morphology_batch(mask[None])[0])
        if mask.any():
            labels, count = ndimage.label(mask)
            pairs = sum(np.count_nonzero(np.diff(mask, axis=a)) for a in range(3))
            d = dict(zip(MORPH_NAMES, row))
            assert d["components"] == count and d["largest_share"] == pytest.approx(
                np.bincount(labels.ravel())[1:].max() / mask.sum())
            assert d["surface_to_volume"] == pytest.approx(pairs / mask.sum())
    assert out[3, MORPH_NAMES.index("components")] > 3                   # the noise: many pieces


# ----------------------------------------------------------------------------- tokenizer and BM25
def test_tokenizer_handles_radiology_text():
    toks = tokenize("Texture: Heterogeneous, ILL-DEFINED masses; enhancing/enhanced enhancement. "
                    "Summary: The margins are blurred and blurring.")
    assert "textur" not in toks and "summar" not in toks  # field labels are structure, not evidence
    assert not {"the", "are", "and"} & set(toks)  # stopwords
    assert toks.count(tokenize("enhance")[0]) == 3  # inflections share one stem
    assert tokenize("blurred") == tokenize("blurring") == tokenize("blur")
    assert tokenize("heterogeneous") == tokenize("heterogeneity") == tokenize("heterogeneously")
    assert tokenize("margins") == tokenize("margin") and tokenize("masses") == tokenize("mass")
    assert tokenize("ill-defined") == tokenize("ill") + tokenize("defined") + tokenize("illdefined")
    assert tokenize("boundary is sharp") == tokenize("Boundary") + tokenize("sharp")  # the word, no label
    assert tokenize("") == [] and tokenize(None) == []


def test_bm25_matches_rank_bm25():
    corpus = list(COT.values())
    oracle = BM25Okapi([tokenize(t) for t in corpus])
    n = {t: sum(t in doc for doc in oracle.doc_freqs) for t in oracle.idf}  # the smoothed IDF, by hand
    oracle.idf = {t: np.log((4 - n[t] + 0.5) / (n[t] + 0.5) + 1) for t in oracle.idf}
    index = CotIndex(corpus + corpus[:2])                       # repeated texts are one document
    assert len(index.texts) == 4
    np.testing.assert_allclose(index.scores(QUERY), oracle.get_scores(tokenize(QUERY)))
    assert index.scores(QUERY) is index.scores(QUERY)           # computed once per query text
    # two words in every document, one in half: rank-bm25's Okapi IDF scores these 0 or below, ours > 0
    small = ["wall thin bright", "wall thin dark"] * 2
    assert (BM25Okapi([tokenize(t) for t in small]).get_scores(tokenize("wall thin bright")) <= 0).all()
    scores = CotIndex(small).scores("wall thin bright")
    assert (scores > 0).all() and scores[0] > scores[1]
    with pytest.raises(ValueError, match="no words"):
        CotIndex(["the", "and of"])


def test_real_cots(brisc_csv):
    """Real LLM CoTs of brain-tumour MRI, three diagnoses (chance 1/3). Each image's no-mask CoT queries the
    others' mask CoTs: the share of its 5 best with its diagnosis. The filter, morphology out of play (all
    equal), rejects some candidates, mostly of another diagnosis; what it keeps beats chance."""
    with open(brisc_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len({r["diagnosis"] for r in rows}) == 3
    diagnosis = np.array([r["diagnosis"] for r in rows])

    def precision(tokenizer):
        index = CotIndex([r["cot_mask"] for r in rows], tokenizer)
        shares = []
        for i, row in enumerate(rows):
            scores = index.scores(row["cot_no_mask"])[[index.doc_of[r["cot_mask"]] for r in rows]]
            scores[i] = -np.inf                                    # not its own mask CoT
            shares.append(np.mean(diagnosis[np.argsort(-scores, kind="stable")[:5]] == diagnosis[i]))
        return float(np.mean(shares))
    ours, plain = precision(tokenize), precision(lambda t: re.findall(r"[a-z0-9]+", t.lower()))
    print(f"same-diagnosis precision@5: radiology tokenizer {ours:.3f}, plain tokens {plain:.3f}")
    assert ours > 0.55, (ours, plain)
    ids = [f"img{i}" for i in range(len(rows))]
    bank = ReferenceBank(ids, np.zeros((len(ids), 6)), np.zeros((len(ids), 3)), [r["cot_mask"] for r in rows])
    sel = select(bank, np.zeros((len(rows), 3)), [r["cot_no_mask"] for r in rows], ids,
                 settings(k_coarse=len(rows), tau=0.6))
    same, other = [], []
    for i, rec in enumerate(sel.explain):
        assert len(rec["candidates"]) == len(rows) - 1 and ids[i] not in [ids[c] for c in rec["candidates"]]
        alike = diagnosis[rec["candidates"]] == diagnosis[i]
        same.append(rec["hard_negative"][alike].mean()), other.append(rec["hard_negative"][~alike].mean())
    print(f"tau 0.6 rejects {100 * np.mean(same):.1f} % of same-, {100 * np.mean(other):.1f} % of "
          "other-diagnosis candidates")
    assert 0.2 < np.mean(same) < 0.95 and np.mean(other) > np.mean(same) + 0.1
    assert (diagnosis[sel.indices] == diagnosis[:, None]).mean() > 0.5


# ----------------------------------------------------------------------------- selection
def test_leave_one_case_out_and_bad_input():
    bank, at = cluster_bank(seed=1), [0, 9, 250]
    own, morph, texts = [bank.case_ids[i] for i in at], bank.morph[at], [bank.texts[i] for i in at]
    for mode in retrieve.MODES:
        sel = select(bank, morph, texts, own, settings(retrieval=mode))
        for rec, idx, case in zip(sel.explain, sel.indices, own):
            assert case not in {bank.case_ids[i] for i in np.concatenate([rec["candidates"], idx])}
            assert len(rec["candidates"]) == 16  # exclusion still leaves k_coarse candidates
    sel = select(bank, morph, texts, [None, "elsewhere", None], settings())  # nothing of theirs to exclude
    assert [bank.case_ids[rec["candidates"][0]] for rec in sel.explain] == own
    lonely = ReferenceBank(["A", "A"], np.zeros((2, 6)), np.eye(2), [COT["A"]] * 2)
    with pytest.raises(ValueError, match="outside case 'A'"):
        select(lonely, np.zeros((1, 2)), [QUERY], ["A"], settings())
    for mode in ("bm25", "cot"):
        with pytest.raises(ValueError, match=f"retrieval='{mode}'"):
            select(bank, morph, texts, own, settings(retrieval=mode))


def test_hard_negative_is_dropped_and_explained(tmp_path):
    bank = hand_bank(with_images=True)
    sel = select(bank, np.zeros((1, 3)), [QUERY], [None], settings(k_coarse=6, k_fine=2))
    rec = sel.explain[0]
    assert bank.case_ids[rec["candidates"][0]] == "A"  # morphologically closest ...
    a = np.array([bank.case_ids[c] == "A" for c in rec["candidates"]])
    assert rec["hard_negative"][a].all() and not rec["hard_negative"][~a].all()  # ... but reasons otherwise
    assert {bank.case_ids[i] for i in sel.indices[0]} <= {"B", "C"} and sel.n_filled[0] == 0
    morph_only = select(bank, np.zeros((1, 3)), [QUERY], [None],
                        settings(k_coarse=6, k_fine=2, retrieval="morph"))
    assert {bank.case_ids[i] for i in morph_only.indices[0]} == {"A"}
    np.testing.assert_allclose(morph_only.weights[0], [0.5, 0.5])        # equal weights without the filter
    text = retrieve.format_explanation(bank, sel)
    assert "hard negative" in text and "chosen, weight" in text
    path = retrieve.plot_explanation(tmp_path / "e.png", bank.volumes["A"][0], [(0, 0, 0, 8, 8, 8)],
                                     bank, sel)
    assert path.read_bytes()[:4] == b"\x89PNG"
    for temp in (1.0, 0.1):                                              # weights: softmax of the scores
        sel = select(bank, np.zeros((1, 3)), [QUERY], [None],
                     settings(k_coarse=8, k_fine=3, tau=0.0, ref_temperature=temp))
        rec = sel.explain[0]
        s = np.array([rec["score"][list(rec["candidates"]).index(i)] for i in sel.indices[0]])
        np.testing.assert_allclose(sel.weights[0], np.exp(s / temp) / np.exp(s / temp).sum(), rtol=1e-6)
        assert s[0] == 1.0 and np.all(np.diff(s) <= 0)  # divided by the best score; best first


def test_fill_rule_and_case_cap():
    bank = hand_bank(patches=1)
    # one survivor: the empty slots repeat it with weight 0
    sel = select(bank, np.zeros((1, 3)), [QUERY], [None], settings(k_coarse=4, k_fine=4, tau=0.99))
    assert len(set(sel.indices[0])) == 1 and sel.n_filled[0] == 3
    np.testing.assert_allclose(sel.weights[0], [1, 0, 0, 0])
    # no text evidence at all: the morphology order, equal weights, every slot counted as filled
    sel = select(bank, np.zeros((1, 3)), ["Summary: zebra quokka."], [None], settings(k_coarse=4, k_fine=3))
    assert [bank.case_ids[i] for i in sel.indices[0]] == ["A", "B", "C"] and sel.n_filled[0] == 3
    np.testing.assert_allclose(sel.weights[0], [1 / 3] * 3)
    # fewer candidates than k_fine (leave-one-case-out on a 4-case bank): survivors repeat, weights sum to 1
    sel = select(bank, np.zeros((1, 3)), [QUERY], ["B"], settings(k_coarse=4, k_fine=5, tau=0.0))
    assert sel.n_filled[0] == 2 and np.isclose(sel.weights[0].sum(), 1) and (sel.weights[0][3:] == 0).all()
    assert list(sel.indices[0][3:]) == list(sel.indices[0][:2])
    # at most max_refs_per_case references of one case, in every mode; the rest of the order fills in
    bank = hand_bank(patches=3)                                   # cases A-D on a line, 3 patches each
    for cap in (1, 2):
        for mode in retrieve.MODES:
            cfg = settings(k_coarse=12, k_fine=3, tau=0.0, retrieval=mode, max_refs_per_case=cap)
            sel = select(bank, np.zeros((2, 3)), [QUERY, QUERY], [None, "B"], cfg)
            for row, weights in zip(sel.indices, sel.weights):
                picked = Counter(bank.case_ids[i] for i, w in zip(row, weights) if w > 0)
                assert max(picked.values()) <= cap and sum(picked.values()) == 3, (cap, mode, picked)
    nearest = select(bank, np.zeros((1, 3)), [QUERY], [None],
                     settings(k_coarse=12, k_fine=3, retrieval="morph", max_refs_per_case=1))
    assert [bank.case_ids[i] for i in nearest.indices[0]] == ["A", "B", "C"]    # nearest patch of each case
    uncapped = select(bank, np.zeros((1, 3)), [QUERY], [None],
                      settings(k_coarse=12, k_fine=3, retrieval="morph"))
    assert [bank.case_ids[i] for i in uncapped.indices[0]] == ["A", "A", "A"]
    # a query of case B: only C passes tau (A and D are hard negatives), so the cap leaves one reference and
    # the two other slots repeat it with weight 0, rather than taking a hard negative
    sel = select(bank, np.zeros((1, 3)), [QUERY], ["B"], settings(k_coarse=12, k_fine=3, max_refs_per_case=1))
    assert [bank.case_ids[i] for i in sel.indices[0]] == ["C"] * 3 and sel.n_filled[0] == 2
    np.testing.assert_allclose(sel.weights[0], [1, 0, 0])


def test_random_draws():
    """Mode random: other cases, no repeats, equal weights; draws follow the generator (default: cfg.seed)."""
    bank = cluster_bank(seed=2)
    ids = [bank.case_ids[i] for i in range(0, 400, 10)]           # 40 queries of 40 bank cases
    morph, texts = np.zeros((len(ids), MORPH_DIM)), [QUERY] * len(ids)
    cfg = settings(retrieval="random", k_fine=6, max_refs_per_case=1)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()                                 # a tensor: checkpoints save it
    first, second = (select(bank, morph, texts, ids, cfg, generator) for _ in range(2))
    generator.set_state(state)
    again = select(bank, morph, texts, ids, cfg, generator)
    assert (first.indices != second.indices).any() and (first.indices == again.indices).all()
    for row, q in zip(first.indices, ids):
        cases = [bank.case_ids[i] for i in row]
        assert q not in cases and len(set(cases)) == 6
    np.testing.assert_allclose(first.weights, 1 / 6)
    default = [select(bank, morph, texts, ids, dataclasses.replace(cfg, seed=s)).indices for s in (0, 0, 1)]
    assert (default[0] == default[1]).all() and (default[0] != default[2]).any()
    assert (default[0] == first.indices).all()                    # seed 0: the same draws as the generator


# ----------------------------------------------------------------------------- the bank
def test_grid_orientations_and_build():
    """The grid covers the volume, centred on an axis shorter than the patch; the bank's four orientations
    are exactly the distinct patches data.rot_flip makes; the bank holds every box in each of them."""
    boxes = grid_boxes((20, 10, 6), (8, 8, 8), (8, 8, 8))
    assert sorted({b[0] for b in boxes}) == [0, 8, 12] and sorted({b[1] for b in boxes}) == [0, 2]
    assert {(b[2], b[5]) for b in boxes} == {(-1, 7)}  # centred on the short axis
    vol = np.arange(20 * 10 * 6, dtype=np.float32).reshape(20, 10, 6) + 1
    patch = data.padded_crop(vol, boxes[0])
    assert patch.shape == (8, 8, 8) and (patch[:, :, 0] == 0).all() and (patch[:, :, 7] == 0).all()
    np.testing.assert_array_equal(patch[:, :, 1:7], vol[:8, :8])
    banked = {orient(vol, v).tobytes() for v in range(len(ORIENTATIONS))}
    trained = {data.rot_flip(torch.from_numpy(vol), k, a).numpy().tobytes() for k in range(4) for a in (0, 1)}
    assert banked == trained and len(banked) == 4
    volumes = blob_volumes({"c1": (20, 18, 10), "c2": (12, 14, 7)})     # the bank: each box, each orientation
    bank = ReferenceBank.build(GRID, volumes, ["c1", "c2"], {"c1": COT["B"], "c2": COT["C"]})
    counts = {(cid, v): len(grid_boxes(orient(volumes[cid][1], v).shape, (8, 8, 8), (8, 8, 8)))
              for cid in volumes for v in range(len(ORIENTATIONS))}
    assert sorted(Counter(zip(bank.case_ids, bank.variants.tolist())).items()) == sorted(counts.items())
    for i in range(len(bank)):  # each entry: the ground truth of its box in its oriented volume
        label = orient(volumes[bank.case_ids[i]][1], bank.variants[i])
        np.testing.assert_array_equal(bank.patch(i)[1], data.padded_crop(label, bank.boxes[i]))
        assert bank.texts[i] == COT["B" if bank.case_ids[i] == "c1" else "C"]
    image, label = (np.stack(p) for p in zip(*[bank.patch(i) for i in range(len(bank))]))
    np.testing.assert_array_equal(bank.morph, morphology_batch(label))
    bank.refresh(lambda x: x[:, :, ::4, ::4, ::4], momentum=0.9)
    np.testing.assert_array_equal(bank.crops[:, 0].numpy(), image)
    with pytest.raises(ValueError, match="'c2' has no mask CoT"):
        ReferenceBank.build(GRID, volumes, ["c1", "c2"], {"c1": COT["B"]})


def test_refresh_and_checkpoint_round_trip(monkeypatch):
    """EMA refresh, replace and momentum 0; the state reads back with weights_only=True and selects the
    same; a state that does not fit is refused with a ValueError."""
    bank = hand_bank(with_images=True)
    patches = torch.stack([torch.from_numpy(bank.patch(i)[0]) for i in range(len(bank))])[:, None]
    encoder = lambda scale: lambda x: scale * torch.nn.functional.avg_pool3d(x, 4)    # (n, 1, 2, 2, 2)
    bank.refresh(encoder(1.0), momentum=0.9, batch_size=3)
    torch.testing.assert_close(bank.features, encoder(1.0)(patches))
    monkeypatch.setattr(data, "padded_crop", None)  # the patches were cut once, by the first refresh
    bank.refresh(encoder(3.0), momentum=0.9)
    torch.testing.assert_close(bank.features, 0.9 * encoder(1.0)(patches) + 0.1 * encoder(3.0)(patches))
    monkeypatch.undo()
    buffer, restored = io.BytesIO(), hand_bank(with_images=True)
    torch.save(bank.state_dict(), buffer)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    torch.testing.assert_close(restored.features, bank.features)
    cfg = settings(k_coarse=6, k_fine=3)
    args = (np.zeros((2, 3)), [QUERY, COT["A"]], [None, "B"], cfg)
    np.testing.assert_array_equal(select(restored, *args).indices, select(bank, *args).indices)
    for b in (bank, restored):                    # a run's first refresh replaces what a checkpoint left
        b.refresh(encoder(2.0), momentum=0.9, replace=True)
        assert torch.equal(b.features, encoder(2.0)(patches))
    bank.refresh(encoder(-3.0), momentum=0.0)
    assert torch.equal(bank.features, encoder(-3.0)(patches))
    with pytest.raises(ValueError, match="encoder gives features"):
        bank.refresh(lambda x: torch.nn.functional.avg_pool3d(x, 2), momentum=0.0)
    with pytest.raises(ValueError, match="does not match"):
        hand_bank(patches=1).load_state_dict(bank.state_dict())
    for bad in (dict(bank.state_dict(), features=torch.zeros(3, 1, 2, 2, 2)),
                {k: v for k, v in bank.state_dict().items() if k != "morph"}, [1, 2]):
        with pytest.raises(ValueError, match="saved reference bank"):
            hand_bank().load_state_dict(bad)


# ----------------------------------------------------------------------------- the path of training and tests
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_query_references_and_swaps(device):
    """Decoder B's logits -> foreground -> morphology -> select() with each case's image CoT -> features of
    the chosen entries, on the bank's device: select()'s picks, random draws included; the three swaps."""
    bank = ReferenceBank.build(GRID, blob_volumes({c: (16, 16, 8) for c in COT}), list(COT), COT, device)
    with pytest.raises(RuntimeError, match="refresh"):
        retrieve.query_references(bank, torch.zeros(1, 2, 8, 8, 8, device=device), ["B"], settings())
    bank.refresh(lambda x: torch.nn.functional.avg_pool3d(x, 4).repeat(1, 3, 1, 1, 1), momentum=0.0)
    bank.index_queries({**COT, "U": QUERY})                               # the query texts of A-D and of U
    logits = torch.randn(3, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    logits[:, 1, 2:6, 2:7, 1:5] += 3                                      # a blob each, with noise around it
    ids = ["B", "U", "D"]
    masks = (logits.argmax(1) == 1).numpy()
    for mode in retrieve.MODES:
        cfg = settings(k_fine=3, k_coarse=8, max_refs_per_case=1, retrieval=mode)
        refs = retrieve.query_references(bank, logits.to(device), ids, cfg, torch.Generator().manual_seed(5))
        sel = select(bank, morphology_batch(masks), [bank.query_texts[c] for c in ids], ids, cfg,
                     torch.Generator().manual_seed(5))
        assert refs.features.device == refs.weights.device == refs.indices.device == bank.features.device
        np.testing.assert_array_equal(refs.indices.cpu().numpy(), sel.indices)
        np.testing.assert_array_equal(refs.weights.cpu().numpy(), sel.weights)
        assert refs.features.shape == (3, 3, 3, 2, 2, 2)
        assert torch.equal(refs.features, bank.features[refs.indices])
    with pytest.raises(ValueError, match="'V' has no query CoT"):
        retrieve.query_references(bank, logits[:1].to(device), ["V"], cfg)
    # decoder_a_probabilities: retrieved and random references are selections of their own, "zeroed" none
    given = []
    model = SimpleNamespace(decode_a=lambda feats, refs, zero_refs=False:
                            given.append((refs, zero_refs)) or torch.zeros(2, 2, 8, 8, 8))
    out = retrieve.decoder_a_probabilities(model, None, logits[:2].to(device), ["B", "C"], bank,
                                           settings(k_fine=3), torch.Generator().manual_seed(1))
    assert set(out) == set(retrieve.SWAPS) and out["zeroed"].shape == (2, 8, 8, 8)
    assert [(refs is None, zero) for refs, zero in given] == [(False, False), (False, False), (True, True)]
    assert not torch.equal(given[0][0].indices, given[1][0].indices)
