"""Reference selection (retrieve.py) and the reference bank (bank.py): leave-one-case-out, hard negatives,
the fill rule, determinism, the device path against select(), the bank's refresh and checkpointing,
explanations and the selection benchmark."""
import csv
import dataclasses
import io
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import retrieve
from bank import ORIENTATIONS, ReferenceBank, grid_boxes, orient
from bench import retrieval_benchmark, synthetic_bank
from config import Config
from morphology import MORPH_DIM, morphology_batch
from retrieve import select, select_device
from test_cot import COT, QUERY


def settings(**kw):
    """A config for selection: these retrieval settings, no case cap unless a test sets one."""
    base = dict(k_coarse=16, k_fine=4, tau=0.5, ref_temperature=1.0, retrieval="both", seed=0,
                max_refs_per_case=99)
    return dataclasses.replace(Config(), **{**base, **kw})


GRID = SimpleNamespace(patch_size=(8, 8, 8), bank_stride=(8, 8, 8), ref_align=False)  # what build() reads


def hand_bank(patches=2, with_images=False):
    """Cases A-D on a line in morphology space, A nearest the query at the origin; `patches` per case."""
    where = {"A": 0.2, "B": 1.0, "C": 1.3, "D": 2.0}
    ids = [c for c in COT for _ in range(patches)]
    morph = [[where[c] + 0.01 * j, 0.0, 0.1 * j] for j, c in enumerate(ids)]
    rng = np.random.default_rng(0)
    volumes = {c: (rng.normal(size=(8, 8, 8)).astype(np.float32),
                   (rng.random((8, 8, 8)) < 0.3).astype(np.uint8)) for c in COT}
    boxes = [(0, 0, 0, 8, 8, 8)] * len(ids)
    return ReferenceBank(ids, boxes, morph, [COT[c] for c in ids], volumes if with_images else None)


# ----------------------------------------------------------------------------- selection

def test_leave_one_case_out():
    bank, _ = synthetic_bank(400, patches_per_case=8, seed=1)
    own = [bank.case_ids[i] for i in (0, 9, 250)]
    morph = bank.morph[[0, 9, 250]]  # each query sits on its own case's patches
    text = [bank.texts[i] for i in (0, 9, 250)]
    for mode in retrieve.MODES:
        sel = select(bank, morph, text, own, settings(retrieval=mode))
        for rec, idx, case in zip(sel.explain, sel.indices, own):
            assert case not in {bank.case_ids[i] for i in np.concatenate([rec["candidates"], idx])}
            if mode == "both":
                assert len(rec["candidates"]) == 16  # exclusion still leaves k_coarse candidates
    sel = select(bank, morph, text, [None] * 3, settings())  # unlabeled query: its own case is fair game
    assert bank.case_ids[sel.explain[0]["candidates"][0]] == own[0]


def test_hard_negative_is_dropped():
    bank = hand_bank()
    cfg = settings(k_coarse=6, k_fine=2)
    sel = select(bank, np.zeros((1, 3)), [QUERY], [None], cfg)
    rec = sel.explain[0]
    assert bank.case_ids[rec["candidates"][0]] == "A"  # morphologically closest ...
    a = np.array([bank.case_ids[c] == "A" for c in rec["candidates"]])
    assert rec["hard_negative"][a].all()  # ... but it reasons differently
    assert {bank.case_ids[i] for i in sel.indices[0]} <= {"B", "C"} and sel.n_filled[0] == 0
    morph_only = select(bank, np.zeros((1, 3)), [QUERY], [None],
                        settings(k_coarse=6, k_fine=2, retrieval="morph"))
    assert {bank.case_ids[i] for i in morph_only.indices[0]} == {"A"}


def test_weights_are_softmax_of_scores():
    bank = hand_bank()
    for temp in (1.0, 0.1):
        sel = select(bank, np.zeros((1, 3)), [QUERY], [None],
                     settings(k_coarse=8, k_fine=3, tau=0.0, ref_temperature=temp))
        rec = sel.explain[0]
        s = np.array([rec["score"][list(rec["candidates"]).index(i)] for i in sel.indices[0]])
        np.testing.assert_allclose(sel.weights[0], np.exp(s / temp) / np.exp(s / temp).sum(), rtol=1e-6)
        assert s[0] == 1.0 and np.all(np.diff(s) <= 0)  # divided by the best score; best first


def test_fill_rule():
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


def test_case_cap_gives_diverse_references():
    """At most max_refs_per_case references of one case, in every mode; the rest of the order fills in."""
    bank = hand_bank(patches=3)                                   # cases A-D on a line, 3 patches each
    for cap in (1, 2):
        for mode in retrieve.MODES:
            cfg = settings(k_coarse=12, k_fine=3, tau=0.0, retrieval=mode, max_refs_per_case=cap)
            sel = select(bank, np.zeros((2, 3)), [QUERY, QUERY], [None, "B"], cfg)
            for row, weights in zip(sel.indices, sel.weights):
                # filled slots weigh 0
                picked = Counter(bank.case_ids[i] for i, w in zip(row, weights) if w > 0)
                assert max(picked.values()) <= cap and sum(picked.values()) == 3, (cap, mode, picked)
    nearest = select(bank, np.zeros((1, 3)), [QUERY], [None],
                     settings(k_coarse=12, k_fine=3, retrieval="morph", max_refs_per_case=1))
    assert [bank.case_ids[i] for i in nearest.indices[0]] == ["A", "B", "C"]    # nearest patch of each case
    uncapped = select(bank, np.zeros((1, 3)), [QUERY], [None],
                      settings(k_coarse=12, k_fine=3, retrieval="morph"))
    assert [bank.case_ids[i] for i in uncapped.indices[0]] == ["A", "A", "A"]
    # a query of case B: only C's patches pass tau (A and D are hard negatives), so the cap leaves one
    # reference and the two other slots repeat it with weight 0, rather than taking a hard negative
    sel = select(bank, np.zeros((1, 3)), [QUERY], ["B"],
                 settings(k_coarse=12, k_fine=3, tau=0.5, max_refs_per_case=1))
    assert [bank.case_ids[i] for i in sel.indices[0]] == ["C"] * 3 and sel.n_filled[0] == 2
    np.testing.assert_allclose(sel.weights[0], [1, 0, 0])


def test_selection_is_deterministic():
    bank, text = synthetic_bank(300, seed=2)
    again, _ = synthetic_bank(300, seed=2)
    morph, ids = bank.morph[[5, 50, 150, 250]], [bank.case_ids[5], None, bank.case_ids[150], None]
    texts = [bank.texts[i] for i in (9, 60, 140, 290)]
    first, second = select(bank, morph, texts, ids, settings()), select(again, morph, texts, ids, settings())
    np.testing.assert_array_equal(first.indices, second.indices)
    np.testing.assert_array_equal(first.weights, second.weights)
    draw = [select(bank, morph, texts, ids, settings(retrieval="random", seed=s)).indices for s in (0, 0, 1)]
    assert (draw[0] == draw[1]).all() and (draw[0] != draw[2]).any()


def test_unknown_mode_and_lonely_case_fail_loudly():
    bank = hand_bank()
    with pytest.raises(ValueError, match="retrieval='bm25'"):
        select(bank, np.zeros((1, 3)), [QUERY], [None], settings(retrieval="bm25"))
    lonely = ReferenceBank(["A", "A"], np.zeros((2, 6)), np.eye(2), [COT["A"]] * 2)
    with pytest.raises(ValueError, match="outside case 'A'"):
        select(lonely, np.zeros((1, 2)), [QUERY], ["A"], settings())


# ----------------------------------------------------------------------------- the device path

def assert_device_matches(bank, morph, case_texts, ids, cfg):
    """select_device == select() for these queries (case IDs indexed with their texts by index_queries):
    the same entries in the same slots, the same weights. Returns select()'s Selection."""
    own = [c if c in bank.code_of else None for c in ids]
    expected = select(bank, morph, [case_texts[c] for c in ids], own, cfg)
    morph_t = torch.as_tensor(morph, dtype=torch.float32)
    indices, weights = select_device(bank, morph_t, bank.query_rows(ids), cfg)
    assert indices.dtype == torch.long and weights.dtype == torch.float32
    np.testing.assert_array_equal(indices.numpy(), expected.indices, err_msg=f"{cfg}")
    np.testing.assert_allclose(weights.numpy(), expected.weights, rtol=1e-5, atol=1e-6, err_msg=f"{cfg}")
    return expected


def test_device_path_matches_select_on_hand_banks():
    # the selection tests' situations: hard negatives, all survive, one survivor, no text evidence,
    # fewer other-case candidates than k_coarse and than k_fine; distances here have no ties
    case_texts = {"query": QUERY, "B": QUERY, "A": COT["A"], "zebra": "Summary: zebra quokka."}
    morph = np.array([[0.0, 0.0, 0.0], [1.2, 0.0, 0.3], [0.5, 0.0, -0.2], [2.0, 0.0, 0.0]])
    ids = list(case_texts)
    for bank in (hand_bank(), hand_bank(patches=1)):
        bank.index_queries(case_texts)
        for mode in ("both", "morph", "cot"):
            for kw in (dict(k_coarse=6, k_fine=2), dict(k_coarse=8, k_fine=3, tau=0.0),
                       dict(k_coarse=4, tau=0.99), dict(k_coarse=4, k_fine=5, tau=0.0),
                       dict(k_coarse=3, k_fine=9, tau=0.5)):
                for cap in (1, 2, 99):
                    assert_device_matches(bank, morph, case_texts, ids,
                                          settings(retrieval=mode, max_refs_per_case=cap, **kw))


def test_device_path_matches_select_on_synthetic_bank():
    # 300 cases of 3 patches; 120 queries near random entries, even ones of a bank case (excluded), odd
    # ones of cases outside the bank; tau from "nobody survives" through "some" to "everybody"
    bank, text = synthetic_bank(900, patches_per_case=3, seed=3)
    rng = np.random.default_rng(4)
    ids = [bank.case_ids[i] if j % 2 == 0 else f"unlabeled{j}"
           for j, i in enumerate(rng.integers(0, len(bank), 120))]
    case_texts = {c: text() for c in ids}
    bank.index_queries(case_texts)
    morph = (bank.morph[rng.integers(0, len(bank), len(ids))]
             + 0.3 * rng.normal(size=(len(ids), bank.morph.shape[1])))
    k = 4
    for mode in ("both", "morph", "cot"):
        filled = {}
        for tau in (1.01, 0.95, 0.5, 0.0):
            cfg = settings(retrieval=mode, k_fine=k, tau=tau)
            sel = assert_device_matches(bank, morph, case_texts, ids, cfg)
            filled[tau] = sel.n_filled
            assert_device_matches(bank, morph, case_texts, ids,
                                  settings(retrieval=mode, k_fine=k, tau=tau, max_refs_per_case=1))
        if mode != "morph":  # the tau values give every regime of the fill rule: no survivor, some, all
            assert (filled[1.01] == k).all() and (filled[0.0] == 0).all()
            assert ((filled[0.95] > 0) & (filled[0.95] < k)).any()


def test_device_random_draws():
    bank, text = synthetic_bank(400, seed=5)
    ids = [bank.case_ids[i] for i in range(0, 400, 10)]  # 40 queries of 40 bank cases
    bank.index_queries({c: text() for c in ids})
    rows, morph = bank.query_rows(ids), torch.zeros(len(ids), bank.morph.shape[1])
    cfg = settings(retrieval="random", k_fine=6)

    def draw(seed):
        return select_device(bank, morph, rows, cfg, torch.Generator().manual_seed(seed))
    (a, w), (b, _), (c, _) = draw(0), draw(0), draw(1)
    own = np.array([[bank.case_ids[i] == q for i in row] for row, q in zip(a.tolist(), ids)])
    assert not own.any()  # never the query's own case
    assert all(len(set(row)) == 6 for row in a.tolist())  # without replacement
    np.testing.assert_allclose(w.numpy(), 1 / 6)
    assert torch.equal(a, b) and not torch.equal(a, c)  # reproducible, and the seed matters
    # without a generator: one seeded with cfg.seed
    assert torch.equal(select_device(bank, morph, rows, cfg)[0], select_device(bank, morph, rows, cfg)[0])
    # fewer other-case entries than k_fine: all of them, repeated with weight 0, as select() does
    small = hand_bank(patches=1)
    small.index_queries({"B": QUERY})
    idx, w = select_device(small, torch.zeros(1, 3), small.query_rows(["B"]),
                           settings(retrieval="random", k_fine=5))
    assert sorted(small.case_ids[i] for i in idx[0, :3].tolist()) == ["A", "C", "D"]
    assert idx[0, 3:].tolist() == idx[0, :2].tolist()
    np.testing.assert_allclose(w[0].numpy(), [1 / 3, 1 / 3, 1 / 3, 0, 0], rtol=1e-6)


def test_device_tables_follow_the_bank():
    lonely = ReferenceBank(["A", "A"], np.zeros((2, 6)), np.eye(2), [COT["A"]] * 2)
    lonely.index_queries({"A": QUERY, "U": QUERY})
    with pytest.raises(ValueError, match="outside case 'A'"):
        lonely.query_rows(["U", "A"])
    with pytest.raises(ValueError, match="'V' has no query CoT"):
        lonely.query_rows(["V"])
    # load_state_dict re-indexes: the loaded morphology and texts, the queries indexed before it
    bank, text = synthetic_bank(200, seed=6)
    other, _ = synthetic_bank(200, seed=7)  # same cases and boxes, other morphology and texts
    case_texts = {"case3": text(), "case20": text(), "new": text()}
    bank.index_queries(case_texts)
    bank.load_state_dict(other.state_dict())
    other.index_queries(case_texts)
    np.testing.assert_array_equal(bank.query_bm25.numpy(), other.query_bm25.numpy())
    np.testing.assert_array_equal(bank.z.numpy(), other.z.numpy())
    ids = ["case3", "new", "case20", "new"]
    morph = other.morph[[24, 90, 160, 7]] + 0.1
    for mode in ("both", "cot"):
        assert_device_matches(bank, morph, case_texts, ids, settings(retrieval=mode))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_path_does_not_synchronise():
    bank, text = synthetic_bank(2000, seed=8, device="cuda")
    ids = ["case1", "elsewhere", "case40", "case7"]
    bank.index_queries({c: text() for c in ids})
    rows, morph = bank.query_rows(ids), torch.as_tensor(bank.morph[[3, 50, 400, 9]], device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        for mode in retrieve.MODES:
            select_device(bank, morph, rows, settings(retrieval=mode), generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- the bank

def test_grid_covers_volume_and_pads_short_axes():
    boxes = grid_boxes((20, 10, 6), (8, 8, 8), (8, 8, 8))
    assert sorted({b[0] for b in boxes}) == [0, 8, 12] and sorted({b[1] for b in boxes}) == [0, 2]
    assert {(b[2], b[5]) for b in boxes} == {(-1, 7)}  # centred on the short axis
    vol = np.arange(20 * 10 * 6, dtype=np.float32).reshape(20, 10, 6) + 1
    patch = data.padded_crop(vol, boxes[0])
    assert patch.shape == (8, 8, 8)
    assert (patch[:, :, 0] == 0).all() and (patch[:, :, 7] == 0).all()
    np.testing.assert_array_equal(patch[:, :, 1:7], vol[:8, :8])


def test_refresh_is_ema_and_bank_round_trips(monkeypatch):
    bank = hand_bank(with_images=True)

    def encoder(scale):
        return lambda x: scale * torch.nn.functional.avg_pool3d(x, 4).repeat(1, 3, 1, 1, 1)  # (n, 3, 2, 2, 2)
    bank.refresh(encoder(1.0), momentum=0.9, batch_size=3)
    first = bank.features.clone()
    assert first.shape == (8, 3, 2, 2, 2)
    expected = torch.stack([torch.from_numpy(bank.patch(i)[0]) for i in range(len(bank))])
    torch.testing.assert_close(first, encoder(1.0)(expected[:, None]))
    monkeypatch.setattr(data, "padded_crop", None)  # the patches were cut once, by the first refresh
    bank.refresh(encoder(3.0), momentum=0.9)
    torch.testing.assert_close(bank.features, 0.9 * first + 0.1 * 3 * first)
    monkeypatch.undo()

    sel = select(bank, np.zeros((2, 3)), [QUERY, COT["A"]], [None, "B"], settings(k_coarse=6, k_fine=3))
    refs = bank.references(sel.indices, sel.weights, masks=True)
    assert refs.features.shape == (2, 3, 3, 2, 2, 2) and refs.weights.shape == (2, 3)
    assert refs.masks.shape == (2, 3, 8, 8, 8) and refs.masks.dtype == torch.float32
    for row, entries in zip(refs.masks, sel.indices):     # each reference brings its own ground truth
        for mask, i in zip(row, entries):
            np.testing.assert_array_equal(mask.numpy(), bank.patch(i)[1])
    assert bank.references(sel.indices, sel.weights).masks is None

    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    restored = hand_bank(with_images=True)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.features, bank.features)
    again = select(restored, np.zeros((2, 3)), [QUERY, COT["A"]], [None, "B"], settings(k_coarse=6, k_fine=3))
    np.testing.assert_array_equal(again.indices, sel.indices)
    with pytest.raises(ValueError, match="does not match"):
        hand_bank(patches=1).load_state_dict(bank.state_dict())


def test_first_refresh_replaces_and_momentum_zero_follows_the_teacher():
    """The bank is current: the first refresh after the warm-up (replace) sets the features to the teacher's
    even when an earlier fill or a checkpoint left some, and with momentum 0 (the default: the teacher is
    an EMA already) every later refresh is the encoder's output; a momentum > 0 still averages."""
    assert Config().bank_momentum == 0.0
    bank = hand_bank(with_images=True)
    patches = torch.stack([torch.from_numpy(bank.patch(i)[0]) for i in range(len(bank))])[:, None]

    def encoder(scale):
        return lambda x: scale * torch.nn.functional.avg_pool3d(x, 4)        # (n, 1, 2, 2, 2)
    bank.refresh(encoder(1.0), momentum=0.9)
    restored = hand_bank(with_images=True)
    restored.load_state_dict(bank.state_dict())                           # features from a checkpoint
    for b in (bank, restored):
        b.refresh(encoder(2.0), momentum=0.9, replace=True)
        assert torch.equal(b.features, encoder(2.0)(patches))
    bank.refresh(encoder(-3.0), momentum=0.0)
    assert torch.equal(bank.features, encoder(-3.0)(patches))
    bank.refresh(encoder(5.0), momentum=0.5)
    torch.testing.assert_close(bank.features, 0.5 * encoder(-3.0)(patches) + 0.5 * encoder(5.0)(patches))
    with pytest.raises(ValueError, match="encoder gives features"):
        bank.refresh(lambda x: torch.nn.functional.avg_pool3d(x, 2), momentum=0.0)
    bank.refresh(lambda x: torch.nn.functional.avg_pool3d(x, 2), momentum=0.0, replace=True)
    assert bank.features.shape == (len(bank), 1, 4, 4, 4)


def test_zeroed_swap_runs_decoder_a_with_zero_refs():
    volumes = {c: (np.ones((8, 8, 8), np.float32), np.ones((8, 8, 8), np.uint8)) for c in COT}
    bank = ReferenceBank.build(GRID, volumes, list(COT), COT)
    bank.refresh(lambda x: torch.nn.functional.avg_pool3d(x, 4), momentum=0.0)
    bank.index_queries({"B": QUERY})
    calls = []

    def decode_a(feats, refs, zero_refs=False):
        calls.append((refs, zero_refs))
        return torch.full((1, 2, 8, 8, 8), float(len(calls)))
    logits_b = torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    out = retrieve.decoder_a_probabilities(SimpleNamespace(decode_a=decode_a), None, logits_b, ["B"], bank,
                                           settings(k_fine=2), None, swaps=("retrieved", "zeroed", "none"))
    assert [(refs is None, zero) for refs, zero in calls] == [(False, False), (True, True), (True, False)]
    assert set(out) == {"retrieved", "zeroed", "none"}


def test_label_transfer_is_the_chosen_references_weighted_masks():
    """The sensitivity check's label transfer: for retrieved and random references, the weighted mean of
    exactly the masks decoder A was given; none for "zeroed" (no references, their contribution zeroed)."""
    rng = np.random.default_rng(0)
    volumes = {c: (rng.normal(size=(16, 16, 8)).astype(np.float32),
                   (rng.random((16, 16, 8)) < 0.3).astype(np.uint8)) for c in COT}
    bank = ReferenceBank.build(GRID, volumes, list(COT), COT)
    bank.refresh(lambda x: torch.nn.functional.avg_pool3d(x, 4), momentum=0.9)
    bank.index_queries({"B": QUERY, "C": QUERY})
    given = []
    model = SimpleNamespace(decode_a=lambda feats, refs, zero_refs=False:
                            given.append((refs, zero_refs)) or torch.zeros(2, 2, 8, 8, 8))
    logits_b = torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    out = retrieve.decoder_a_probabilities(model, None, logits_b, ["B", "C"], bank, settings(k_fine=3),
                                           torch.Generator().manual_seed(1), transfer=True)
    assert set(out) == {"retrieved", "random", "zeroed", "retrieved_transfer", "random_transfer"}
    assert given[2] == (None, True) and not any(zero for _, zero in given[:2])
    assert not torch.equal(given[0][0].indices, given[1][0].indices)
    for swap, (refs, _) in zip(("retrieved", "random"), given):
        masks = torch.from_numpy(np.stack([[bank.patch(i)[1] for i in row] for row in refs.indices.tolist()]))
        expected = (refs.weights[:, :, None, None, None] * masks.float()).sum(1)     # (B, X, Y, Z)
        torch.testing.assert_close(out[f"{swap}_transfer"], expected)
        assert out[f"{swap}_transfer"].min() >= 0 and out[f"{swap}_transfer"].max() <= 1 + 1e-6


def test_orientations_are_the_training_augmentations():
    """The bank's four orientations are exactly the distinct patches data.rot_flip makes of a volume."""
    volume = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    banked = {orient(volume, v).tobytes() for v in range(len(ORIENTATIONS))}
    trained = {data.rot_flip(torch.from_numpy(volume), k, a).numpy().tobytes()
               for k in range(4) for a in range(2)}
    assert banked == trained and len(banked) == 4


def test_build_from_volumes():
    rng = np.random.default_rng(0)
    volumes = {}
    for cid, shape in (("c1", (20, 18, 10)), ("c2", (12, 14, 7))):
        label = np.zeros(shape, np.uint8)
        label[3:10, 4:12, 2:6] = 1
        volumes[cid] = (rng.normal(size=shape).astype(np.float32), label)
    cfg = GRID
    bank = ReferenceBank.build(cfg, volumes, ["c1", "c2"], {"c1": COT["B"], "c2": COT["C"]})
    counts = {(cid, v): len(grid_boxes(orient(volumes[cid][1], v).shape, (8, 8, 8), (8, 8, 8)))
              for cid in volumes for v in range(len(ORIENTATIONS))}
    assert len(bank) == sum(counts.values())
    assert sorted(Counter(zip(bank.case_ids, bank.variants.tolist())).items()) == sorted(counts.items())
    assert bank.morph.shape == (len(bank), MORPH_DIM)
    for i in range(len(bank)):  # each entry: the ground truth of its box in its oriented volume
        image, label = (orient(v, bank.variants[i]) for v in volumes[bank.case_ids[i]])
        np.testing.assert_array_equal(bank.patch(i)[1], data.padded_crop(label, bank.boxes[i]))
        assert bank.texts[i] == COT["B" if bank.case_ids[i] == "c1" else "C"]
    crops = np.stack([bank.patch(i)[1] > 0 for i in range(len(bank))])  # ground truth, zero-padded
    np.testing.assert_allclose(bank.morph, morphology_batch(crops))
    bank.refresh(lambda x: x[:, :, ::4, ::4, ::4], momentum=0.9)
    assert bank.features.shape == (len(bank), 1, 2, 2, 2)
    np.testing.assert_array_equal(bank.masks.numpy(), crops)
    np.testing.assert_array_equal(bank.crops[:, 0].numpy(),
                                  np.stack([bank.patch(i)[0] for i in range(len(bank))]))


# ----------------------------------------------------------------------------- explanation and speed

def test_explanation_text_and_figure(tmp_path):
    bank = hand_bank(with_images=True)
    sel = select(bank, np.zeros((1, 3)), [QUERY], [None], settings(k_coarse=6, k_fine=2))
    text = retrieve.format_explanation(bank, sel)
    assert "hard negative" in text and "chosen, weight" in text
    image = bank.volumes["A"][0]
    path = retrieve.plot_explanation(tmp_path / "explain.png", image, [(0, 0, 0, 8, 8, 8)], bank, sel)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_benchmark_runs():
    result = retrieval_benchmark(sizes=(100,), runs=5, warmup=1)
    assert 0 < result[100]["select"] < 1.0 and 0 < result[100]["select_device"] < 1.0


def test_cot_filter_rejects_other_diagnoses_more_on_real_cots(brisc_csv):
    """Real LLM CoTs of brain-tumour MRI, three diagnoses: each image-only CoT queries every other image's
    mask CoT (mode cot, morphology out of play). The filter acts, and its hard negatives are mostly the
    candidates of another diagnosis: what it is for."""
    with open(brisc_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [f"img{i}" for i in range(len(rows))]
    bank = ReferenceBank(ids, np.zeros((len(rows), 6)), np.zeros((len(rows), 3)),
                         [r["cot_mask"] for r in rows])
    diagnosis = np.array([r["diagnosis"] for r in rows])
    for tau in (0.5, 0.6):
        sel = select(bank, np.zeros((len(rows), 3)), [r["cot_no_mask"] for r in rows], ids,
                     settings(retrieval="cot", tau=tau))
        same, other = [], []
        for i, rec in enumerate(sel.explain):
            alike = diagnosis[rec["candidates"]] == diagnosis[i]
            same.append(rec["hard_negative"][alike].mean())
            other.append(rec["hard_negative"][~alike].mean())
        print(f"tau {tau}: rejected {100 * np.mean(same):.1f} % of same-diagnosis, "
              f"{100 * np.mean(other):.1f} % of other-diagnosis candidates")
        # the measured shares: docs/results.md §2.4
        assert 0.2 < np.mean(same) < 0.95 and np.mean(other) > np.mean(same) + 0.1
        chosen = diagnosis[sel.indices] == diagnosis[:, None]
        assert chosen.mean() > 0.5                                   # chance is about 1/3
